"""Train stage through the bundle: tiny runs at 32x32 on the session's synthetic data."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ignite.engine import Events

from pipeline.bundle import config_files, make_workflow, run_bundle
from pipeline.errors import InputError
from pipeline.model.checkpoint import load_checkpoint
from pipeline.model.network import diffusion_unet, make_scheduler
from pipeline.model.noise import make_noise
from pipeline.model.train import total_steps, warmup_cosine

REPO = Path(__file__).resolve().parent.parent


def tiny(dataset: Path, out: Path, shared: Path, **extra) -> dict:
    """Overrides for a few-second run: 32x32, 4 mm, FLAIR, small UNet, one epoch, shared split + cache."""
    settings = dict(dataset_dir=str(dataset), output_dir=str(out), ckpt_dir=str(out / "models"),
                    split_file=str(shared / "split.json"), cache_dir=str(shared / "cache"),
                    image_size=32, pixdim=[4.0, 4.0, 4.0], unet_channels=[32, 32, 32],
                    attention_levels=[False, False, True], norm_num_groups=32, modalities=["FLAIR"],
                    prediction_type="epsilon", batch_size=16, epochs=1, train_steps=0, progress=False,
                    num_workers=1)
    settings.update(extra)
    return settings


def as_cli(settings: dict) -> list[str]:
    args = []
    for key, value in settings.items():
        args += [f"--{key}", str(value).replace(" ", "")]
    return args


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("shared")


def test_tiny_training_runs_and_loss_falls(synth_root, shared, tmp_path):
    flow = make_workflow("train", **tiny(synth_root, tmp_path, shared, epochs=3, noise="simplex"))
    trainer = flow.parser.get_parsed_content("train#trainer")
    losses = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output[0]["loss"])))
    flow.run()
    flow.finalize()
    assert (tmp_path / "models" / "model.pt").is_file()
    assert len(list((tmp_path / "models").glob("checkpoint_*.pt"))) >= 1
    third = max(1, len(losses) // 3)
    assert sum(losses[-third:]) / third < sum(losses[:third]) / third
    # EMA weights load into a fresh network with weights_only=True
    net = diffusion_unet(32, 1, (32, 32, 32))
    net.load_state_dict(load_checkpoint(tmp_path / "models" / "model.pt"))
    assert (tmp_path / "tensorboard").is_dir()


def _weights(path: Path) -> dict:
    return load_checkpoint(path)


def test_same_seed_gives_identical_weights(synth_root, shared, tmp_path):
    for name in ("a", "b"):
        run_bundle("train", **tiny(synth_root, tmp_path / name, shared, seed=5))
    a, b = _weights(tmp_path / "a/models/model.pt"), _weights(tmp_path / "b/models/model.pt")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    run_bundle("train", **tiny(synth_root, tmp_path / "c", shared, seed=6))
    c = _weights(tmp_path / "c/models/model.pt")
    assert not all(torch.equal(a[k], c[k]) for k in a)
    # the GPU path's settings run on CPU and change nothing there: AMP (CUDA autocast, a no-op on CPU),
    # torch.compile (eager backend here; the compiled module's weights are the network's own), a loader
    # worker and pinned memory off
    run_bundle("train", **tiny(synth_root, tmp_path / "d", shared, seed=5, amp=True, compile=True,
                               compile_backend="eager", train_workers=1, pin_memory=False))
    d = _weights(tmp_path / "d/models/model.pt")
    assert d.keys() == a.keys() and all(torch.allclose(a[k], d[k], atol=1e-6) for k in a)


def test_two_process_gloo_training(synth_root, shared, tmp_path):
    settings = tiny(synth_root, tmp_path, shared, epochs=1)
    files = "[" + ",".join(f"'{f}'" for f in config_files("multi_gpu_train")) + "]"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
           "-m", "monai.bundle", "run", "--config_file", files, *as_cli(settings)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "models" / "model.pt").is_file()
    state = load_checkpoint(next((tmp_path / "models").glob("checkpoint_*.pt")))
    assert not any(k.startswith("module.") for k in state["network"])  # saved unwrapped
    writers = {f.name.split(".")[-2] for f in (tmp_path / "tensorboard").glob("events.out.tfevents.*")}
    assert len(writers) == 1, "one process (rank 0) writes TensorBoard files; rank 1's handlers are never built"


def test_checkpoint_from_other_architecture_is_refused(synth_root, shared, tmp_path):
    run_bundle("train", **tiny(synth_root, tmp_path, shared))
    with pytest.raises(Exception) as info:
        run_bundle("train", **tiny(synth_root, tmp_path, shared, epochs=2, unet_channels=[32, 64, 64]))
    assert "holds checkpoints of another training run" in _chain_text(info.value)  # found before the weights
    assert "settings.unet_channels [32, 32, 32] (this run: [32, 64, 64])" in _chain_text(info.value)


def _chain_text(err: BaseException) -> str:
    parts = []
    while err is not None:
        parts.append(str(err))
        err = err.__cause__ or err.__context__
    return " | ".join(parts)


def test_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(InputError, match="corrupt"):
        load_checkpoint(bad)


def test_bad_settings_are_refused():
    with pytest.raises(InputError, match="unknown noise type"):
        make_noise("perlin")
    with pytest.raises(InputError, match="unknown schedule"):
        make_scheduler("quadratic")
    with pytest.raises(InputError, match="prediction type"):
        make_scheduler("linear", prediction_type="score")
    with pytest.raises(InputError, match="not divisible"):
        diffusion_unet(30, 1, (32, 64, 64))


@pytest.mark.parametrize("schedule,prediction", [("cosine", "v_prediction"), ("scaled_linear", "sample")])
def test_schedules_and_prediction_types_train(synth_root, shared, tmp_path, schedule, prediction):
    flow = run_bundle("train", **tiny(synth_root, tmp_path, shared, schedule=schedule, prediction_type=prediction))
    assert flow.parser.get_parsed_content("scheduler").prediction_type == prediction
    assert (tmp_path / "models" / "model.pt").is_file()


def test_mlflow_tracking(synth_root, shared, tmp_path):
    run_bundle("train", tracking="mlflow", **tiny(synth_root, tmp_path, shared))
    assert (tmp_path / "mlruns.db").is_file()
    assert (tmp_path / "models" / "model.pt").is_file()


def test_cli_train_reports_bad_setting_in_one_line(synth_root, shared, tmp_path):
    settings = tiny(synth_root, tmp_path, shared, noise="perlin")
    result = subprocess.run([sys.executable, "-m", "pipeline", "train", *as_cli(settings)],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == \
        "error: noise: unknown noise type 'perlin'; choose one of gaussian, simplex, coarse"
    assert "Traceback" not in result.stderr


def test_bundle_metadata_verifies_against_the_kept_schema():
    meta = REPO / "bundles" / "brats_diffusion_anomaly" / "configs" / "metadata.json"
    schema = REPO / "configs" / "bundle_meta_schema.json"
    result = subprocess.run([sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file", str(meta),
                             "--filepath", str(schema)], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "metadata is verified with no error" in result.stdout + result.stderr


def test_training_length_in_steps_and_warmup_cosine_schedule(synth_root, shared, tmp_path):
    """train_steps stops after exactly that many optimiser steps (mid-epoch too), and the learning
    rate follows warm-up then cosine decay to the final fraction."""
    settings = tiny(synth_root, tmp_path, shared, train_steps=3, learning_rate=0.01, lr_warmup_steps=2,
                    lr_final_fraction=0.1, val_interval=100)
    flow = run_bundle("train", **settings)
    trainer = flow.parser.get_parsed_content("train#trainer")
    assert trainer.state.iteration == 3 and (tmp_path / "models" / "model.pt").is_file()
    assert trainer.state.epoch_length > 3  # so the run stopped inside its first epoch
    lr = flow.parser.get_parsed_content("optimizer").param_groups[0]["lr"]
    assert lr == pytest.approx(0.001)  # 3 steps taken: the schedule has reached its end

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = warmup_cosine(optimizer, warmup_steps=4, total=14, final_fraction=0.2)
    seen = []
    for _ in range(15):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert seen[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert seen[9] == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * 5 / 10)))
    assert seen[14] == pytest.approx(0.2) and all(a >= b for a, b in zip(seen[3:], seen[4:]))
    with pytest.raises(InputError, match="train_steps"):
        total_steps(-1, 1, [])


def test_ddp_ranks_draw_their_own_noise_and_timesteps(monkeypatch):
    """Rank 0 keeps the run's seed; another rank is offset, so ranks do not noise their slices alike."""
    from pipeline.model import train
    from pipeline.model.train import RANK_SEED_STRIDE, NoisePrepareBatch

    scheduler, noise = make_scheduler(), make_noise("gaussian", seed=3)
    first = NoisePrepareBatch(scheduler, noise, seed=3)
    monkeypatch.setattr(train, "rank_and_world", lambda: (1, 2))
    second = NoisePrepareBatch(scheduler, noise, seed=3)
    assert first.seed == 3 and first.noise.seed == 3
    assert second.seed == second.noise.seed == 3 + RANK_SEED_STRIDE
    assert not torch.equal(first.get_noise(torch.zeros(2, 1, 8, 8)), second.get_noise(torch.zeros(2, 1, 8, 8)))
