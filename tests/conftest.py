"""Shared fixtures: locations of the real data sets in ../shared/data (skipped when absent)."""

import os

import pytest

SHARED_DATA = os.environ.get(
    "SIDVID_SHARED_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
)
ML100K = os.path.join(SHARED_DATA, "movielens", "ml-100k")
BEAUTY = os.path.join(SHARED_DATA, "amazon", "beauty")
ML1M_META = os.path.join(SHARED_DATA, "movielens", "ml-1m-metadata-only")


def require(path: str) -> str:
    if not os.path.isdir(path):
        pytest.skip(f"shared data set not present: {path} (not redistributable; see README)")
    return path


@pytest.fixture
def ml100k_path() -> str:
    return require(ML100K)


@pytest.fixture
def beauty_path() -> str:
    return require(BEAUTY)


@pytest.fixture
def cache_dir(tmp_path) -> str:
    return str(tmp_path / "cache")
