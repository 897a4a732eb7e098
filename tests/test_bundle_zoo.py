"""The bundle as MONAI's and model-zoo's tools take it, offline.

model-zoo's CI (``ci/verify_bundle.py -b <bundle> -m min`` in Project-MONAI/model-zoo) checks the
bundle's files, its version and changelog, and its metadata against the schema it names. In ``full``
mode it adds, for its own diffusion bundles: properties (only when the metadata lists
``supported_apps``, which this bundle does not), no shape check and no TorchScript check (both are
switched off for diffusion bundles there; ``tests/test_export.py`` covers this bundle's traced export).
What a diffusion bundle must still do is done here: the inference config read alone builds
``network_def``, the network runs on ``(x, timesteps)`` as the metadata describes it, and the weights in
``models/model.pt`` load into it and run one inference step. The bundle ships no weights, so a copy of
it gets a ``models/model.pt`` trained for two steps with the default network.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import tomllib
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from monai.bundle import ConfigParser
from monai.bundle import run as monai_bundle_run
from monai.apps.utils import HashCheckError
from monai.bundle import download_large_files, verify_metadata, verify_net_in_out
from test_train import tiny

import pipeline
from pipeline.bundle import (BUNDLE_DIR, BUNDLE_NAME, CONFIGS, SHARED_CONFIG, STANDALONE_CONFIGS, run_bundle,
                             stale_configs, sync_configs)
from pipeline.bundle import main as bundle_main
from pipeline.errors import InputError
from pipeline.fingerprint import sha256_file
from pipeline.model.large_files import LARGE_FILES

REPO = Path(__file__).resolve().parent.parent
SCHEMA = REPO / "configs" / "bundle_meta_schema.json"
META = BUNDLE_DIR / "configs" / "metadata.json"
ARCHITECTURE = ("image_size", "modalities", "unet_channels", "attention_levels", "norm_num_groups", "prediction_type")
"""Settings of ``tiny`` left out of the zoo model: it has the default network, what inference.yaml alone builds."""


def _find_bundle_file(folder: Path, stem: str) -> str | None:
    """As model-zoo's CI: ``<stem>.json``, ``.yaml`` or ``.yml`` (the last one present wins)."""
    found = None
    for suffix in ("json", "yaml", "yml"):
        if (folder / f"{stem}.{suffix}").is_file():
            found = f"{stem}.{suffix}"
    return found


def _metadata() -> dict:
    return json.loads(META.read_text())


def _zoo_settings(synth_root: Path, root: Path) -> dict:
    """The zoo copy's two-step training settings (the default network, outputs inside the copy)."""
    settings = {k: v for k, v in tiny(synth_root, root / "eval", root / "eval").items() if k not in ARCHITECTURE}
    settings.update(ckpt_dir=str(root / "models"), train_steps=2, batch_size=4, val_interval=100)
    return settings


@pytest.fixture(scope="module")
def zoo_bundle(synth_root, tmp_path_factory) -> Path:
    """A copy of the bundle laid out as model-zoo holds one, with a two-step ``models/model.pt`` (and its card)."""
    root = tmp_path_factory.mktemp("zoo") / BUNDLE_NAME
    for part in ("configs", "docs"):
        shutil.copytree(BUNDLE_DIR / part, root / part)
    for name in ("LICENSE", LARGE_FILES):
        shutil.copy(BUNDLE_DIR / name, root / name)
    run_bundle("train", bundle_dir=root, quiet=True, **_zoo_settings(synth_root, root))
    return root


