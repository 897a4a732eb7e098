"""Synthetic BraTS-like data: MSD layout, determinism, physics-driven contrast, MONAI loading."""

from __future__ import annotations

import json

import monai
import nibabel as nib
import numpy as np
import pytest

from pipeline.data import phantom, synth
from pipeline.errors import InputError

SEED, SPACING, N_HEALTHY, N_TUMOUR = 3, 4.0, 2, 3


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """One small dataset, generated in parallel, shared by the tests below."""
    return synth.generate_dataset(tmp_path_factory.mktemp("a"), N_HEALTHY, N_TUMOUR, seed=SEED,
                                  spacing=SPACING, workers=2, progress=False)


@pytest.fixture(scope="module")
def meta(task):
    """The dataset.json of the shared dataset."""
    return json.loads((task / "dataset.json").read_text())


def _subjects(task, meta):
    """(index, healthy, image NIfTI, label NIfTI) for every training subject, in dataset.json order."""
    healthy = set(meta["synthetic"]["healthy"])
    for entry in meta["training"]:
        name = entry["image"].split("/")[-1].split(".")[0]
        index = int(name.split("_")[1])
        yield index, name in healthy, nib.load(task / entry["image"]), nib.load(task / entry["label"])


def test_layout_and_dataset_json(task, meta):
    assert task.name == "Task01_BrainTumour"
    assert sorted(p.name for p in task.iterdir()) == ["LICENSE_MNI.txt", "dataset.json", "imagesTr",
                                                      "imagesTs", "labelsTr"]
    assert not any((task / "imagesTs").iterdir())
    n = N_HEALTHY + N_TUMOUR
    assert len(list((task / "imagesTr").glob("BRATS_*.nii.gz"))) == n
    assert len(list((task / "labelsTr").glob("BRATS_*.nii.gz"))) == n
    for key in ("name", "description", "reference", "licence", "release", "tensorImageSize", "modality",
                "labels", "numTraining", "numTest", "training", "test", "synthetic"):
        assert key in meta
    assert meta["name"] == "BRATS" and meta["tensorImageSize"] == "4D"
    assert meta["modality"] == {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
    assert meta["labels"] == {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}
    assert meta["numTraining"] == n and meta["numTest"] == 0 and meta["test"] == []
    assert meta["training"][0] == {"image": "./imagesTr/BRATS_001.nii.gz", "label": "./labelsTr/BRATS_001.nii.gz"}
    info = meta["synthetic"]
    assert (info["seed"], info["spacing"], info["n_healthy"], info["n_tumour"]) == (SEED, SPACING, N_HEALTHY, N_TUMOUR)
    assert len(info["healthy"]) == N_HEALTHY
    assert "Louis Collins" in (task / "LICENSE_MNI.txt").read_text() and "Louis Collins" in info["copyright"]


def test_images_and_labels(task, meta):
    shape = tuple(round(mm / SPACING) for mm in phantom.CANVAS_MM)
    for index, healthy, img, lab in _subjects(task, meta):
        image, label = np.asarray(img.dataobj), np.asarray(lab.dataobj)
        assert image.shape == shape + (4,) and label.shape == shape
        assert img.get_data_dtype() == np.float32 and lab.get_data_dtype() == np.uint8
        np.testing.assert_allclose(img.affine, lab.affine)
        np.testing.assert_allclose(np.diag(img.affine)[:3], SPACING)
        brain = image.any(-1)
        assert np.all(image[~brain] == 0) and np.all(image >= 0)
        assert not (brain[[0, -1]].any() or brain[:, [0, -1]].any() or brain[:, :, [0, -1]].any())
        assert set(np.unique(label)) <= {0, 1, 2, 3} and not np.any(label[~brain])
        if healthy:
            assert not label.any()
        else:
            assert {1, 2, 3} <= set(np.unique(label))
            whole = np.count_nonzero(label) / np.count_nonzero(brain)
            assert 0.015 < whole < 0.1
        expected = phantom.make_subject(index, not healthy, SEED, SPACING)
        np.testing.assert_array_equal(image, expected[0])
        np.testing.assert_array_equal(label, expected[1])


@pytest.mark.parametrize("index", [1, 2])
def test_tumour_at_2mm_has_every_label(index):
    image, label, affine = phantom.make_subject(index, True, seed=0, spacing=2.0)
    assert image.shape == (120, 120, 78, 4) and image.dtype == np.float32 and label.dtype == np.uint8
    assert set(np.unique(label)) == {0, 1, 2, 3}
    np.testing.assert_allclose(np.diag(affine), [2, 2, 2, 1])


def test_health_status_shuffled():
    """Health status is shuffled with the seed, so ids do not reveal it."""
    layouts = {tuple(synth._tumour_flags(5, 5, seed)) for seed in range(10)}
    assert len(layouts) > 1
    assert all(sum(flags) == 5 and len(flags) == 10 for flags in layouts)
    assert synth._tumour_flags(5, 5, 1) == synth._tumour_flags(5, 5, 1)


def test_same_seed_same_bytes_different_seed_differs(task, tmp_path):
    again = synth.generate_dataset(tmp_path / "b", N_HEALTHY, N_TUMOUR, seed=SEED, spacing=SPACING, workers=1,
                                   progress=False)
    files = sorted(p.relative_to(task) for p in task.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (task / rel).read_bytes() == (again / rel).read_bytes(), rel
    other = synth.generate_dataset(tmp_path / "c", 0, 1, seed=SEED + 1, spacing=SPACING, workers=1, progress=False)
    name = "imagesTr/BRATS_001.nii.gz"
    assert (other / name).read_bytes() != (task / name).read_bytes()


def test_contrast_ordering(task, meta):
    """Per-label means follow the design table: the property an anomaly detector relies on."""
    sums = {}

    def add(key, values):
        total, count = sums.get(key, (0.0, 0))
        sums[key] = (total + values.sum(0), count + len(values))

    for index, _, img, lab in _subjects(task, meta):
        image, label = np.asarray(img.dataobj), np.asarray(lab.dataobj)
        anatomy = phantom.subject_anatomy(index, SEED, SPACING)
        tissue = anatomy.paste(np.moveaxis(anatomy.tissue, 0, -1))
        healthy = label == 0
        for name, k in zip(phantom.HEALTHY_TISSUES, range(3)):
            add(name, image[healthy & (tissue[..., k] > 0.6)])
        for cls, name in phantom.LABEL_TISSUES.items():
            add(name, image[label == cls])
    mean = {k: total / count for k, (total, count) in sums.items()}
    assert all(count > 20 for _, count in sums.values())
    flair, t1, t1gd, t2 = range(4)
    assert mean["edema"][flair] > mean["white matter"][flair]
    assert mean["edema"][flair] > mean["grey matter"][flair]
    others = [k for k in mean if k != "enhancing rim"]
    assert all(mean["enhancing rim"][t1gd] > mean[k][t1gd] for k in others)
    assert mean["CSF"][t2] > mean["white matter"][t2]
    assert mean["necrotic / non-enhancing core"][t2] > mean["white matter"][t2]
    assert mean["white matter"][t1] > mean["grey matter"][t1] > mean["CSF"][t1]


def test_monai_decathlon_dataset_loads(task):
    ds = monai.apps.DecathlonDataset(root_dir=task.parent, task="Task01_BrainTumour", section="training",
                                     download=False, val_frac=0.0, cache_rate=0.0, progress=False,
                                     transform=monai.transforms.LoadImaged(keys=["image", "label"]))
    assert len(ds) == N_HEALTHY + N_TUMOUR
    item = ds[0]
    shape = tuple(round(mm / SPACING) for mm in phantom.CANVAS_MM)
    assert tuple(item["image"].shape) == shape + (4,)
    assert tuple(item["label"].shape) == shape


def test_failed_run_leaves_nothing(tmp_path, monkeypatch):
    def broken(index, tumour, seed, spacing):
        raise RuntimeError("boom")

    monkeypatch.setattr(synth, "make_subject", broken)
    with pytest.raises(RuntimeError):
        synth.generate_dataset(tmp_path, 1, 1, spacing=SPACING, workers=1, progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs", [
    dict(n_healthy=-1, n_tumour=1), dict(n_healthy=0, n_tumour=0), dict(n_healthy=1, n_tumour=1.5),
    dict(n_healthy=1, n_tumour=0, spacing=0.5), dict(n_healthy=1, n_tumour=0, spacing=9),
    dict(n_healthy=1, n_tumour=0, seed=-1), dict(n_healthy=1, n_tumour=0, workers=0),
])
def test_bad_arguments(tmp_path, kwargs):
    with pytest.raises(InputError):
        synth.generate_dataset(tmp_path, progress=False, **kwargs)
    assert not (tmp_path / "Task01_BrainTumour").exists()


def test_rotation_is_scipys_extrinsic_xyz():
    from scipy.spatial.transform import Rotation

    from pipeline.data.phantom import _rotation

    angles = np.random.default_rng(0).uniform(-0.3, 0.3, size=(5, 3))
    for a in angles:
        np.testing.assert_allclose(_rotation(a), Rotation.from_euler("xyz", a).as_matrix(), atol=1e-12)


# sha256 of every file of `pipeline synth --healthy 2 --tumour 3 --seed 0 --spacing 4`, written by the generator
# before the package moved into stage folders (commit d52c033): published protocols are bound to their data's bytes.
GOLDEN_DATASET = {
    "LICENSE_MNI.txt": "087f0c3a1f1c7aacbb28742ac085bad06e5bdb05547ea3a04ecb90f9dac09832",
    "dataset.json": "c3ac38eca52122f5b673088977d112d2235f9d953f651920a34915a63ea0049b",
    "imagesTr/BRATS_001.nii.gz": "96e6044a465fb8efa88f033c79b44dd756ca92978596f1e42dc8efc29c2a7ec0",
    "imagesTr/BRATS_002.nii.gz": "c17b57281bcd60ef315a601cee69f5358ba3e8d7583fa17a72f4696c92a2d302",
    "imagesTr/BRATS_003.nii.gz": "e9e96a509d59ba3a26c1543d444eb79e4f109965c7bc95198a7138eae5e791e3",
    "imagesTr/BRATS_004.nii.gz": "e0178a56b4dc4b5c132e2e9c9bc2dbd9e0102c4b0a3d4d3897ba24f61411ee55",
    "imagesTr/BRATS_005.nii.gz": "517f5ef04b3ea17c6ffcc88bc5042981a043076097c3927b41dbd00db9c07b98",
    "labelsTr/BRATS_001.nii.gz": "910919b5ff7c66a9b7530b6ee61ac7f038e963b8e01ff4691958e0909ae18ffb",
    "labelsTr/BRATS_002.nii.gz": "9ccddf4effc68c33b091d1afb5532a54a641a4db74f00a4dc625fdcd7cb8cb78",
    "labelsTr/BRATS_003.nii.gz": "4f828e2b46a6ef6bbf5aea08b04a620c1ae1395956c88bcb1559e424b691ea59",
    "labelsTr/BRATS_004.nii.gz": "d46139bc04d51952f12186d53a72c92990d8b6a2aed62b5c8a95754ca8789f49",
    "labelsTr/BRATS_005.nii.gz": "d46139bc04d51952f12186d53a72c92990d8b6a2aed62b5c8a95754ca8789f49",
}


def test_default_dataset_is_byte_identical_to_the_published_generator(tmp_path):
    """Every file, dataset.json included (its generator record once changed with a module rename)."""
    import hashlib

    task = synth.generate_dataset(tmp_path, n_healthy=2, n_tumour=3, seed=0, spacing=4.0, workers=1, progress=False)
    found = {str(p.relative_to(task)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(task.rglob("*")) if p.is_file()}
    assert found == GOLDEN_DATASET
