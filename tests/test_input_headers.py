"""Input that must fail fast and in one line (issue 25): headers that claim more than a file holds or more than
the limit, degenerate affines, labels off their image's grid, symlink loops, impossible network settings."""

from __future__ import annotations

import gzip
import os
import resource
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_input_safety import PREPARE, _test_subject_image, error_line

from pipeline.cli import main
from pipeline.data.transforms import MAX_VOXELS, check_header


def _prepare(dataset: Path, out: Path) -> int:
    return main(["prepare", "--dataset-dir", str(dataset), "--split-file", str(out / "split.json"),
                 "--cache-dir", str(out / "cache"), *PREPARE])


def _header_only(path: Path, shape: tuple, dtype=np.float32) -> None:
    """A gzip NIfTI whose header claims ``shape`` but which holds a handful of bytes of data."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_qform(np.diag([2.0, 2.0, 2.0, 1.0]), code=1)
    header.set_sform(np.diag([2.0, 2.0, 2.0, 1.0]), code=1)
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4 + b"\0" * 64))


def _relabel(path: Path, affine: np.ndarray) -> None:
    """Rewrite the file's affine; a singular one is written into the sform alone (the qform cannot hold it)."""
    image = nib.load(path)
    header = image.header.copy()
    header.set_qform(None, code=0)
    header.set_sform(affine, code=1)
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), None, header=header), str(path))


@pytest.mark.parametrize("shape, words", [((600, 600, 600, 4), "more than a"),
                                          ((30000, 30000, 30000), "over the limit")])
def test_a_header_claiming_a_huge_image_is_refused_before_any_voxel_is_read(dataset_copy, tmp_path, capsys,
                                                                            shape, words):
    image = _test_subject_image(dataset_copy)
    _header_only(image, shape)
    assert image.stat().st_size < 1000
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (8 * 2**30, hard))  # reading 3.5 GB of voxels first would fail here
    try:
        code = _prepare(dataset_copy, tmp_path / "out")
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    line = error_line(capsys)
    assert code == 2 and str(image) in line and words in line, line
    assert not (tmp_path / "out").exists()


def test_check_header_limits(tmp_path):
    small = tmp_path / "small.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), str(small))
    assert check_header(small).shape == (4, 4, 4)
    plain = tmp_path / "cut.nii"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)), str(plain))
    plain.write_bytes(plain.read_bytes()[:-100])
    with pytest.raises(Exception, match="truncated: header claims 2,048 bytes"):
        check_header(plain)
    assert MAX_VOXELS >= 240 * 240 * 155 * 4 * 8, "room for real BraTS images at 1 mm, with margin"


@pytest.mark.parametrize("which, affine, words", [
    ("label", np.zeros((4, 4)), "degenerate affine"),
    ("label", "shift", "label affine differs"),
    ("image", np.zeros((4, 4)), "degenerate affine"),
])
def test_degenerate_or_shifted_affines_are_one_line(dataset_copy, tmp_path, capsys, which, affine, words):
    image = _test_subject_image(dataset_copy)
    path = image if which == "image" else image.parent.parent / "labelsTr" / image.name
    if isinstance(affine, str):  # the label 40 mm off its image
        affine = nib.load(path).affine.copy()
        affine[0, 3] += 40.0
    _relabel(path, affine)
    code = _prepare(dataset_copy, tmp_path / "out")
    line = error_line(capsys)
    assert code == 2 and str(path) in line and words in line, line
    assert not (tmp_path / "out").exists()


def test_a_symlink_loop_in_the_dataset_is_one_line(dataset_copy, tmp_path, capsys):
    image = _test_subject_image(dataset_copy)
    image.unlink()
    loop = image.parent / "loop.nii.gz"
    os.symlink(loop, image)
    os.symlink(image, loop)
    code = _prepare(dataset_copy, tmp_path / "out")
    line = error_line(capsys)
    assert code == 2 and "cannot be resolved" in line and "dataset.json" in line, line


def test_an_impossible_network_is_one_line_naming_the_settings(dataset_copy, tmp_path, capsys):
    code = main(["train", "--quiet", "--dataset-dir", str(dataset_copy), "--output-dir", str(tmp_path / "out"),
                 "--ckpt-dir", str(tmp_path / "ckpt"), "--unet-channels", "[16,16,16]", "--image-size", "32",
                 "--pixdim", "[4.0,4.0,4.0]", "--train-steps", "1"])
    line = error_line(capsys)
    assert code == 2 and "unet_channels" in line and "num_head_channels=32" in line, line
