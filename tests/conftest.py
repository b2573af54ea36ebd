"""pytest hooks only; the helpers the tests share are in tests/helpers.py."""

from __future__ import annotations

import pytest


# The longest modules first: under `-n 3 --dist loadfile` (the README's test command) each module runs
# whole on one worker, in this order, so the long ones start at once instead of ending the run alone.
LONGEST_FIRST = ("test_finetune.py", "test_generate_e2e.py", "test_identity_and_stores.py", "test_s3.py",
                 "test_resume.py", "test_stages_e2e.py", "test_batch_size.py", "test_adapters_e2e.py",
                 "test_backends.py", "test_wheel.py")


def pytest_collection_modifyitems(config, items):
    import torch

    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a module keeps its own order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none found on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