def test_min_mode_checks(zoo_bundle):
    """``verify_bundle.py -m min``: necessary and preferred files, version in the changelog, metadata schema."""
    for name in ("configs/metadata.json", "LICENSE", "models/model.pt", "docs/README.md"):
        assert (zoo_bundle / name).is_file(), name
    assert _find_bundle_file(zoo_bundle / "configs", "inference") == "inference.yaml"
    meta = json.loads((zoo_bundle / "configs" / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"]  # (model_info.json, the published versions, is model-zoo's own)
    # CI keeps the schema in <bundle>/eval/schema.json; a file already there is used, not downloaded
    (zoo_bundle / "eval").mkdir(exist_ok=True)
    shutil.copy(SCHEMA, zoo_bundle / "eval" / "schema.json")
    verify_metadata(meta_file=str(zoo_bundle / "configs" / "metadata.json"),
                    filepath=str(zoo_bundle / "eval" / "schema.json"))


def test_metadata_declares_the_package_its_configs_need():
    """Every config builds objects of `pipeline` (distribution brain-diffusion-anomaly): metadata lists it."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    required = _metadata()["required_packages_version"]
    assert required[project["name"]] == project["version"] == pipeline.__version__
    roots = set()
    for path in (BUNDLE_DIR / "configs").glob("*.yaml"):
        text = path.read_text()
        roots.update(line.split("import", 1)[1].split()[0].split(".")[0]
                     for line in text.splitlines() if line.strip().startswith("- $import"))
        roots.update(value.split(".")[0] for value in _targets(yaml.safe_load(text)) if "." in value)
    assert roots <= {"pipeline", "monai", "torch", "os"}, roots  # monai and torch are the metadata's own versions


def _targets(config) -> list[str]:
    if isinstance(config, dict):
        found = [config["_target_"]] if isinstance(config.get("_target_"), str) else []
        found += [v for k, v in config.items() if str(k).endswith("#_target_")]
        return found + [t for v in config.values() for t in _targets(v)]
    if isinstance(config, list):
        return [t for v in config for t in _targets(v)]
    return []


def test_kept_schema_is_no_stricter_than_the_official_one(tmp_path):
    """The offline schema accepts what MONAI's meta_schema_20240725 accepts: any tensor ``type`` (model-zoo's
    diffusion bundles write ``noise``, ``timesteps``, ``feature``), no changelog, no ``is_patch_data``, an
    empty ``value_range``; like the official one it refuses ``null`` in ``value_range``."""
    def tensor(kind, **extra):
        return {"type": kind, "format": "image", "num_channels": 1, "spatial_shape": [64, 64], "dtype": "float32",
                "value_range": [], **extra}

    meta = {"schema": "meta_schema_20240725.json", "version": "1.0.0", "monai_version": "1.4.0",
            "pytorch_version": "2.4.0", "numpy_version": "1.24.4", "required_packages_version": {},
            "task": "t", "description": "d", "authors": "a", "copyright": "c",
            "network_data_format": {"inputs": {"latent": tensor("noise", is_patch_data=True),
                                               "condition": tensor("timesteps", spatial_shape=[])},
                                    "outputs": {"pred": tensor("feature", channel_def={"0": "image"})}},
            "autoencoder_data_format": {"inputs": {"image": tensor("image")}, "outputs": {"pred": tensor("image")}}}
    path = tmp_path / "metadata.json"
    path.write_text(json.dumps(meta))
    verify_metadata(meta_file=str(path), filepath=str(SCHEMA))
    meta["network_data_format"]["outputs"]["pred"]["value_range"] = [None, None]
    path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="Failed validating"):
        verify_metadata(meta_file=str(path), filepath=str(SCHEMA))
    # and the bundle writes its diffusion inputs as MONAI bundles do
    io = _metadata()["network_data_format"]
    assert io["inputs"]["timesteps"]["type"] == io["inputs"]["timesteps"]["format"] == "timesteps"
    assert io["outputs"]["pred"]["value_range"] == []


def test_inference_and_train_configs_read_alone():
    """model-zoo reads ``configs/inference.yaml`` alone; train.yaml reads alone too. Each carries common.yaml
    (kept in sync by ``python -m pipeline.bundle sync``), so the old [common, X] merges give the same config."""
    assert stale_configs() == [], "run `python -m pipeline.bundle sync` after editing common.yaml"
    configs = BUNDLE_DIR / "configs"
    required = {"inference.yaml": ["bundle_root", "dataset_dir", "device", "network_def", "inferer", "initialize",
                                   "run", "model_path"],
                "train.yaml": ["bundle_root", "dataset_dir", "device", "network_def", "inferer", "initialize", "run",
                               "train#trainer", "train#dataloader", "train#handlers_all_ranks",
                               # model-zoo's contributing guide: the datasets and the data they are built from
                               "train#dataset", "train#dataset#data", "validate#dataset", "validate#dataset#data",
                               "train#handlers_rank0", "validate#evaluator", "validate#handlers_all_ranks",
                               "validate#handlers_rank0",
                               # lists MONAI's experiment tracking (--tracking mlflow) appends its handlers to
                               "train#handlers", "validate#handlers"],
                "multi_gpu_train.yaml": ["initialize", "run", "finalize"],
                "multi_gpu_inference.yaml": ["initialize", "run", "finalize"]}
    for name, ids in required.items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a key written twice in one file is a MONAI warning: an error here
            parser = ConfigParser(ConfigParser.load_config_file(configs / name))
        assert [i for i in ids if i not in parser] == [], name
    for name in STANDALONE_CONFIGS:
        alone = ConfigParser.load_config_files([configs / name])
        assert ConfigParser.load_config_files([configs / SHARED_CONFIG, configs / name]) == alone
    # every workflow starts from a complete config, or (evaluate) from common.yaml
    assert {files[0] for files in CONFIGS.values()} == {*STANDALONE_CONFIGS, SHARED_CONFIG}
    # multi-GPU training composes the handler lists by name, not by position, and takes the GPU from LOCAL_RANK
    overlay = (configs / "multi_gpu_train.yaml").read_text()
    assert "@train#handlers_rank0" in overlay and "handlers[" not in overlay
    assert "LOCAL_RANK" in (configs / SHARED_CONFIG).read_text()


def test_sync_copies_common_into_the_standalone_configs(tmp_path):
    shutil.copytree(BUNDLE_DIR / "configs", tmp_path / "configs")
    common = tmp_path / "configs" / SHARED_CONFIG
    common.write_text(common.read_text().replace("num_res_blocks: 1", "num_res_blocks: 2"))
    assert stale_configs(tmp_path) == list(STANDALONE_CONFIGS)
    assert sync_configs(tmp_path) == list(STANDALONE_CONFIGS) and stale_configs(tmp_path) == []
    for name in STANDALONE_CONFIGS:
        assert ConfigParser.load_config_file(tmp_path / "configs" / name)["num_res_blocks"] == 2
    (tmp_path / "configs" / "train.yaml").write_text("epochs: 1\n")  # markers gone: said, not guessed
    with pytest.raises(InputError, match="no block between"):
        sync_configs(tmp_path)


def test_full_mode_checks_for_a_diffusion_bundle(zoo_bundle):
    """``verify_net_in_out`` as model-zoo calls it, with the timesteps a diffusion UNet needs; then the
    weights in models/model.pt load into the inference config's ``network_def`` and run one step."""
    meta, config = zoo_bundle / "configs" / "metadata.json", zoo_bundle / "configs" / "inference.yaml"
    assert not json.loads(meta.read_text()).get("supported_apps")  # CI checks properties only for listed apps
    verify_net_in_out(net_id="network_def", meta_file=str(meta), config_file=str(config),
                      bundle_root=str(zoo_bundle), device="cpu",
                      extra_forward_args={"timesteps": torch.zeros(1, dtype=torch.long)})

    parser = ConfigParser()
    parser.read_config(str(config))
    parser.read_meta(str(meta))
    parser["bundle_root"] = str(zoo_bundle)
    net = parser.get_parsed_content("network_def").eval()
    net.load_state_dict(torch.load(zoo_bundle / "models" / "model.pt", map_location="cpu", weights_only=True))
    inferer, scheduler = parser.get_parsed_content("inferer"), parser.get_parsed_content("scheduler")
    image = parser["_meta_#network_data_format#inputs#image"]
    shape = (2, image["num_channels"], *image["spatial_shape"])
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0)) * image["value_range"][1]
    t = torch.tensor([0, scheduler.num_train_timesteps - 1])
    with torch.no_grad():
        pred = inferer(inputs=x, diffusion_model=net, noise=torch.randn_like(x), timesteps=t)
    assert pred.shape == shape and torch.isfinite(pred).all()
    assert pred.abs().max() > 0  # trained weights: a fresh UNet's output convolution is zero


