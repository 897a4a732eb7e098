"""Variety settings of the synthetic generator: each setting does what it says, and the defaults are
the default generator's bytes (published protocols are fingerprinted by their data)."""

from __future__ import annotations

import hashlib
import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial import ConvexHull

from pipeline.cli import main
from pipeline.data import synth
from pipeline.data.phantom import CANVAS_MM, make_subject, make_subject_with_record
from pipeline.data.variety import PRESETS, Domain, Variety, load_settings
from pipeline.errors import InputError

SPACING = 4.0
CONNECTED = np.ones((3, 3, 3), bool)  # 26-neighbours: separate lesions must not even touch at a corner

# sha256 of image, label and affine bytes of make_subject(index, tumour, seed=0, spacing=4.0), computed
# with the generator as it was before the variety settings existed (and unchanged by them).
GOLDEN = {(1, True): "da725d936116c63a1efc5edc1d67201bd76edf8e202b5f6dcf052cadcaefd682",
          (2, False): "cf0d07f76de1ff884f8ba73879417573f5a7227dbdd1f16b9b2acad4ff712d4c",
          (3, True): "37a6ee90753b767e7b6798d9ac49bda34923a70ee26e5e45722aa385d70d0923"}


def _digest(image, label, affine) -> str:
    h = hashlib.sha256()
    for array in (image, label, affine):
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def _subject(index=1, tumour=True, **settings):
    """(image, label, affine, record) of one 4 mm subject with the given variety settings."""
    return make_subject_with_record(index, tumour, 0, SPACING, Variety(**settings))


def _world_centre(mask, affine) -> np.ndarray:
    return affine[:3, :3] @ np.array(ndimage.center_of_mass(mask)) + affine[:3, 3]


@pytest.fixture(scope="module")
def base():
    """The default subject 1 (tumour) at 4 mm."""
    return make_subject(1, True, 0, SPACING)


# ---------------------------------------------------------------- defaults: today's bytes

@pytest.mark.parametrize("index, tumour", sorted(GOLDEN))
def test_default_settings_give_the_generators_bytes(index, tumour):
    default = make_subject(index, tumour, 0, SPACING)
    assert _digest(*default) == GOLDEN[index, tumour]
    for variety in (Variety(), PRESETS["none"], Variety.from_dict({}, "test")):
        again = make_subject(index, tumour, 0, SPACING, variety)
        assert _digest(*again) == GOLDEN[index, tumour]
        assert again[0].dtype == np.float32 and again[1].dtype == np.uint8


def test_default_dataset_json_has_no_variety_keys(tmp_path):
    task = synth.generate_dataset(tmp_path / "a", 1, 1, seed=2, spacing=8.0, workers=1, progress=False)
    same = synth.generate_dataset(tmp_path / "b", 1, 1, seed=2, spacing=8.0, workers=1, progress=False,
                                  variety=Variety())
    text = (task / "dataset.json").read_text()
    assert "domain" not in text and "variety" not in text and "subjects" not in text
    for rel in ("dataset.json", "imagesTr/BRATS_001.nii.gz", "labelsTr/BRATS_002.nii.gz"):
        assert (task / rel).read_bytes() == (same / rel).read_bytes()


# ---------------------------------------------------------------- settings: validation

@pytest.mark.parametrize("settings, name", [
    (dict(lesion_count=(0, 1)), "lesion_count"), (dict(lesion_count=(1, 4)), "lesion_count"),
    (dict(lesion_count=(1.5, 2)), "lesion_count"), (dict(lesion_fraction=(0.0001, 0.01)), "lesion_fraction"),
    (dict(lesion_fraction=(0.05, 0.01)), "lesion_fraction"), (dict(irregularity=(0, 2)), "irregularity"),
    (dict(irregularity=0.5), "irregularity"), (dict(enhancement={"ring": 0.5}), "enhancement"),
    (dict(enhancement={"spotty": 1.0}), "enhancement"), (dict(edema_scale=(0.1, 1)), "edema_scale"),
    (dict(mass_effect_mm=(-1, 0)), "mass_effect_mm"), (dict(deformation=(1, 4)), "deformation"),
    (dict(voxel_mm=((1, 2), (1, 2))), "voxel_mm"), (dict(voxel_mm=((1, 2), (1, 2), (0.1, 2))), "voxel_mm"),
    (dict(orientations=["RAX"]), "orientations"), (dict(orientations=["RRS"]), "orientations"),
    (dict(orientations=[]), "orientations"), (dict(fov_crop_mm=(0, 50)), "fov_crop_mm"),
    (dict(intensity_gain=(0, 1)), "intensity_gain"), (dict(store_int16=1.5), "store_int16"),
    (dict(bias_scale=(0, 5)), "bias_scale"), (dict(noise_scale=(True, 1)), "noise_scale"),
])
def test_bad_settings_name_the_setting(settings, name):
    with pytest.raises(InputError) as err:
        Variety(**settings)
    assert err.value.source == name and "\n" not in str(err.value)
    with pytest.raises(InputError) as err:
        Variety.from_dict(settings, "proto.yaml")
    assert str(err.value).startswith(f"proto.yaml: {name}: ")


