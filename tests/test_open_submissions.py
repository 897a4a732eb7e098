"""Open submissions (issue 27): the README's organiser walk-through run as written, the kit's contents, maps
made elsewhere checked and submitted, self-reported figures marked, and the reproduced badge.

The walk-through (README, between the ``walkthrough`` markers) is run once by bash in a fresh folder: a
hidden-label dataset, ``leaderboard init``, the kit, two participants' maps from their own code, one
pipeline run (the FLAIR baseline), the site and ``verify``. The other tests read what it left.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from test_leaderboard_integrity import cli_error

from pipeline.cli import main
from pipeline.common import check_schema
from pipeline.data.dataset import load_subjects
from pipeline.leaderboard.submission import read_leaderboard

REPO = Path(__file__).resolve().parent.parent
BOARD = "board/leaderboard.csv"
PROTOCOL = "public-demo-v1"


def walkthrough_script() -> str:
    text = (REPO / "README.md").read_text()
    block = re.search(r"<!-- walkthrough:begin -->\n```bash\n(.*?)```\n<!-- walkthrough:end -->", text, re.S)
    assert block, "README lost its walk-through block"
    return block.group(1)


@pytest.fixture(scope="module")
def walked(tmp_path_factory) -> Path:
    """The folder the README's walk-through ran in (exit 0 required)."""
    folder = tmp_path_factory.mktemp("walkthrough")
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", walkthrough_script()], cwd=folder,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (folder / "stdout.txt").write_text(result.stdout)
    return folder


def _table(folder: Path) -> pd.DataFrame:
    return read_leaderboard(folder / BOARD)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_walkthrough_ranks_two_external_rows_and_a_reproduced_pipeline_row(walked):
    table = _table(walked)
    assert sorted(table["method"]) == ["flair-baseline-s0", "flair-t2", "t2-only"]
    source = dict(zip(table["method"], table["source"]))
    assert source == {"flair-baseline-s0": "pipeline run", "flair-t2": "external maps", "t2-only": "external maps"}
    reproduced = dict(zip(table["method"], table["reproduced"]))
    assert reproduced["flair-baseline-s0"] == "reproduced" and reproduced["t2-only"] == ""
    assert (walked / "board" / "site" / "index.html").is_file()
    site = (walked / "board" / "site" / "index.html").read_text()
    assert ">external</span>" in site and ">reproduced</span>" in site
    assert "| pipeline run, reproduced |" in (walked / "stdout.txt").read_text()


def test_kit_holds_validation_and_test_images_validation_labels_and_no_test_label(walked):
    kit = walked / "kit"
    manifest = json.loads((kit / "kit.json").read_text())
    check_schema(manifest, "kit_manifest", kit / "kit.json")
    split = manifest["split"]
    images = {p.name.split(".")[0] for p in (kit / "images").iterdir()}
    labels = {p.name.split(".")[0] for p in (kit / "labels").iterdir()}
    assert images == set(split["validation"]) | set(split["test"])
    assert labels == set(split["validation"])
    hidden = {_sha(p) for p in (walked / "organiser" / "gt" / "labelsTs").iterdir()}
    assert hidden and not hidden & {_sha(p) for p in kit.rglob("*.nii*")}, "a hidden test label is in the kit"
    items = {item["subject"]: item for item in load_subjects(walked / "public").data}
    for subject, entry in manifest["subjects"].items():
        image = nib.load(items[subject]["image"])
        grid = nib.load(kit / entry["grid"]["file"])
        assert list(grid.shape) == list(image.shape[:3]) == entry["grid"]["shape"]
        assert np.allclose(grid.affine, image.affine) and np.allclose(entry["grid"]["affine"], image.affine, atol=1e-6)
        assert _sha(kit / entry["image"]) == _sha(Path(items[subject]["image"]))
    text = (kit / "SUBMITTING.md").read_text()
    assert PROTOCOL in text and "submit-maps" in text


