"""PNG report of an evaluation: example slices (input, reconstruction, map, truth, prediction) + curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np

ROWS = 4
"""Example slices in the figure."""

INTENSITY_CMAP = "gray"
"""MR intensities (input, reconstruction)."""
SCORE_CMAP = "inferno"
"""Anomaly scores: a heat scale, so hot spots stand out from the grey anatomy."""
MASK_CMAP = "gray"
"""Binary masks (ground truth, prediction): white inside."""
CHANCE_COLOUR = "grey"
"""Reference lines: a random score's ROC diagonal and PR baseline."""


def _example_slices(scores_dir: Path, index: dict, names: list[str]) -> list[dict]:
    """Up to ROWS preprocessed-grid slices, the test subjects with most tumour first."""
    rows = []
    for name in names:
        files = index["subjects"][name]["files"]
        if "slices" not in files:
            continue
        with np.load(scores_dir / files["slices"]) as grid:
            tumour = grid["tumour"][0] if "tumour" in grid else np.zeros_like(grid["brain"][0])
            k = int(np.argmax(tumour.sum(axis=(0, 1)))) if tumour.any() else 0
            rows.append({"subject": name, "z": int(grid["z"][k]),
                         **{key: grid[key][..., k] for key in ("image", "recon", "map", "brain")},
                         "tumour": tumour[..., k]})
        if len(rows) == ROWS:
            break
    return rows


def example_from_volume(name: str, data: dict) -> dict:
    """An example row from a subject's original-grid volumes (map, tumour, brain): its slice along the third
    axis with most tumour. For runs without preprocessed-grid slices (maps made elsewhere): no input or
    reconstruction panel then."""
    k = int(np.argmax(data["tumour"].sum(axis=(0, 1)))) if data["tumour"].any() else data["score"].shape[2] // 2
    return {"subject": name, "z": k, "image": None, "recon": None, "map": data["score"][None, :, :, k] * data["brain"][..., k],
            "brain": data["brain"][None, :, :, k], "tumour": data["tumour"][..., k]}