def test_unknown_setting_names_the_closest():
    with pytest.raises(InputError, match="unknown variety setting 'lesion_cont'; did you mean 'lesion_count'"):
        Variety.from_dict({"lesion_cont": [1, 2]}, "x.yaml")
    with pytest.raises(InputError, match="mapping"):
        Variety.from_dict(["lesion_count"], "x.yaml")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_settings_round_trip_through_dicts_and_json(name):
    variety = PRESETS[name]
    assert Variety.from_dict(json.loads(json.dumps(variety.to_dict())), "x") == variety
    assert load_settings(name, "x") == variety


def test_mixed_preset_spans_every_axis():
    mixed, default = PRESETS["mixed"].to_dict(), Variety().to_dict()
    assert all(mixed[key] != default[key] for key in default), "every setting varies in 'mixed'"


def test_domains_from_settings():
    domains = load_settings({"domains": [{"name": "site-a", "share": 2}, {"name": "site_b", "share": 1,
                                                                          "variety": "mixed"},
                                         {"name": "c", "share": 1, "variety": {"lesion_count": [2, 3]}}]}, "d.yaml")
    assert [d.name for d in domains] == ["site-a", "site_b", "c"]
    assert domains[0].variety == Variety() and domains[1].variety == PRESETS["mixed"]
    assert domains[2].variety.lesion_count == (2, 3)
    for bad in ({"domains": []}, {"domains": [{"name": "a"}]}, {"domains": [{"name": "a b", "share": 1}]},
                {"domains": [{"name": "a", "share": 0}]}, {"domains": [{"name": "a", "share": 1}] * 2},
                {"domains": [{"name": "a", "share": 1, "variety": "nope"}]}):
        with pytest.raises(InputError):
            load_settings(bad, "d.yaml")


# ---------------------------------------------------------------- lesions

@pytest.mark.parametrize("index", [1, 2])
def test_lesion_count_gives_separate_lesions_of_the_recorded_sizes(index):
    image, label, _, record = _subject(index, lesion_count=(3, 3), lesion_fraction=(0.004, 0.01))
    components, n = ndimage.label(label > 0, CONNECTED)
    assert n == len(record["lesions"]) == 3
    sizes = sorted(np.bincount(components.ravel())[1:].tolist())
    assert sizes == sorted(lesion["voxels"] for lesion in record["lesions"])
    assert not label[~image.any(-1)].any()


def test_lesion_count_range_is_drawn_per_subject():
    counts = {len(_subject(i, lesion_count=(1, 3), lesion_fraction=(0.002, 0.004))[3]["lesions"]) for i in range(1, 9)}
    assert counts <= {1, 2, 3} and len(counts) > 1


@pytest.mark.parametrize("fraction, most", [(0.0005, 3.0), (0.002, 2.0), (0.05, 1.3)])
def test_lesion_fraction_sets_the_whole_tumour_size(fraction, most):
    for index in (1, 2):
        image, label, _, record = _subject(index, lesion_fraction=(fraction, fraction))
        whole = np.count_nonzero(label) / np.count_nonzero(image.any(-1))
        assert fraction * 0.9 <= whole <= fraction * most, whole
        assert record["lesions"][0]["fraction"] == pytest.approx(whole, rel=1e-3)


def _solidity(mask) -> float:
    """Voxel volume over the volume of the convex hull of the voxels' corners: highest for a ball."""
    corners = np.argwhere(mask)[:, None, :] + np.array(np.meshgrid(*[[-0.5, 0.5]] * 3)).reshape(3, -1).T[None]
    return mask.sum() / ConvexHull(corners.reshape(-1, 3)).volume


