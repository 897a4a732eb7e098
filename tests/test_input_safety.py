"""Untrusted input: config expressions, dataset.json paths, prepare leftovers, hidden test labels.

Each attempt goes through ``pipeline.cli.main`` as a user would type it, and must end with one
line ``error: <where>: <problem>`` and exit code 2, leaving nothing behind.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from pipeline.atomic import write_json
from pipeline.protocols import load_protocol
from pipeline.cli import main
from pipeline.common import TASK
from pipeline.data.dataset import dataset_fingerprint, dataset_split, load_subjects
from pipeline.data.split import make_split
from pipeline.leaderboard.registry import DATASET_LABELS, registry_path, split_fingerprint
from pipeline.leaderboard.submission import read_leaderboard

PREPARE = ["--image-size", "32", "--spacing", "4", "--workers", "1", "--quiet"]


def error_line(capsys) -> str:
    """The single ``error:`` line of a failed command (and no traceback)."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def touch_expression(marker: Path, result: str = "'x'") -> str:
    """A ``$`` value that leaves ``marker`` behind when MONAI's config parser evaluates it."""
    return f"$__import__('pathlib').Path('{marker}').touch() or {result}"


# ----------------------------------------------------------------------------------------------
# expressions are code


PREFIXED = {"$": "$__import__('os').getcwd()", "@": "@seed", "%": "%common.yaml::seed"}


@pytest.mark.parametrize("prefix", list(PREFIXED))
@pytest.mark.parametrize("where", ["bundle", "methods"])
def test_protocol_expressions_are_refused(tmp_path, capsys, prefix, where):
    protocol = {"id": "expr", "dataset": {"dir": str(tmp_path / "data")},
                "methods": [{"name": "flair-baseline", "sampler": "flair"}]}
    if where == "bundle":
        protocol["bundle"] = {"image_size": PREFIXED[prefix]}
    else:
        protocol["methods"][0]["median_size"] = PREFIXED[prefix]
    path = tmp_path / "protocol.yaml"
    path.write_text(yaml.safe_dump(protocol))
    code = main(["benchmark", str(path), "--results", str(tmp_path / "results"), "--leaderboard",
                 str(tmp_path / "lb.csv"), "--quiet"])
    line = error_line(capsys)
    assert code == 2
    assert str(path) in line and ("bundle.image_size" if where == "bundle" else "methods[0].median_size") in line
    assert f"starts with {prefix!r}" in line and "--trust-expressions" in line
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("prefix", list(PREFIXED))
def test_set_expressions_are_refused(tmp_path, capsys, prefix):
    path = tmp_path / "protocol.yaml"
    path.write_text(yaml.safe_dump({"id": "expr", "dataset": {"dir": str(tmp_path / "data")}, "bundle": {},
                                    "methods": [{"name": "flair-baseline", "sampler": "flair"}]}))
    code = main(["benchmark", str(path), "--results", str(tmp_path / "results"), "--quiet",
                 "--set", f"bundle.image_size={json.dumps(PREFIXED[prefix])}"])  # '@', '%' must be quoted in YAML
    line = error_line(capsys)
    assert code == 2 and "command line" in line and "--set bundle.image_size" in line and f"{prefix!r}" in line


@pytest.mark.parametrize("value, where", [
    *[(json.dumps(v), "--evaluation_dir") for v in PREFIXED.values()],
    ("[FLAIR, '@seed']", "--modalities[1]"),  # nested in a list
    ("{_target_: os.system, command: 'true'}", "--evaluation._target_"),  # instantiates any callable
    ("x", "--bundle_dir"),  # would load other configs
])
def test_cli_override_expressions_are_refused(synth_root, tmp_path, capsys, value, where):
    key = where[2:].split(".")[0].split("[")[0]
    code = main(["evaluate", "--dataset_dir", str(synth_root), "--scores_dir", str(tmp_path / "none"),
                 f"--{key}", value])
    line = error_line(capsys)
    assert code == 2 and line.startswith("error: command line: ") and f"{where}:" in line


def test_cli_override_expression_runs_only_with_trust(synth_root, tmp_path, capsys):
    marker = tmp_path / "evaluated"
    settings = ["--dataset_dir", str(synth_root), "--scores_dir", str(tmp_path / "none"),
                "--evaluation_dir", touch_expression(marker)]
    assert main(["evaluate", *settings]) == 2
    assert "--evaluation_dir" in error_line(capsys) and not marker.exists()
    assert main(["evaluate", "--trust-expressions", *settings]) == 2  # no scores there: fails after evaluating
    assert "scores index not found" in error_line(capsys) and marker.exists()


