"""TorchScript export of the trained network with ``python -m monai.bundle ckpt_export``.

DiffusionModelUNet cannot be scripted and ckpt_export's ``--use_trace`` passes one input, so the
command swaps ``network_def``'s target for :func:`pipeline.model.network.traced_diffusion_unet`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import tiny

from pipeline.bundle import BUNDLE_DIR, config_files, run_bundle
from pipeline.model.checkpoint import load_checkpoint
from pipeline.model.network import diffusion_unet, traced_diffusion_unet

REPO = Path(__file__).resolve().parent.parent


def export_command(model_pt: Path, model_ts: Path, **overrides) -> list[str]:
    """The export command as a user types it (README), plus the run's own settings."""
    files = "[" + ",".join(f"'{f}'" for f in config_files("inference")) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def",
           "--filepath", str(model_ts), "--ckpt_file", str(model_pt),
           "--meta_file", str(BUNDLE_DIR / "configs" / "metadata.json"), "--config_file", files,
           "--bundle_root", str(BUNDLE_DIR), "--key_in_ckpt", "",
           "--network_def#_target_", "pipeline.model.network.traced_diffusion_unet"]
    for key, value in overrides.items():
        cmd += [f"--{key}", str(value).replace(" ", "")]
    return cmd


def test_traced_network_has_the_checkpoint_parameters():
    traced = traced_diffusion_unet(32, 1, channels=(32, 32, 32))
    assert isinstance(traced, torch.jit.ScriptModule)
    assert traced.state_dict().keys() == diffusion_unet(32, 1, (32, 32, 32)).state_dict().keys()


def test_ckpt_export_gives_torchscript_equal_to_checkpoint(synth_root, tmp_path):
    run_bundle("train", **tiny(synth_root, tmp_path / "run", tmp_path / "shared"))
    model_pt, model_ts = tmp_path / "run" / "models" / "model.pt", tmp_path / "model.ts"
    architecture = {k: v for k, v in tiny(synth_root, tmp_path, tmp_path).items()
                    if k in ("image_size", "unet_channels", "attention_levels", "norm_num_groups", "modalities")}
    cmd = export_command(model_pt, model_ts, **architecture)
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]

    extra = {"metadata.json": "", "inference.json": ""}  # the config file(s) given, stored as JSON
    exported = torch.jit.load(str(model_ts), map_location="cpu", _extra_files=extra).eval()
    assert json.loads(extra["metadata.json"])["network_data_format"]["inputs"]["timesteps"]["dtype"] == "long"
    assert json.loads(extra["inference.json"])["network_def"]["_target_"] == "pipeline.model.network.diffusion_unet"

    net = diffusion_unet(32, 1, (32, 32, 32)).eval()
    net.load_state_dict(load_checkpoint(model_pt))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for timesteps in ([0], [1, 250, 999], [500, 500]):  # batch sizes other than the traced one
            t = torch.tensor(timesteps, dtype=torch.long)
            x = torch.rand(len(timesteps), 1, 32, 32, generator=gen)
            expected, got = net(x, t), exported(x, t)
            assert expected.abs().max() > 0  # trained weights (a fresh UNet's output conv is zero)
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_a_torchscript_file_given_as_a_checkpoint_says_what_it_is(tmp_path):
    from pipeline.errors import InputError
    from pipeline.model.checkpoint import load_checkpoint
    from pipeline.model.network import traced_diffusion_unet

    path = tmp_path / "model.ts"
    torch.jit.save(traced_diffusion_unet(16, 1, channels=(8, 8), attention_levels=(False, False),
                                         num_head_channels=8, norm_num_groups=8), str(path))
    with pytest.raises(InputError, match="is a TorchScript module") as err:
        load_checkpoint(path)
    assert err.value.source == str(path)
    torch.save({"w": torch.ones(2)}, tmp_path / "state.pt")
    assert torch.equal(load_checkpoint(tmp_path / "state.pt")["w"], torch.ones(2))
