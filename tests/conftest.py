"""pytest hooks and the fixtures several test files share; the helpers the tests share are in tests/helpers.py
(and, for the k8s/ checks, tests/k8s_objects.py)."""

from __future__ import annotations

import pytest

from k8s_objects import SOURCES, overlay_objects


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none found on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=SOURCES)
def objects(request) -> list[tuple[str, dict]]:
    """Every object one k8s/ overlay applies, as files or as `kubectl kustomize` renders them, with the
    RayJobs its CronJob creates (tests/test_k8s*.py)."""
    return overlay_objects(request.param)