def test_protocol_and_set_expressions_run_only_with_trust(synth_root, tmp_path, capsys):
    path = tmp_path / "protocol.yaml"
    marker = tmp_path / "evaluated"
    path.write_text(yaml.safe_dump({"id": "expr", "dataset": {"dir": str(synth_root)},
                                    "bundle": {"image_size": touch_expression(marker, "4")},
                                    "methods": [{"name": "flair-baseline", "sampler": "flair"}]}))
    args = ["benchmark", str(path), "--results", str(tmp_path / "results"), "--quiet"]
    assert main(args) == 2 and not marker.exists()
    capsys.readouterr()
    # trusted: evaluated (image_size 4 is then refused by the data stage, before any work)
    assert main([*args, "--trust-expressions"]) == 2
    assert "image_size" in error_line(capsys) and marker.exists()
    marker.unlink()
    path.write_text(yaml.safe_dump({"id": "expr", "dataset": {"dir": str(synth_root)}, "bundle": {"image_size": 32},
                                    "methods": [{"name": "flair-baseline", "sampler": "flair"}]}))
    assert main([*args, "--set", f"bundle.image_size={touch_expression(marker, '4')}", "--trust-expressions"]) == 2
    assert "image_size" in error_line(capsys) and marker.exists()


# ----------------------------------------------------------------------------------------------
# dataset.json paths stay inside the dataset folder


def _edit_dataset_json(root: Path, fn) -> None:
    path = root / TASK / "dataset.json"
    meta = json.loads(path.read_text())
    fn(meta)
    path.write_text(json.dumps(meta))


def _absolute(root: Path) -> None:
    _edit_dataset_json(root, lambda m: m["training"][0].update(image="/etc/passwd"))


def _dotdot(root: Path) -> None:
    _edit_dataset_json(root, lambda m: m["training"][0].update(label="../x/labelsTr/BRATS_001.nii.gz"))


def _test_image_absolute(root: Path) -> None:
    _edit_dataset_json(root, lambda m: m.update(test=["/etc/passwd"], numTest=1))


def _symlinked_file(root: Path) -> None:
    image = root / TASK / "imagesTr" / "BRATS_001.nii.gz"
    outside = root.parent / "outside.nii.gz"
    shutil.move(image, outside)
    image.symlink_to(outside)


def _symlinked_folder(root: Path) -> None:
    folder = root / TASK / "labelsTr"
    shutil.move(folder, root.parent / "labels-elsewhere")
    folder.symlink_to(root.parent / "labels-elsewhere", target_is_directory=True)


ESCAPES = {
    "absolute path": (_absolute, "training[0].image '/etc/passwd' is an absolute path"),
    "'..' component": (_dotdot, "training[0].label '../x/labelsTr/BRATS_001.nii.gz' contains '..'"),
    "/etc/passwd as a test image": (_test_image_absolute, "test[0] '/etc/passwd' is an absolute path"),
    "symlinked file leaving": (_symlinked_file, "training[0].image './imagesTr/BRATS_001.nii.gz' leaves the dataset"),
    "symlinked folder leaving": (_symlinked_folder,
                                 "training[0].label './labelsTr/BRATS_001.nii.gz' leaves the dataset"),
}


@pytest.mark.parametrize("case", list(ESCAPES))
def test_dataset_paths_leaving_the_folder_are_refused(dataset_copy, tmp_path, capsys, case):
    escape, message = ESCAPES[case]
    escape(dataset_copy)
    out = tmp_path / "out"
    code = main(["prepare", "--dataset-dir", str(dataset_copy), "--split-file", str(out / "split.json"),
                 "--cache-dir", str(out / "cache"), *PREPARE])
    line = error_line(capsys)
    assert code == 2
    assert f"{TASK}/dataset.json: " in line and message in line, line
    assert not out.exists()


def test_symlink_inside_the_folder_is_fine(dataset_copy):
    task = dataset_copy / TASK
    store = task / "store"
    store.mkdir()
    image = task / "imagesTr" / "BRATS_001.nii.gz"
    shutil.move(image, store / image.name)
    image.symlink_to(store / image.name)
    assert len(load_subjects(dataset_copy).data) == 8


# ----------------------------------------------------------------------------------------------
# prepare reads every subject and leaves nothing behind when it fails


def _test_subject_image(root: Path) -> Path:
    subjects = [item["subject"] for item in load_subjects(root).data]
    return root / TASK / "imagesTr" / f"{make_split(subjects, seed=0)['test'][0]}.nii.gz"


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_corrupt_test_subject_is_found_and_nothing_is_left(dataset_copy, tmp_path, capsys):
    image = _test_subject_image(dataset_copy)
    _truncate(image)
    created = tmp_path / "new" / "deeper"
    code = main(["prepare", "--dataset-dir", str(dataset_copy), "--split-file", str(created / "split.json"),
                 "--cache-dir", str(created / "cache"), *PREPARE])
    line = error_line(capsys)
    assert code == 2 and str(image) in line and "truncated or corrupt" in line, line
    assert not (tmp_path / "new").exists(), "prepare removes the folders it created"


