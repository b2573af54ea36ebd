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


@pytest.fixture
def http_folder(tmp_path):
    """(folder, url): `folder` served read-only over HTTP as Python's http.server serves it, a listing page
    for each subfolder (what fsspec's HTTP store lists by its links)."""
    import functools
    import http.server
    import threading

    folder = tmp_path / "served"
    folder.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
