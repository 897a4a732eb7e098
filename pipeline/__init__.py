"""Unsupervised brain-tumour detection with diffusion models, built on MONAI.

Stages, one module each, data flowing one way:
``synth``/``data`` -> ``noise`` -> ``train`` -> ``score`` -> ``metrics`` -> ``leaderboard``.
Importing the package first applies the process-wide allocator setting of :mod:`pipeline.runtime`.
The Python API (:mod:`pipeline.api`): ``pipeline.train``, ``pipeline.score``, ``pipeline.evaluate`` and
``pipeline.benchmark``, loaded on first use so that ``import pipeline`` stays light.
"""

from pipeline import runtime  # noqa: F401  (before anything allocates large tensors)
from pipeline.common import lazy_exports

__version__ = "0.1.0"
__all__, __getattr__, _api_names = lazy_exports(__name__, api="train score evaluate benchmark")


def __dir__() -> list[str]:
    return sorted({*globals(), *_api_names()})
