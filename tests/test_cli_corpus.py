"""No input reaches a Python traceback at the command line (issue 25).

Every subcommand is fed a corpus of broken datasets, run folders and settings; each must end with exit
code 2 and a single ``error:`` line on stderr (and no traceback). The cases fail before any training, so
the whole corpus runs in seconds.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from test_input_safety import _test_subject_image
from test_leaderboard_integrity import official  # noqa: F401  (module fixture: a protocol and one honest run)

from pipeline.cli import main
from pipeline.common import TASK

TINY = ["--image-size", "32", "--pixdim", "[4.0,4.0,4.0]", "--quiet"]


def _dataset(name: str, root: Path, data: Path) -> Path:
    """A broken copy of the synthetic dataset ``data``; ``name`` says how it is broken."""
    if name == "missing":
        return root / "nowhere"
    out = root / "data"
    shutil.copytree(data, out)
    task = out / TASK
    image = _test_subject_image(out)
    label = task / "labelsTr" / image.name
    if name == "dataset-json":
        (task / "dataset.json").write_text("{not json")
    elif name == "listed-file-missing":
        image.unlink()
    elif name == "truncated":
        image.write_bytes(image.read_bytes()[:200])
    elif name == "not-nifti":
        image.write_bytes(b"hello, not an image")
    elif name == "label-shifted":
        img = nib.load(label)
        affine = img.affine.copy()
        affine[1, 3] += 40
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), affine), str(label))
    elif name == "symlink-loop":
        image.unlink()
        os.symlink(image.with_name("other.nii.gz"), image)
        os.symlink(image, image.with_name("other.nii.gz"))
    return out


DATASETS = ["missing", "dataset-json", "listed-file-missing", "truncated", "not-nifti", "label-shifted",
            "symlink-loop"]


def _one_error_line(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, (argv, captured.err[-2000:])
    assert "Traceback" not in captured.err and "Traceback" not in captured.out, captured.err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.mark.parametrize("broken", DATASETS)
@pytest.mark.parametrize("command", ["prepare", "train", "score", "benchmark"])
def test_every_command_meets_a_broken_dataset_with_one_line(synth_root, tmp_path, capsys, command, broken):
    data = _dataset(broken, tmp_path, synth_root)
    out = tmp_path / "out"
    if command == "prepare":
        argv = ["prepare", "--dataset-dir", str(data), "--split-file", str(out / "split.json"),
                "--cache-dir", str(out / "cache"), "--image-size", "32", "--spacing", "4", "--quiet"]
    elif command == "benchmark":
        protocol = tmp_path / "protocol.yaml"
        protocol.write_text(yaml.safe_dump({"id": "corpus", "dataset": {"dir": str(data)},
                                            "bundle": {"image_size": 32, "pixdim": [4.0, 4.0, 4.0]},
                                            "methods": [{"name": "flair", "sampler": "flair"}]}))
        argv = ["benchmark", str(protocol), "--results", str(out), "--leaderboard", str(out / "lb.csv"), "--quiet"]
    else:
        extra = ["--sampler", "flair"] if command == "score" else ["--train-steps", "1"]
        argv = [command, "--dataset-dir", str(data), "--output-dir", str(out), "--ckpt-dir", str(out / "m"),
                *TINY, *extra]
    _one_error_line(capsys, argv)


def _run_folder(name: str, root: Path, run: Path) -> Path:
    if name == "missing":
        return root / "no-run"
    out = root / "run"
    shutil.copytree(run, out)
    if name == "run-json":
        (out / "run.json").write_text("[1, 2")
    elif name == "no-index":
        (out / "scores" / "index.json").unlink()
    elif name == "index-not-json":
        (out / "scores" / "index.json").write_text("{")
    elif name == "map-nan":
        path = next((out / "scores" / "test").glob("*_score.nii.gz"))
        img = nib.load(path)
        values = np.asarray(img.dataobj, dtype=np.float32).copy()
        values.flat[0] = np.nan
        nib.save(nib.Nifti1Image(values, img.affine), str(path))
    elif name == "map-huge-header":
        path = next((out / "scores" / "test").glob("*_score.nii.gz"))
        header = nib.Nifti1Header()
        header.set_data_shape((2000, 2000, 2000))
        header.set_data_dtype(np.float32)
        import gzip

        path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 68))
    return out


RUNS = ["missing", "run-json", "no-index", "index-not-json", "map-nan", "map-huge-header"]


@pytest.mark.parametrize("command, broken", [("submit", b) for b in RUNS]
                         + [("evaluate", b) for b in RUNS if b != "run-json"])  # evaluate reads scores/ only
def test_evaluate_and_submit_meet_a_broken_run_folder_with_one_line(official, tmp_path, capsys, command, broken):  # noqa: F811
    run = _run_folder(broken, tmp_path, official["run"])
    if command == "evaluate":
        argv = ["evaluate", "--dataset-dir", str(official["dataset"]), "--scores-dir", str(run / "scores"),
                "--evaluation-dir", str(tmp_path / "eval"), "--quiet"]
    else:
        argv = ["leaderboard", "submit", str(run), "--leaderboard", str(tmp_path / "lb.csv"),
                "--protocol", str(official["path"])]
    _one_error_line(capsys, argv)
    assert not (tmp_path / "lb.csv").exists() and not (tmp_path / "eval").exists()


SETTINGS = [
    ["train", "--unet-channels", "[16,16,16]"],
    ["train", "--unet-channels", "[16,32,48]", "--norm-num-groups", "32"],
    ["train", "--noise", "pink"],
    ["train", "--schedule", "quadratic"],
    ["train", "--image-size", "30"],
    ["train", "--modalities", "[FLAIR,PD]"],
    ["score", "--sampler", "magic"],
    ["score", "--residual-sign", "negative"],
    ["score", "--median-3d", "4"],
    ["score", "--residual-norm", "tissue"],
    ["synth", "--healthy", "-1"],
    ["leaderboard", "show", "--leaderboard", "nowhere.csv"],
    ["benchmark", "no-such-protocol.yaml"],
]


@pytest.mark.parametrize("argv", SETTINGS, ids=lambda a: "-".join(x.strip("-[]") for x in a[:3]))
def test_impossible_settings_are_one_line(synth_root, tmp_path, capsys, argv):
    if argv[0] in ("train", "score"):
        argv = [argv[0], "--dataset-dir", str(synth_root), "--output-dir", str(tmp_path / "out"),
                "--ckpt-dir", str(tmp_path / "m"), *TINY, *argv[1:]]
    elif argv[0] == "synth":
        argv = [*argv, "--out", str(tmp_path / "synth"), "--quiet"]
    line = _one_error_line(capsys, argv)
    assert not (tmp_path / "m" / "model.pt").exists()
    json.dumps(line)  # plain text
