#!/usr/bin/env python
"""Where a run's false positives on healthy validation subjects sit: per healthy subject, its voxel size and the
connected components of map > validation threshold (ml, median depth in mm from the brain edge), largest first.

    python benchmarks/false_positive_sites.py results/study-v3r2-shift/runs/x0-4ch-pos-position-m3d3-s0 data/synthetic-shift

Healthy subjects are those the generator lists in dataset.json ("synthetic": {"healthy": [...]})."""
import json, sys
from pathlib import Path
import nibabel as nib, numpy as np
from scipy import ndimage
run = Path(sys.argv[1]); data = Path(sys.argv[2])
thr = json.load(open(run / "evaluation/metrics.json"))["validation"]["threshold"]
meta = json.load(open(data / "Task01_BrainTumour/dataset.json"))
healthy = set(meta["synthetic"]["healthy"]) if "synthetic" in meta else set()
index = json.load(open(run / "scores/index.json"))["subjects"]
for name, row in sorted(index.items()):
    if row["section"] != "validation" or name not in healthy:
        continue
    img = nib.load(data / "Task01_BrainTumour/imagesTr" / f"{name}.nii.gz")
    vox = float(np.prod(img.header.get_zooms()[:3])) / 1000
    brain = np.asarray(img.dataobj).any(axis=-1)
    score = np.asarray(nib.load(run / "scores" / row["files"]["score"]).dataobj)
    lab, n = ndimage.label(score > thr, np.ones((3, 3, 3)))
    depth = ndimage.distance_transform_edt(brain, sampling=img.header.get_zooms()[:3])
    comps = []
    for i in range(1, n + 1):
        m = lab == i
        comps.append((round(m.sum() * vox, 3), round(float(np.median(depth[m])), 1)))
    print(name, "zooms", tuple(round(float(z), 2) for z in img.header.get_zooms()[:3]), "components (ml, median mm from brain edge):", sorted(comps, reverse=True)[:6])