def test_irregularity_makes_lobulated_lesions():
    regular = [_solidity(_subject(i)[1] > 1) for i in (1, 3, 6)]
    irregular = [_solidity(_subject(i, irregularity=(1, 1))[1] > 1) for i in (1, 3, 6)]
    assert min(regular) > 0.7
    assert np.mean(irregular) < np.mean(regular) - 0.1


@pytest.mark.parametrize("pattern, present, absent", [("ring", {1, 2, 3}, set()), ("solid", {1, 3}, {2}),
                                                       ("none", {1, 2}, {3})])
def test_enhancement_pattern(pattern, present, absent):
    for index in (1, 2):
        _, label, _, record = _subject(index, enhancement={pattern: 1.0})
        found = set(np.unique(label).tolist())
        assert present <= found and not absent & found
        assert [lesion["pattern"] for lesion in record["lesions"]] == [pattern]


def test_enhancement_patterns_are_drawn_with_their_probabilities():
    drawn = [lesion["pattern"] for i in range(1, 13)
             for lesion in _subject(i, lesion_count=(2, 2), lesion_fraction=(0.002, 0.003),
                                    enhancement={"ring": 0.5, "solid": 0.25, "none": 0.25})[3]["lesions"]]
    assert set(drawn) == {"ring", "solid", "none"} and 6 <= drawn.count("ring") <= 18


def test_edema_scale_moves_only_the_edema(base):
    label = base[1]
    wide, narrow = (_subject(edema_scale=(s, s))[1] for s in (2.0, 0.5))
    for other in (wide, narrow):
        np.testing.assert_array_equal(other > 1, label > 1)  # the tumour core is the same growth
    assert np.count_nonzero(wide == 1) > 1.5 * np.count_nonzero(label == 1) > 2 * np.count_nonzero(narrow == 1)


def test_mass_effect_pushes_healthy_tissue_near_the_lesion(base):
    image, label, affine, record = _subject(mass_effect_mm=(10, 10))
    np.testing.assert_array_equal(label, base[1])
    brain = image.any(-1)
    np.testing.assert_array_equal(brain, base[0].any(-1))
    change = np.abs(image - base[0]).sum(-1)
    distance = ndimage.distance_transform_edt(label == 0, sampling=SPACING)
    near, far = brain & (distance > 0) & (distance < 15), brain & (distance > 50)
    assert change[near].mean() > 5 * change[far].mean()
    assert change[label > 0].max() == 0  # the lesion itself is drawn as before
    assert record["lesions"][0]["mass_effect_mm"] == 10


# ---------------------------------------------------------------- anatomy

def test_deformation_scales_anatomical_variation():
    def spread(d):
        volumes = [np.count_nonzero(_subject(i, False, deformation=(d, d))[0].any(-1)) for i in range(1, 6)]
        return np.std(volumes) / np.mean(volumes)

    still, default, strong = spread(0.0), spread(1.0), spread(2.5)
    assert still < 0.02 and still < default < strong


# ---------------------------------------------------------------- acquisition

def test_voxel_size_resamples_the_same_field_of_view(base):
    image, label, affine, record = _subject(voxel_mm=((1.5, 1.5), (2.5, 2.5), (6.0, 6.0)))
    img = nib.Nifti1Image(image, affine)
    assert img.header.get_zooms()[:3] == pytest.approx((1.5, 2.5, 6.0)) and record["voxel_mm"] == [1.5, 2.5, 6.0]
    extent = np.array(label.shape) * [1.5, 2.5, 6.0]
    assert np.all(np.abs(extent - np.array(CANVAS_MM)) <= [1.5, 2.5, 6.0])
    assert label.dtype == np.uint8 and set(np.unique(label)) == {0, 1, 2, 3}
    assert 0 <= image.min() and image.max() <= base[0].max()
    brain, before = image.any(-1), base[0].any(-1)
    np.testing.assert_allclose(_world_centre(brain, affine), _world_centre(before, base[2]), atol=2.0)
    volume = np.count_nonzero(brain) * 1.5 * 2.5 * 6.0 / (np.count_nonzero(before) * SPACING**3)
    assert 0.95 < volume < 1.3  # partial-volume edges add a rim
    assert not label[~brain].any()


