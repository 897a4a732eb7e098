"""The package as a user installs it (issue 26): a wheel built from the project holds the bundle and the protocol
files, and the README's main job runs from that wheel in an empty folder (shrunk to seconds by --set)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHRINK = ["dataset.dir=data/tiny", "dataset.synthetic.healthy=4", "dataset.synthetic.tumour=6",
          "dataset.synthetic.spacing=4", "bundle.image_size=16", "bundle.pixdim=[4.0,4.0,4.0]", "bundle.train_steps=2",
          "bundle.unet_channels=[8,8,8]", "bundle.norm_num_groups=8", "bundle.num_head_channels=8",
          "bundle.batch_size=4", "evaluation.bootstrap_resamples=20"]


def _run(*argv, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_the_main_job_runs_from_an_installed_wheel_in_an_empty_folder(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "pipeline", "bundles", "configs"):
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy)(REPO / name, source / name)
    _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", ".",
         cwd=source)
    wheel = next((tmp_path / "dist").glob("*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    shipped = [n.split("/data/share/brain-diffusion-anomaly/", 1)[1] for n in names if "/data/share/" in n]
    assert "bundles/brats_diffusion_anomaly/configs/train.yaml" in shipped
    assert "bundles/brats_diffusion_anomaly/configs/metadata.json" in shipped
    assert "configs/benchmark/default.yaml" in shipped and "configs/schemas/run_record.schema.json" in shipped
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--system-site-packages", venv, cwd=tmp_path)
    _run(venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel, cwd=tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    where = _run(venv / "bin" / "python", "-c", "import pipeline, pipeline.bundle as b; print(pipeline.__file__); "
                 "print(b.BUNDLE_DIR)", cwd=empty).stdout.splitlines()
    assert where[0].startswith(str(venv)) and where[1].startswith(str(venv)), where  # the wheel, not this checkout
    argv = [venv / "bin" / "pipeline", "benchmark", "configs/benchmark/default.yaml", "--quiet"]
    result = _run(*argv, *[x for s in SHRINK for x in ("--set", s)], cwd=empty)
    assert "diffusion-x0-4ch-pos-3draws-s0" in result.stdout and "flair-baseline-s0" in result.stdout
    assert sorted(p.name for p in empty.iterdir()) == ["data", "results"]
    assert (empty / "results" / "leaderboard.csv").is_file()