def test_external_rows_state_nothing_unchecked_and_pipeline_rows_mark_what_they_state(walked):
    table = _table(walked).set_index("method")
    external = table.loc["t2-only"]
    assert all(pd.isna(external[c]) for c in ("psnr", "ssim", "healthy_residual", "train_seconds"))
    assert external["self_reported"] == "" and external["code_version"] == "external"
    first = table.loc["flair-t2"]
    assert first["description"] == "mean of FLAIR and T2" and first["code_url"] == "https://example.org/flair-t2"
    pipeline_row = table.loc["flair-baseline-s0"]
    assert "healthy_residual" in pipeline_row["self_reported"].split()
    assert "train_seconds" in pipeline_row["self_reported"].split()
    run = json.loads((Path(external["run_dir"]) / "run.json").read_text())
    assert run["source"] == "external maps" and run["protocol"]["id"] == PROTOCOL
    assert (Path(external["run_dir"]) / "evaluation" / "report.png").is_file()


def _maps_copy(walked: Path, tmp_path: Path) -> Path:
    maps = tmp_path / "maps"
    shutil.copytree(walked / "maps-t2-only", maps)
    return maps


def _break_first_map(maps: Path, how: str) -> Path:
    first = sorted(maps.iterdir())[0]
    img = nib.load(first)
    data = np.asarray(img.dataobj, dtype=np.float32)
    if how == "nan":
        data[0, 0, 0] = np.nan
        nib.save(nib.Nifti1Image(data, img.affine, img.header), first)
    elif how == "flipped":
        affine = img.affine.copy()
        affine[0, 0] = -affine[0, 0]
        nib.save(nib.Nifti1Image(data, affine), first)
    elif how == "shape":
        nib.save(nib.Nifti1Image(data[:-1], img.affine, img.header), first)
    elif how == "missing":
        first.unlink()
    elif how == "extra":
        shutil.copyfile(first, maps / "BRATS_999.nii.gz")
    elif how == "channel":
        nib.save(nib.Nifti1Image(data[..., None], img.affine), first)
    elif how == "not-nifti":
        first.write_bytes(b"this is not a NIfTI file" * 40)
    return first


@pytest.mark.parametrize("how, says", [("nan", "NaN"), ("flipped", "affine"), ("shape", "shape"),
                                       ("channel", "shape"), ("not-nifti", "not a readable NIfTI"),
                                       ("missing", "no map for 1 subject"), ("extra", "BRATS_999")])
def test_a_faulty_map_folder_is_refused_in_one_line_and_nothing_is_written(walked, tmp_path, capsys, how, says):
    maps = _maps_copy(walked, tmp_path)
    broken = _break_first_map(maps, how)
    before = (walked / BOARD).read_bytes()
    run_dir = tmp_path / "run"
    line = cli_error(capsys, ["leaderboard", "submit-maps", str(maps), "--protocol-id", PROTOCOL, "--method",
                                    "broken", "--supervision", "unsupervised", "--ground-truth",
                                    str(walked / "organiser" / "gt"), "--leaderboard", str(walked / BOARD),
                                    "--run-dir", str(run_dir), "--quiet"])
    assert says in line
    if how in ("nan", "flipped", "shape", "channel", "not-nifti"):
        assert broken.name in line, "the error names the file"
    assert (walked / BOARD).read_bytes() == before and not run_dir.exists()


@pytest.mark.parametrize("flag, value, says", [("--supervision", "fully supervised", "invalid choice"),
                                               ("--code-url", "javascript:alert(1)", "http(s) URL"),
                                               ("--method", "../x", "method name")])
def test_bad_submission_details_are_refused_before_any_map_is_read(walked, tmp_path, capsys, flag, value, says):
    argv = {"--supervision": "unsupervised", "--method": "ok-name"}
    argv[flag] = value
    line = cli_error(capsys, ["leaderboard", "submit-maps", str(tmp_path / "nowhere"), "--protocol-id", PROTOCOL,
                                    *[x for k, v in argv.items() for x in (k, v)],
                                    "--leaderboard", str(walked / BOARD), "--quiet"])
    assert says in line