def test_inference_config_runs_alone(zoo_bundle, synth_root):
    """What ``python -m monai.bundle run --config_file configs/inference.yaml`` does, on the zoo copy: paths,
    the model card's pixdim (the tiny model was trained at 4 mm), and for time the test subjects only,
    uncalibrated (no healthy validation residuals to compute)."""
    out = zoo_bundle / "eval"
    monai_bundle_run(config_file=str(zoo_bundle / "configs" / "inference.yaml"),
                     meta_file=str(zoo_bundle / "configs" / "metadata.json"), bundle_root=str(zoo_bundle),
                     dataset_dir=str(synth_root), output_dir=str(out), split_file=str(out / "split.json"),
                     cache_dir=str(out / "cache"), pixdim=[4.0, 4.0, 4.0], progress=False, num_workers=1,
                     score_sections=["test"], residual_norm="none")
    index = json.loads((out / "scores" / "index.json").read_text())
    assert len(index["subjects"]) == len(list((out / "scores").rglob("*_score.nii.gz"))) > 0


def test_train_and_validate_datasets_resolve_to_their_sections(zoo_bundle, synth_root):
    """model-zoo's ``train#dataset`` / ``validate#dataset`` (and their ``#data``) resolve, on the zoo copy's
    cache, to the slices of the training and validation subjects and those subjects' items."""
    parser = ConfigParser(ConfigParser.load_config_file(zoo_bundle / "configs" / "train.yaml"))
    parser.update({"bundle_root": str(zoo_bundle), **_zoo_settings(synth_root, zoo_bundle)})
    split = json.loads((zoo_bundle / "eval" / "split.json").read_text())
    for workflow_key, section in (("train", "train"), ("validate", "validation")):
        dataset = parser.get_parsed_content(f"{workflow_key}#dataset")
        data = parser.get_parsed_content(f"{workflow_key}#dataset#data")
        assert sorted(item["subject"] for item in data) == sorted(split[section])
        assert all(Path(item["image"]).is_file() and Path(item["label"]).is_file() for item in data)
        assert len(dataset) > 0 and {row["subject"] for row in dataset.index} <= set(split[section])
        assert parser.get_parsed_content(f"{workflow_key}#dataloader").dataset is dataset