def test_failed_prepare_keeps_what_existed(dataset_copy, tmp_path, capsys):
    _truncate(_test_subject_image(dataset_copy))
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "keep.txt").write_text("someone else's")
    code = main(["prepare", "--dataset-dir", str(dataset_copy), "--split-file", str(tmp_path / "split.json"),
                 "--cache-dir", str(shared), *PREPARE])
    assert code == 2 and "truncated" in error_line(capsys)
    assert sorted(p.name for p in shared.iterdir()) == ["keep.txt"], "no lock file, no cache folder"
    assert not (tmp_path / "split.json").exists()
    (shared / ".prepare.lock").touch()  # another preparer's lock file is not ours to remove
    assert main(["prepare", "--dataset-dir", str(dataset_copy), "--split-file", str(tmp_path / "split.json"),
                 "--cache-dir", str(shared), *PREPARE]) == 2
    assert sorted(p.name for p in shared.iterdir()) == [".prepare.lock", "keep.txt"]


# ----------------------------------------------------------------------------------------------
# hidden ground truth


@pytest.fixture(scope="module")
def hidden(tmp_path_factory):
    """A public-leaderboard dataset (test labels in a separate folder) and a split seed whose
    validation section holds healthy and tumour subjects."""
    root = tmp_path_factory.mktemp("hidden")
    data, truth = root / "data", root / "ground-truth"
    assert main(["synth", "--out", str(data), "--healthy", "4", "--tumour", "6", "--seed", "5", "--spacing", "4",
                 "--quiet", "--hidden-test-labels", str(truth), "--test-fraction", "0.3"]) == 0
    healthy = set(json.loads((data / TASK / "dataset.json").read_text())["synthetic"]["healthy"])
    seed = next(s for s in range(50) if 0 < len(healthy & set(dataset_split(data, seed=s)["validation"])) < 2)
    return {"data": data, "truth": truth, "seed": seed, "split": dataset_split(data, seed=seed)}


def test_hidden_dataset_holds_no_test_labels(hidden):
    task, truth, test = hidden["data"] / TASK, hidden["truth"], hidden["split"]["test"]
    meta = json.loads((task / "dataset.json").read_text())
    assert len(test) == 3 and meta["hiddenTestLabels"] is True
    assert meta["test"] == [f"./imagesTs/{s}.nii.gz" for s in test] and meta["numTest"] == 3
    assert "seed" not in meta["synthetic"] and not set(test) & set(meta["synthetic"]["healthy"])
    in_dataset = sorted(str(p.relative_to(task)) for p in task.rglob("*") if p.name.split(".")[0] in test)
    assert in_dataset == [f"imagesTs/{s}.nii.gz" for s in test], "test subjects appear only as images"
    assert sorted(p.name for p in (truth / "labelsTs").iterdir()) == [f"{s}.nii.gz" for s in test]
    assert json.loads((truth / "synthetic.json").read_text())["seed"] == 5
    split = hidden["split"]
    assert not set(split["train"] + split["validation"]) & set(test)
    assert dataset_split(hidden["data"], seed=hidden["seed"] + 1)["test"] == test, "the test split is fixed"


def test_hidden_test_subjects_are_scored_and_evaluated_with_ground_truth(hidden, tmp_path, capsys):
    out = tmp_path / "out"
    settings = ["--dataset_dir", str(hidden["data"]), "--output_dir", str(out), "--image_size", "32",
                "--pixdim", "[4.0,4.0,4.0]", "--sampler", "flair", "--progress", "false", "--bootstrap_resamples", "20",
                "--split_seed", str(hidden["seed"])]
    assert main(["score", *settings]) == 0
    assert json.loads((out / "split.json").read_text())["test"] == hidden["split"]["test"]
    index = json.loads((out / "scores" / "index.json").read_text())
    assert sorted(s for s, row in index["subjects"].items() if row["section"] == "test") == hidden["split"]["test"]
    assert main(["evaluate", *settings]) == 2
    assert "imagesTs" in (line := error_line(capsys)) and "test label is hidden" in line
    assert main(["evaluate", *settings, "--ground_truth_dir", str(hidden["truth"])]) == 0
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())["test"]
    assert metrics["subjects"] == 3 and metrics["healthy_subjects"] == 1 and metrics["auprc"] > 0.3


