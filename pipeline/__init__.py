"""Unsupervised brain-tumour detection with diffusion models, built on MONAI.

Stages, one module each, data flowing one way:
``synth``/``data`` -> ``noise`` -> ``train`` -> ``score`` -> ``metrics`` -> ``leaderboard``.
Importing the package first applies the process-wide allocator setting of :mod:`pipeline.runtime`.
"""

from pipeline import runtime  # noqa: F401  (before anything allocates large tensors)

__version__ = "0.1.0"