def test_hidden_labels_are_required_for_external_maps_of_a_hidden_protocol(walked, tmp_path, capsys):
    maps = _maps_copy(walked, tmp_path)
    line = cli_error(capsys, ["leaderboard", "submit-maps", str(maps), "--protocol-id", PROTOCOL, "--method",
                                    "no-truth", "--supervision", "unsupervised", "--leaderboard", str(walked / BOARD),
                                    "--run-dir", str(tmp_path / "run"), "--quiet"])
    assert "hidden" in line and not (tmp_path / "run").exists()


def test_verify_says_not_reproduced_when_the_maps_were_not_the_recorded_runs(walked, tmp_path, capsys):
    """A pipeline run whose test maps were swapped before submission: the re-run disagrees."""
    board = walked / BOARD
    original = Path(_table(walked).set_index("method").loc["flair-baseline-s0", "run_dir"])
    run = tmp_path / "tampered"
    shutil.copytree(original, run)
    record = json.loads((run / "run.json").read_text())
    record["method"] = "flair-baseline-tampered"
    (run / "run.json").write_text(json.dumps(record))
    rng = np.random.default_rng(0)
    for path in (run / "scores" / "test").glob("*.nii.gz"):
        img = nib.load(path)
        noisy = np.asarray(img.dataobj, dtype=np.float32) + 300 * rng.random(img.shape, dtype=np.float32)
        nib.save(nib.Nifti1Image(noisy, img.affine, img.header), path)
    gt = str(walked / "organiser" / "gt")
    assert main(["leaderboard", "submit", str(run), "--leaderboard", str(board), "--ground-truth", gt, "--quiet"]) == 0
    row_id = _table(walked).set_index("method").loc["flair-baseline-tampered", "row_id"]
    capsys.readouterr()
    assert main(["leaderboard", "verify", row_id, "--leaderboard", str(board), "--ground-truth", gt, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "not reproduced" in out and "auprc" in out
    assert _table(walked).set_index("method").loc["flair-baseline-tampered", "reproduced"] == "not reproduced"


def test_verify_refuses_external_rows(walked, capsys):
    row_id = _table(walked).set_index("method").loc["t2-only", "row_id"]
    line = cli_error(capsys, ["leaderboard", "verify", row_id, "--leaderboard", str(walked / BOARD), "--quiet"])
    assert "external maps" in line


def test_maps_for_a_protocol_the_leaderboard_does_not_hold_are_refused(walked, tmp_path, capsys):
    line = cli_error(capsys, ["leaderboard", "submit-maps", str(_maps_copy(walked, tmp_path)), "--protocol-id",
                                    "public-demo-v2", "--method", "x", "--supervision", "unsupervised",
                                    "--leaderboard", str(walked / BOARD), "--run-dir", str(tmp_path / "run"), "--quiet"])
    assert "'public-demo-v2' is not registered" in line and not (tmp_path / "run").exists()


def test_an_external_row_has_the_metrics_pipeline_evaluate_gives_on_the_same_maps(walked, tmp_path):
    row = _table(walked).set_index("method").loc["t2-only"]
    out = tmp_path / "evaluation"
    assert main(["evaluate", "--dataset-dir", str(walked / "public"), "--scores-dir", str(Path(row["run_dir"]) / "scores"),
                 "--evaluation-dir", str(out), "--ground-truth-dir", str(walked / "organiser" / "gt"),
                 "--bootstrap-resamples", str(int(row["n_boot"])), "--quiet"]) == 0
    test = json.loads((out / "metrics.json").read_text())["test"]
    for metric in ("auroc", "auprc", "dice", "dice_oracle", "subject_auroc"):
        assert row[metric] == pytest.approx(test[metric], abs=1e-12), metric
    assert row["fp_ml_healthy"] == pytest.approx(test["false_positive_ml_healthy"], abs=1e-12)
    assert [row["auprc_ci_low"], row["auprc_ci_high"]] == pytest.approx(test["ci95"]["auprc"], abs=1e-12)