def test_shipped_large_files_and_data_license():
    """As shipped: ``large_files.yml`` in model-zoo's format lists models/model.pt with no URL (no weights are
    published) and no hash (none trained); ``docs/data_license.txt`` names the data licences."""
    listed = ConfigParser.load_config_file(BUNDLE_DIR / LARGE_FILES)["large_files"]
    assert listed == [{"path": "models/model.pt", "url": "", "hash_val": "", "hash_type": ""}]
    text = (BUNDLE_DIR / "docs" / "data_license.txt").read_text()
    assert "CC BY-SA 4.0" in text and "ICBM152" in text


def test_training_writes_the_weights_hash_to_large_files(zoo_bundle, tmp_path):
    """Training into the bundle's models/ writes model.pt's sha256 to large_files.yml; model-zoo's download step
    then keeps the present file (hash checked, offline) and refuses a changed one."""
    listed = ConfigParser.load_config_file(zoo_bundle / LARGE_FILES)["large_files"]
    model = zoo_bundle / "models" / "model.pt"
    assert listed == [{"path": "models/model.pt", "url": "", "hash_val": sha256_file(model), "hash_type": "sha256"}]
    download_large_files(bundle_path=str(zoo_bundle))  # nothing to download: the file is there with its hash
    copy = tmp_path / BUNDLE_NAME
    shutil.copytree(zoo_bundle, copy, ignore=shutil.ignore_patterns("eval"))
    (copy / "models" / "model.pt").write_bytes(model.read_bytes() + b"changed")
    with pytest.raises(HashCheckError):
        download_large_files(bundle_path=str(copy))