@pytest.mark.parametrize("code", ["LPS", "LAS", "RPI", "PIR"])
def test_orientation_keeps_world_positions(base, code):
    image, label, affine, record = _subject(orientations=[code])
    assert "".join(nib.aff2axcodes(affine)) == code == record["orientation"]
    np.testing.assert_allclose(_world_centre(image.any(-1), affine), _world_centre(base[0].any(-1), base[2]),
                               atol=1e-6)
    np.testing.assert_allclose(_world_centre(label > 1, affine), _world_centre(base[1] > 1, base[2]), atol=1e-6)
    assert sorted(image.shape[:3]) == sorted(base[1].shape)
    np.testing.assert_array_equal(np.sort(label, axis=None), np.sort(base[1], axis=None))
    # the voxel at the world origin's nearest position holds the same values
    ras = nib.as_closest_canonical(nib.Nifti1Image(image, affine))
    np.testing.assert_array_equal(np.asarray(ras.dataobj), base[0])
    np.testing.assert_allclose(ras.affine, base[2], atol=1e-9)


def test_fov_crop_shortens_the_canvas_and_cuts_the_brain(base):
    before = base[0].any(-1)
    z_before = np.flatnonzero(before.any((0, 1)))
    for index in (1, 2, 3):
        image, label, affine, _ = _subject(index, fov_crop_mm=(20, 20))
        ref = make_subject(index, True, 0, SPACING)
        assert all(a < b for a, b in zip(image.shape[:3], ref[1].shape))
        brain, old = image.any(-1), ref[0].any(-1)
        z_new = affine[2, 3] + SPACING * np.flatnonzero(brain.any((0, 1)))
        z_old = ref[2][2, 3] + SPACING * np.flatnonzero(old.any((0, 1)))
        assert (z_old[-1] - z_old[0]) - (z_new[-1] - z_new[0]) == pytest.approx(20, abs=SPACING)
        assert z_new[0] == pytest.approx(z_old[0]) or z_new[-1] == pytest.approx(z_old[-1])  # top or bottom cut
        assert np.count_nonzero(brain[:, :, [0, -1]]) and not label[~brain].any()
    assert len(z_before) > 0


def test_gain_scales_intensities_and_int16_stores_them(base):
    image = _subject(intensity_gain=(10, 10))[0]
    np.testing.assert_array_equal(image, base[0] * np.float32(10))
    stored, label, _, record = _subject(intensity_gain=(10, 10), store_int16=1.0)
    assert stored.dtype == np.int16 and record["dtype"] == "int16"
    np.testing.assert_array_equal(stored, np.rint(base[0] * np.float32(10)).astype(np.int16))
    low, high = 0.05, 20.0
    for index in (1, 2, 3):
        scaled = _subject(index, intensity_gain=(low, high))[0]
        ref = make_subject(index, True, 0, SPACING)[0]
        brain = ref > 0
        gain = scaled[brain] / ref[brain]
        assert np.allclose(gain, gain[0], rtol=1e-5) and low <= gain[0] <= high
        assert np.all(scaled[~brain] == 0)


def test_noise_and_bias_scales(base):
    clean = _subject(noise_scale=(0, 0), bias_scale=(0, 0))[0]
    noisy = _subject(noise_scale=(3, 3), bias_scale=(0, 0))[0]
    plain = _subject(bias_scale=(0, 0))[0]
    brain = clean.any(-1)
    ratio = np.std(noisy[brain] - clean[brain]) / np.std(plain[brain] - clean[brain])
    assert 2.5 < ratio < 3.5
    biased = _subject(noise_scale=(0, 0), bias_scale=(2, 2))[0]
    deviation = np.abs(biased[brain] / clean[brain] - 1)
    assert 0.15 < deviation.max() <= 2 * 0.12 + 1e-4


@pytest.mark.parametrize("index", [1, 2, 3])
def test_background_stays_zero(index):
    """Every acquisition step at once: what lies well outside the brain stays exactly zero (BraTS images are
    skull-stripped; the pipeline's brain mask is "any channel non-zero")."""
    scanner = {k: v for k, v in PRESETS["mixed"].to_dict().items()
               if k in ("voxel_mm", "orientations", "fov_crop_mm", "intensity_gain", "store_int16", "bias_scale",
                        "noise_scale")}
    image, label, affine, _ = make_subject_with_record(index, True, 0, SPACING, Variety.from_dict(scanner, "t"))
    ref_image, _, ref_affine = make_subject(index, True, 0, SPACING)
    brain = image.any(-1)
    assert image.min() >= 0 and not label[~brain].any()
    # partial volume reaches a voxel plus a source voxel; the nearest-voxel lookup below adds half a diagonal
    footprint = max(np.sqrt((affine[:3, :3] ** 2).sum(0))) + SPACING + SPACING * np.sqrt(3) / 2
    far = ndimage.distance_transform_edt(~ref_image.any(-1), sampling=SPACING) > footprint
    voxels = np.argwhere(np.ones(brain.shape, bool))
    ref = np.rint((np.linalg.inv(ref_affine) @ affine)[:3] @ np.c_[voxels, np.ones(len(voxels))].T).astype(int).T
    assert not brain.reshape(-1)[far[tuple(ref.T)]].any()
    assert np.count_nonzero(far[tuple(ref.T)]) > 0.3 * len(voxels)


