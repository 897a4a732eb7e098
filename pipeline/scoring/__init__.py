"""Scoring stage: partial-noise reconstruction by a named sampler -> residual anomaly maps in the input's space."""

from pipeline.common import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    settings="ScoreSettings SAMPLER_NAMES",
    score="SAMPLERS Scorer load_scorer score_split score_subject",
    samplers="x0_reconstruct ddim_reconstruct ddpm_reconstruct patched_reconstruct",
    guided="guided_reconstruct",
    maps="read_index",
)