def test_large_files_command_publishes_a_url(zoo_bundle, tmp_path):
    """``python -m pipeline.bundle large-files --url``: the URL the user uploaded to, the hash recomputed."""
    copy = tmp_path / BUNDLE_NAME
    shutil.copytree(zoo_bundle, copy, ignore=shutil.ignore_patterns("eval"))
    assert bundle_main(["large-files", "--bundle-dir", str(copy), "--url", "https://example.org/model.pt"]) == 0
    [entry] = ConfigParser.load_config_file(copy / LARGE_FILES)["large_files"]
    assert entry["url"] == "https://example.org/model.pt"
    assert entry["hash_val"] == sha256_file(copy / "models" / "model.pt")
    (copy / "models" / "model.pt").unlink()
    assert bundle_main(["large-files", "--bundle-dir", str(copy)]) == 2


SCORE_TEST_ONLY = {"pixdim": "[4.0,4.0,4.0]", "score_sections": "['test']", "residual_norm": "none",
                   "progress": "false", "num_workers": "1"}
"""Settings of a quick config-only scoring run of the zoo model (as test_inference_config_runs_alone)."""


def _outputs_outside(folder: Path, since: float, roots: list[Path]) -> list[Path]:
    """Files written after ``since`` under ``roots`` but not inside ``folder``."""
    return [p for root in roots for p in root.rglob("*")
            if p.is_file() and p.stat().st_mtime >= since and not p.resolve().is_relative_to(folder.resolve())]


def test_config_only_run_from_inside_the_bundle_folder(zoo_bundle, synth_root, tmp_path):
    """``cd <bundle> && python -m monai.bundle run --config_file configs/inference.yaml`` with no bundle_root
    and no output paths: everything lands inside that bundle folder (a copy anywhere), nothing beside it."""
    copy = tmp_path / "elsewhere" / BUNDLE_NAME
    shutil.copytree(zoo_bundle, copy, ignore=shutil.ignore_patterns("scores", "schema.json"))
    args = [arg for key, value in {"dataset_dir": str(synth_root), **SCORE_TEST_ONLY}.items()
            for arg in (f"--{key}", value)]
    started = time.time()
    run = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.yaml",
                          *args], cwd=copy, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    index = json.loads((copy / "eval" / "scores" / "index.json").read_text())
    assert index["subjects"] and len(list((copy / "eval" / "scores").rglob("*_score.nii.gz"))) == len(index["subjects"])
    assert not (copy / "bundles").exists()
    assert _outputs_outside(copy, started, [tmp_path]) == []


def test_config_run_from_another_folder_writes_into_the_bundle(zoo_bundle, synth_root, tmp_path, monkeypatch):
    """The same from an unrelated working directory, the config named by its full path (MONAI's Python entry);
    with ``score_batch_size: auto`` under a small budget (the index records the batch it chose)."""
    copy = tmp_path / BUNDLE_NAME
    shutil.copytree(zoo_bundle, copy, ignore=shutil.ignore_patterns("scores", "schema.json"))
    monkeypatch.chdir(tmp_path / "..")
    settings = {**SCORE_TEST_ONLY, "pixdim": [4.0, 4.0, 4.0], "score_sections": ["test"], "progress": False,
                "score_batch_size": "auto", "score_memory_gb": 0.05}
    monai_bundle_run(config_file=str(copy / "configs" / "inference.yaml"), dataset_dir=str(synth_root), **settings)
    index = json.loads((copy / "eval" / "scores" / "index.json").read_text())
    assert index["subjects"] and isinstance(index["settings"]["batch_size"], int) and index["settings"]["batch_size"] >= 1
    assert not (tmp_path.parent / "eval").exists()
