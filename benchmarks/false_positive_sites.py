#!/usr/bin/env python
"""Where a run's false positives on healthy validation subjects sit: per healthy subject, its voxel size and the
connected components of map > validation threshold (ml, median depth in mm from the brain edge), largest first.

    python benchmarks/false_positive_sites.py results/study-v3r2-shift/runs/x0-4ch-pos-position-m3d3-s0 data/synthetic-shift

Healthy subjects are those the generator lists in dataset.json ("synthetic": {"healthy": [...]}).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from pipeline.common import read_json


def sites(run: Path, data: Path) -> list[str]:
    threshold = read_json(run / "evaluation" / "metrics.json", "metrics")["validation"]["threshold"]
    meta = read_json(data / "Task01_BrainTumour" / "dataset.json", "dataset.json")
    healthy = set((meta.get("synthetic") or {}).get("healthy", []))
    lines = []
    for name, row in sorted(read_json(run / "scores" / "index.json", "scores index")["subjects"].items()):
        if row["section"] != "validation" or name not in healthy:
            continue
        image = nib.load(data / "Task01_BrainTumour" / "imagesTr" / f"{name}.nii.gz")
        zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
        brain = np.asarray(image.dataobj).any(axis=-1)
        depth = ndimage.distance_transform_edt(brain, sampling=zooms)
        score = np.asarray(nib.load(run / "scores" / row["files"]["score"]).dataobj)
        labels, n = ndimage.label(score > threshold, np.ones((3, 3, 3)))
        components = sorted(((float((labels == i).sum()) * np.prod(zooms) / 1000, float(np.median(depth[labels == i])))
                             for i in range(1, n + 1)), reverse=True)
        shown = ", ".join(f"{ml:.2f} ml at {mm:.0f} mm" for ml, mm in components[:6]) or "none"
        lines.append(f"{name} (voxels {' x '.join(f'{z:.2f}' for z in zooms)} mm): {shown}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="results/<protocol>/runs/<entry>")
    parser.add_argument("data", type=Path, help="the dataset folder (holds Task01_BrainTumour)")
    args = parser.parse_args()
    print("\n".join(sites(args.run, args.data)))


if __name__ == "__main__":
    main()