def test_organiser_benchmarks_a_hidden_label_dataset_with_its_ground_truth(hidden, tmp_path, capsys):
    """`pipeline benchmark --ground-truth`: the organiser's baseline entries on a public dataset."""
    protocol = tmp_path / "public.yaml"
    protocol.write_text(yaml.safe_dump({
        "id": "hidden-bench-v1", "dataset": {"dir": str(hidden["data"])}, "split": {"seed": hidden["seed"]},
        "bundle": {"image_size": 32, "pixdim": [4.0, 4.0, 4.0]}, "evaluation": {"bootstrap_resamples": 20},
        "methods": [{"name": "flair-baseline", "sampler": "flair"}]}))
    csv_path = tmp_path / "lb.csv"
    command = ["benchmark", str(protocol), "--results", str(tmp_path / "results"), "--leaderboard", str(csv_path),
               "--quiet"]
    assert main(["leaderboard", "init", "--protocol", str(protocol), "--leaderboard", str(csv_path),
                 "--ground-truth", str(hidden["truth"])]) == 0  # only the organiser binds a hidden-label protocol
    assert main(command) == 2
    assert "test label is hidden" in error_line(capsys) and not csv_path.exists()
    assert main([*command, "--ground-truth", str(hidden["truth"])]) == 0
    row = read_leaderboard(csv_path).iloc[0]
    assert row["method"] == "flair-baseline-s0" and row["test_subjects"] == 3 and row["auprc"] > 0.3


def test_maps_made_from_hidden_labels_are_scored_with_ground_truth(hidden, tmp_path, capsys):
    """What only the organiser can do: maps made from the hidden labels, submitted with --ground-truth."""
    data, truth, split = hidden["data"], hidden["truth"], hidden["split"]
    protocol_path = tmp_path / "protocol.yaml"
    protocol_path.write_text(yaml.safe_dump({"id": "hidden-gt-v1", "dataset": {"dir": str(data)},
                                             "split": {"seed": hidden["seed"]},
                                             "methods": [{"name": "from-labels", "sampler": "flair"}]}))
    protocol = load_protocol(protocol_path)
    run = tmp_path / "run"
    items = {item["subject"]: item for item in load_subjects(data).data}
    subjects = {}
    for section in ("validation", "test"):
        (run / "scores" / section).mkdir(parents=True)
        for name in split[section]:
            label_path = items[name].get("label") or truth / "labelsTs" / f"{name}.nii.gz"
            label = nib.load(label_path)
            score = (np.asarray(label.dataobj) > 0).astype(np.float32)
            nib.save(nib.Nifti1Image(score, nib.load(items[name]["image"]).affine),
                     run / "scores" / section / f"{name}_score.nii.gz")
            subjects[name] = {"section": section, "files": {"score": f"{section}/{name}_score.nii.gz"}}
    write_json(run / "scores" / "index.json", {"format": 2, "settings": {"sampler": "labels"}, "subjects": subjects})
    write_json(run / "run.json", {
        "method": "from-labels", "protocol": {"id": protocol["id"], "hash": protocol["hash"]},
        "dataset": {"fingerprint": dataset_fingerprint(data)}, "split": {"fingerprint": split_fingerprint(split)},
        "config_hash": "0" * 16, "seed": 0, "code_version": "test", "hardware": "cpu",
        "supervision": "unsupervised"})
    csv_path = tmp_path / "lb.csv"
    submit = ["leaderboard", "submit", str(run), "--protocol", str(protocol_path), "--leaderboard", str(csv_path)]
    assert main(submit) == 2
    assert "only the organiser binds it" in error_line(capsys)
    init = ["leaderboard", "init", "--protocol", str(protocol_path), "--leaderboard", str(csv_path)]
    assert main([*init, "--ground-truth", str(tmp_path / "missing")]) == 2
    assert "no hidden label for test subject" in error_line(capsys)
    assert main([*init, "--ground-truth", str(truth)]) == 0
    assert main(submit) == 2
    assert "this submission brings dataset labels" in error_line(capsys)
    assert main([*submit, "--ground-truth", str(truth)]) == 0
    row = read_leaderboard(csv_path).iloc[0]
    assert row["test_subjects"] == 3 and row["auprc"] == pytest.approx(1.0) and row["dice"] == pytest.approx(1.0)
    bound = json.loads(registry_path(csv_path).read_text())["hidden-gt-v1"]["ground_truth"]
    assert bound != DATASET_LABELS, "the hidden labels are bound by fingerprint"

    # the protocol's rows were scored against these labels: other labels, or none, are refused
    edited = tmp_path / "edited-truth"
    shutil.copytree(truth, edited)
    label_path = edited / "labelsTs" / f"{split['test'][0]}.nii.gz"
    label = nib.load(label_path)
    nib.save(nib.Nifti1Image(np.zeros(label.shape, np.uint8), label.affine), label_path)
    assert main([*submit, "--ground-truth", str(edited)]) == 2
    assert f"hidden labels with fingerprint {bound}" in (line := error_line(capsys)) and str(edited) in line
    assert main(submit) == 2
    assert "this submission brings dataset labels" in error_line(capsys)
    assert len(read_leaderboard(csv_path)) == 1
