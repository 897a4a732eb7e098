"""How an anomaly map is made: one checked, frozen settings object that every scoring module reads.

It sits below the samplers, post-processing and the scoring loop so that each of them can import it
(the bundle's inference config builds it; the model card stores it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from pipeline.common import BASELINE, CLASSIFIER_GUIDED, GUIDED
from pipeline.errors import InputError

SUPERVISION = {GUIDED: "weak slice labels", CLASSIFIER_GUIDED: "weak slice labels"}  # every other sampler: "unsupervised"
SAMPLER_NAMES = ("x0", "ddim", "ddpm", "patched", GUIDED, CLASSIFIER_GUIDED, BASELINE)
"""What ``sampler`` may name: the registry :data:`pipeline.scoring.score.SAMPLERS` plus the model-free baseline
(named here, not derived from the registry, so that every scoring module can read the settings without importing
the samplers; a test checks the two agree)."""
REDUCTIONS = ("max", "mean")
RESIDUAL_NORMS = ("none", "position", "intensity")
MAP_NORMS = ("none", "subject")
RESIDUAL_SIGNS = ("abs", "positive")
AUTO_BATCH = "auto"
"""``batch_size`` the scorer replaces by the largest batch that fits its memory budget (:mod:`pipeline.scoring.memory`)."""


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise InputError(name, f"must be an integer >= {low}, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class ScoreSettings:
    """How an anomaly map is made, checked once when built.

    ``sampler``: ``x0`` (the fast sampler: one call, the model's x0 prediction from x_t),
    ``ddim`` (``ddim_steps`` calls; 1 computes the same as ``x0``), ``guided`` (counterfactual of a
    class-conditional model: DDIM inversion to ``t_start`` and decoding guided towards healthy with
    scale ``guidance_scale``, ``ddim_steps`` calls each way; trained with slice labels), ``classifier_guided``
    (the same with an unconditional model whose eps is shifted by a noisy classifier's gradient towards healthy,
    scale ``guidance_scale``; the classifier trained with slice labels),
    ``ddpm`` (AnoDDPM, every step), ``patched`` (pDDPM: one ``patch_size`` patch noised at a time,
    DDIM in ``ddim_steps`` calls) or ``flair`` (the baseline: map = FLAIR intensity, no model).
    ``t_start``: one noise level or several (a t_L ensemble: residuals averaged over levels and
    ``n_draws`` noise draws). ``residual_smooth``: a k x k mean of the signed residual x - recon before its
    absolute value (1 = off): image noise the model does not reproduce averages out, a lesion's coherent
    difference does not. ``residual_sign``: ``abs`` counts |x - recon|; ``positive`` only x - recon > 0, tissue
    brighter than the healthy reconstruction (the hyperintensity prior of Baur et al., MedIA 2021: tumour and
    edema are bright in FLAIR and T2; darker-than-healthy residuals of bias and partial volume are dropped). Map: channel residuals -> optional healthy-residual z-score
    (``residual_norm``) -> reduce over channels -> eroded brain mask -> 2D median -> 3D median
    (``median_3d``, 1 = off) -> small components (< ``min_component_voxels``) above the
    ``component_quantile`` of healthy validation maps clamped away -> optional per-subject
    standardisation (``map_norm: subject``: the map divided by its own healthy level over the subject's
    brain, so a scan that is noisier or more biased all over does not light up everywhere at one threshold).
    """

    sampler: str = "ddim"
    t_start: int | tuple[int, ...] = 250
    ddim_steps: int = 10
    n_draws: int = 1
    patch_size: int | None = None
    batch_size: int | str = 64
    erode_iters: int = 1
    median_size: int = 3
    median_3d: int = 1
    reduce: str = "max"
    residual_norm: str = "none"
    min_component_voxels: int = 0
    component_quantile: float = 0.99
    map_norm: str = "none"
    residual_smooth: int = 1
    residual_sign: str = "abs"
    guidance_scale: float = 3.0

    def __post_init__(self):
        if self.sampler not in SAMPLER_NAMES:
            raise InputError("sampler", f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLER_NAMES)}")
        levels = self.t_start if isinstance(self.t_start, (list, tuple)) else [self.t_start]
        if not levels:
            raise InputError("t_start", "needs at least one noise level")
        object.__setattr__(self, "t_start", tuple(_check_int("t_start", t, 1) for t in levels)
                           if isinstance(self.t_start, (list, tuple)) else _check_int("t_start", self.t_start, 1))
        for name, low in (("ddim_steps", 1), ("n_draws", 1), ("erode_iters", 0), ("median_3d", 1),
                          ("min_component_voxels", 0)):
            _check_int(name, getattr(self, name), low)
        if self.batch_size != AUTO_BATCH:
            _check_int("score_batch_size", self.batch_size, 1)
        if self.patch_size is not None:
            _check_int("patch_size", self.patch_size, 1)
        elif self.sampler == "patched":
            raise InputError("patch_size", "the patched sampler needs a patch size in pixels")
        for name in ("median_size", "median_3d", "residual_smooth"):
            value = getattr(self, name)
            if int(value) != value or value < 1 or value % 2 == 0:
                raise InputError(name, f"must be an odd integer >= 1, got {value!r}")
        if self.reduce not in REDUCTIONS:
            raise InputError("map_reduce", f"unknown channel reduction {self.reduce!r}; choose one of {', '.join(REDUCTIONS)}")
        if self.residual_norm not in RESIDUAL_NORMS:
            raise InputError("residual_norm", f"unknown normalisation {self.residual_norm!r}; "
                                              f"choose one of {', '.join(RESIDUAL_NORMS)}")
        if self.residual_sign not in RESIDUAL_SIGNS:
            raise InputError("residual_sign", f"unknown residual sign {self.residual_sign!r}; "
                                              f"choose one of {', '.join(RESIDUAL_SIGNS)}")
        if self.map_norm not in MAP_NORMS:
            raise InputError("map_norm", f"unknown map normalisation {self.map_norm!r}; choose one of {', '.join(MAP_NORMS)}")
        if not 0 < float(self.component_quantile) < 1:
            raise InputError("component_quantile", f"must be in (0, 1), got {self.component_quantile!r}")
        if isinstance(self.guidance_scale, bool) or not isinstance(self.guidance_scale, (int, float)):
            raise InputError("guidance_scale", f"must be a number, got {self.guidance_scale!r}")

    @property
    def supervision(self) -> str:
        """What the method learned from: the leaderboard must not rank weakly supervised entries as unsupervised."""
        return SUPERVISION.get(self.sampler, "unsupervised")

    @property
    def levels(self) -> tuple[int, ...]:
        return self.t_start if isinstance(self.t_start, tuple) else (self.t_start,)

    @property
    def needs_calibration(self) -> bool:
        return self.sampler != BASELINE and (self.residual_norm != "none" or self.min_component_voxels > 1)

    def check_levels(self, num_train_timesteps: int) -> None:
        if max(self.levels) > num_train_timesteps - 1:
            raise InputError("t_start", f"must be in [1, {num_train_timesteps - 1}] (num_train_timesteps="
                                        f"{num_train_timesteps}), got {max(self.levels)}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["t_start"] = list(self.levels) if isinstance(self.t_start, tuple) else self.t_start
        d["supervision"] = self.supervision
        return d