@pytest.mark.parametrize("index", [1, 2])
def test_mixed_preset_subjects_are_sane(index):
    image, label, affine, record = make_subject_with_record(index, True, 0, SPACING, PRESETS["mixed"])
    brain = image.any(-1)
    assert image.min() >= 0 and not label[~brain].any() and 1 <= len(record["lesions"]) <= 3
    default = make_subject(index, True, 0, SPACING)[0].any(-1)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(0))
    volume = np.count_nonzero(brain) * np.prod(zooms) / (np.count_nonzero(default) * SPACING**3)
    assert 0.6 < volume < 1.4  # deformation scales the brain, partial volume adds a rim, the crop cuts some


# ---------------------------------------------------------------- datasets

def test_same_seed_same_bytes_with_variety(tmp_path):
    mixed = PRESETS["mixed"]
    a = synth.generate_dataset(tmp_path / "a", 1, 2, seed=4, spacing=SPACING, workers=2, progress=False, variety=mixed)
    b = synth.generate_dataset(tmp_path / "b", 1, 2, seed=4, spacing=SPACING, workers=1, progress=False, variety=mixed)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    meta = json.loads((a / "dataset.json").read_text())
    assert meta["synthetic"]["variety"] == mixed.to_dict()
    for entry in meta["training"]:
        name = entry["image"].split("/")[-1].split(".")[0]
        facts = meta["synthetic"]["subjects"][name]
        img = nib.load(a / entry["image"])
        assert "".join(nib.aff2axcodes(img.affine)) == facts["orientation"]
        assert img.header.get_zooms()[:3] == pytest.approx(facts["voxel_mm"], abs=1e-3)
        assert (name in meta["synthetic"]["healthy"]) == (facts["lesions"] == [])


def test_recorded_lesions_match_the_labels(tmp_path):
    variety = Variety(lesion_count=(1, 3), lesion_fraction=(0.003, 0.01), enhancement={"ring": 0.5, "none": 0.5})
    task = synth.generate_dataset(tmp_path, 0, 3, seed=1, spacing=SPACING, workers=1, progress=False, variety=variety)
    meta = json.loads((task / "dataset.json").read_text())
    for entry in meta["training"]:
        label = np.asarray(nib.load(task / entry["label"]).dataobj)
        lesions = meta["synthetic"]["subjects"][entry["image"].split("/")[-1].split(".")[0]]["lesions"]
        components, n = ndimage.label(label > 0, CONNECTED)
        assert n == len(lesions) >= 1
        assert sorted(np.bincount(components.ravel())[1:]) == sorted(lesion["voxels"] for lesion in lesions)
        assert (3 in label) == any(lesion["pattern"] == "ring" for lesion in lesions)


