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


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is part of the stack
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    """Skips ``@pytest.mark.gpu`` tests, with the reason, where torch sees no CUDA device."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items or _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA: torch.cuda.is_available() is False on this machine")
    for item in gpu_items:
        item.add_marker(skip)
