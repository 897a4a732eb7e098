"""Leaderboard stage: protocol registry, checked submissions to a CSV, ranked tables with tests, static site."""

from pipeline.common import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    registry="register_protocol",
    submission="submit read_leaderboard",
    ranking="ranked_table show",
    site="build_site",
)