def test_domains_split_by_share_and_health():
    flags = [False] * 10 + [True] * 20
    domains = [Domain("a", 0.5), Domain("b", 0.3), Domain("c", 0.2)]
    names = synth._assign_domains(flags, domains, seed=0)
    for flag, n in ((False, 10), (True, 20)):
        group = [d for d, f in zip(names, flags) if f == flag]
        assert [group.count(x) for x in "abc"] == [n // 2, 3 * n // 10, n // 5]
    assert names == synth._assign_domains(flags, domains, seed=0)
    assert names != synth._assign_domains(flags, domains, seed=1)
    for seed in range(4):  # an odd group leaves one subject over: it goes to either domain, drawn
        odd = synth._assign_domains([False] * 3 + [True] * 3, [Domain("a", 1), Domain("b", 1)], seed=seed)
        assert sorted(odd[:3].count(x) for x in "ab") == sorted(odd[3:].count(x) for x in "ab") == [1, 2]


def test_dataset_with_domains(tmp_path):
    domains = [Domain("plain", 1.0), Domain("hard", 1.0, PRESETS["mixed"])]
    task = synth.generate_dataset(tmp_path / "d", 2, 2, seed=3, spacing=8.0, workers=2, progress=False,
                                  domains=domains)
    meta = json.loads((task / "dataset.json").read_text())
    plain = synth.generate_dataset(tmp_path / "p", 2, 2, seed=3, spacing=8.0, workers=1, progress=False)
    assert json.loads((plain / "dataset.json").read_text())["synthetic"]["healthy"] == meta["synthetic"]["healthy"]
    healthy = set(meta["synthetic"]["healthy"])
    by_health = {(e["domain"], e["image"].split("/")[-1].split(".")[0] in healthy) for e in meta["training"]}
    assert by_health == {("plain", True), ("plain", False), ("hard", True), ("hard", False)}
    assert meta["synthetic"]["domains"] == [d.to_dict() for d in domains]
    for entry in meta["training"]:
        name = entry["image"].split("/")[-1]
        same = (task / "imagesTr" / name).read_bytes() == (plain / "imagesTr" / name).read_bytes()
        assert same == (entry["domain"] == "plain")
        assert meta["synthetic"]["subjects"][name.split(".")[0]]["domain"] == entry["domain"]


def test_hidden_test_entries_reveal_no_domain_or_draws(tmp_path):
    domains = [Domain("a", 1.0), Domain("b", 1.0, Variety(lesion_count=(2, 2), lesion_fraction=(0.002, 0.004)))]
    task = synth.generate_dataset(tmp_path / "d", 3, 3, seed=0, spacing=8.0, workers=1, progress=False,
                                  hidden_test=synth.HiddenTest(tmp_path / "gt", 0.34), domains=domains)
    meta = json.loads((task / "dataset.json").read_text())
    hidden = [t.split("/")[-1].split(".")[0] for t in meta["test"]]
    assert hidden and all(isinstance(t, str) for t in meta["test"])
    assert all("domain" in e for e in meta["training"])
    assert not set(hidden) & set(meta["synthetic"]["subjects"])
    assert all(h not in json.dumps(meta["synthetic"]) for h in hidden)
    organiser = json.loads((tmp_path / "gt" / "synthetic.json").read_text())
    assert set(hidden) <= set(organiser["subjects"])


def test_generate_dataset_refuses_bad_variety_arguments(tmp_path):
    for kwargs in (dict(variety={"lesion_count": [1, 2]}), dict(domains=[]), dict(domains=[Domain("a", 1)] * 2),
                   dict(variety=Variety(), domains=[Domain("a", 1)])):
        with pytest.raises(InputError):
            synth.generate_dataset(tmp_path, 1, 1, spacing=8.0, progress=False, **kwargs)
    assert not (tmp_path / "Task01_BrainTumour").exists()


# ---------------------------------------------------------------- command line

def test_cli_variety_option(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lesion_count: [1, 2]\nirregularaty: [0, 1]\n")
    assert main(["synth", "--out", str(tmp_path / "x"), "--variety", str(bad), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "irregularaty" in err and "'irregularity'" in err
    assert main(["synth", "--out", str(tmp_path / "x"), "--variety", "harder", "--quiet"]) == 2
    assert "none, mixed" in capsys.readouterr().err
    good = tmp_path / "good.yaml"
    good.write_text("domains:\n  - {name: a, share: 1}\n  - {name: b, share: 1, variety: {orientations: [LPS]}}\n")
    assert main(["synth", "--out", str(tmp_path / "y"), "--variety", str(good), "--healthy", "1", "--tumour", "1",
                 "--spacing", "8", "--workers", "1", "--quiet"]) == 0
    meta = json.loads((tmp_path / "y" / "Task01_BrainTumour" / "dataset.json").read_text())
    assert sorted(e["domain"] for e in meta["training"]) == ["a", "b"]
    assert not (tmp_path / "x").exists()


def test_log_uniform_lesion_sizes_make_small_lesions_as_common_as_large_ones():
    """With lesion_size_log the median size is the range's geometric mean; the default draws uniformly."""
    from pipeline.data.variety import Lesion

    def draws(log_size):
        lesion = Lesion(0, (0.0005, 0.05), log_size, "ring", 1.0, 0.0, 0.0, np.random.SeedSequence(0))
        rng = np.random.default_rng(0)
        return np.array([lesion.draw_fraction(rng) for _ in range(4000)])

    log, flat = draws(True), draws(False)
    assert log.min() >= 0.0005 and log.max() <= 0.05 and abs(np.median(log) / 0.005 - 1) < 0.1
    assert abs(np.median(flat) / 0.02525 - 1) < 0.05
    assert np.mean(log < 0.005) > 0.45 and np.mean(flat < 0.005) < 0.1