def write_report(path: Path, scores_dir: Path, index: dict, tumour_voxels: dict[str, int], test, threshold: float,
                 metrics: dict, volume_examples: dict[str, dict] | None = None) -> None:
    """Write the figure people look at first: does the map light up where the tumour is?

    ``tumour_voxels`` (per test subject) picks the examples, most tumour first; ``test`` is the
    pooled test :class:`~pipeline.evaluation.pooled.ScoreAccumulator` (for the curves).
    ``volume_examples`` (:func:`example_from_volume` per test subject) stand in where the run saved no slices.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(tumour_voxels, key=lambda s: -tumour_voxels[s])
    rows = _example_slices(scores_dir, index, names)
    if not rows and volume_examples:
        rows = [volume_examples[name] for name in names if name in volume_examples][:ROWS]
    n = max(1, len(rows))
    fig = plt.figure(figsize=(15, 3 * n + 3.6), constrained_layout=True)
    grid = fig.add_gridspec(n + 1, 5, height_ratios=[3] * n + [3.6])
    vmax = max((float(r["map"].max()) for r in rows), default=1.0) or 1.0
    for i, row in enumerate(rows):
        _draw_example(fig, grid, i, row, threshold, vmax)
    _draw_curves(fig, grid, n, test.curves(), metrics)
    fig.suptitle(f"{metrics.get('method') or 'anomaly maps'}: {metrics['test']['subjects']} test subjects", fontsize=12)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _panels(row: dict, threshold: float, vmax: float) -> list[tuple[str, np.ndarray, str, float]]:
    """(title, image, colour map, upper limit) of one example row, left to right."""
    if row["image"] is None:  # maps made elsewhere: the brain mask stands in for the input, no reconstruction
        inputs = [("brain (input not in this run)", row["brain"][0], MASK_CMAP, 1),
                  ("reconstruction: not saved", np.zeros_like(row["brain"][0], dtype=float), INTENSITY_CMAP, 1)]
    else:
        grey = max(float(row["image"][0].max()), 1e-6)  # input and reconstruction on one grey scale
        inputs = [("input (ch 0)", row["image"][0], INTENSITY_CMAP, grey),
                  ("reconstruction", row["recon"][0], INTENSITY_CMAP, grey)]
    return [*inputs,
            ("anomaly map", row["map"][0], SCORE_CMAP, vmax),
            ("ground truth", row["tumour"], MASK_CMAP, 1),
            (f"prediction (> {threshold:.3g})", row["map"][0] > threshold, MASK_CMAP, 1)]


def _draw_example(fig, grid, i: int, row: dict, threshold: float, vmax: float) -> None:
    """Row ``i`` of the figure: one slice as input, reconstruction, map, truth and prediction."""
    for j, (title, panel, cmap, upper) in enumerate(_panels(row, threshold, vmax)):
        ax = fig.add_subplot(grid[i, j])
        ax.imshow(np.rot90(panel), cmap=cmap, vmin=0, vmax=upper)
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_title(title if i == 0 else "", fontsize=10)
        if j == 0:
            ax.set_ylabel(f"{row['subject']} z={row['z']}", fontsize=9)


def _draw_curves(fig, grid, n: int, points: dict, metrics: dict) -> None:
    """Bottom row: ROC and PR curves of the pooled test voxels, and the numbers."""
    t = metrics["test"]
    ax = fig.add_subplot(grid[n, 0:2])
    ax.plot(points["fpr"], points["tpr"])
    ax.plot([0, 1], [0, 1], ":", color=CHANCE_COLOUR)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC (AUROC {t['auroc']:.3f})")
    ax = fig.add_subplot(grid[n, 2:4])
    ax.plot(points["recall"], points["precision"])
    ax.axhline(t["tumour_voxels"] / t["brain_voxels"], ls=":", color=CHANCE_COLOUR)
    ax.set(xlabel="recall", ylabel="precision", title=f"PR (AUPRC {t['auprc']:.3f})")
    ax = fig.add_subplot(grid[n, 4])
    ax.axis("off")
    ax.text(0, 1, _summary_text(metrics), va="top", family="monospace", fontsize=9)


def _summary_text(metrics: dict) -> str:
    t = metrics["test"]
    ci = t["ci95"]
    lines = [f"AUROC  {t['auroc']:.3f} [{ci['auroc'][0]:.3f}, {ci['auroc'][1]:.3f}]",
             f"AUPRC  {t['auprc']:.3f} [{ci['auprc'][0]:.3f}, {ci['auprc'][1]:.3f}]",
             f"Dice   {t['dice']:.3f} [{ci['dice'][0]:.3f}, {ci['dice'][1]:.3f}]",
             "       (threshold from validation)",
             f"Dice*  {t['dice_oracle']:.3f}  (oracle, test-tuned)"]
    if t.get("slice_auroc") is not None:
        lines.append(f"slice AUROC {t['slice_auroc']:.3f}")
    return "\n".join(lines + _subject_lines(t) + _lesion_lines(t.get("lesions"))
                     + _recon_lines(metrics["validation"].get("reconstruction") or {}))


def _num(value, spec: str) -> str:
    """Formatted number, or "n/a" where the figure is undefined or was not recorded."""
    return "n/a" if value is None else format(value, spec)


def _subject_lines(t: dict) -> list[str]:
    """Per-patient detection and false alarms: what pooled pixel AUROC hides."""
    if "subject_auroc" not in t:
        return []
    return [f"subject AUROC {_num(t['subject_auroc'], '.3f')} (p{t['subject_score_percentile']:g})",
            f"  {t['healthy_subjects']} healthy / {t['tumour_subjects']} tumour",
            f"FP healthy {_num(t['false_positive_ml_healthy'], '.2f')} ml/subject"]


def _bin_label(edges) -> str:
    """``<1ml``, ``1-10ml``, ``>=10ml`` from a bin's [lower, upper) edges in ml."""
    low, high = edges
    return f"<{high:g}ml" if not low else f">={low:g}ml" if high is None else f"{low:g}-{high:g}ml"


def _lesion_lines(lesions: dict | None) -> list[str]:
    """Lesions found per size bin and false-positive lesions: a map that finds only big tumours shows here."""
    if not lesions:
        return []
    found, total, rate = lesions["detected"], lesions["lesions"], lesions["detection_rate"]
    edges = sorted(lesions["size_bins_ml"].items(), key=lambda item: item[1][0])  # JSON may have sorted the keys
    bins = [f"{_bin_label(bounds)} {found[b]}/{total[b]}" for b, bounds in edges]
    healthy = lesions["healthy"]["false_positive_lesions_per_subject"]
    share = "" if rate["all"] is None else f" ({100 * rate['all']:.0f}%)"
    return [f"lesions found {found['all']}/{total['all']}{share}",
            *("  " + "  ".join(bins[i:i + 2]) for i in range(0, len(bins), 2)),  # two bins a line: the panel is narrow
            f"FP lesions {_num(lesions['false_positive_lesions_per_subject'], '.2f')}/subject",
            f"  healthy {_num(healthy, '.2f')}/subject"]


def _recon_lines(recon: dict) -> list[str]:
    """Validation reconstruction quality: did the model learn healthy anatomy (threshold-free)?"""
    if recon.get("healthy_residual") is None:
        return []
    return ["val reconstruction:",
            f"  healthy residual {_num(recon['healthy_residual'], '.4f')}",
            f"  tumour/healthy {_num(recon['residual_ratio'], '.2f')}",
            f"  PSNR {_num(recon['psnr'], '.1f')} SSIM {_num(recon['ssim'], '.3f')}"]
