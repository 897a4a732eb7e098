"""Unsupervised brain-tumour detection with diffusion models, built on MONAI.

Stages, one module each, data flowing one way:
``synth``/``data`` -> ``noise`` -> ``train`` -> ``score`` -> ``metrics`` -> ``leaderboard``.
"""

__version__ = "0.1.0"
