"""Shared pytest configuration: hypothesis profiles and the ``cuda`` marker."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

# CI is deterministic: derandomize makes hypothesis draw the same examples on every run.
settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, max_examples=50)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a core dependency
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if any("cuda" in item.keywords for item in items) and not _cuda_available():
        skip = pytest.mark.skip(reason="needs a CUDA device (none present)")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)
