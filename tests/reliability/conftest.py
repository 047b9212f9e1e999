"""Fixtures of the reliability drills: Serve on 127.0.0.1:8300 (a port no other suite uses) and a
registry of random tiny models. Module-scoped, so each drill module starts and stops its own
Serve instance on the session's one Ray instance; ``serve_on`` waits, by condition, for the port
to be free before it starts (test_security.py's own cluster also serves on 8300) and for Serve to
be gone after it stops."""

from __future__ import annotations

import pytest

from helpers import publish_tiny_models, serve_on

PORT = 8300
PROBE = "def main("


@pytest.fixture(scope="module")
def serve_8300(ray_session):
    with serve_on(PORT) as serve:
        yield serve


@pytest.fixture(scope="module")
def tiny_registry(tmp_path_factory):
    """(storage path, {version: greedy 8-token answer to PROBE}) with tiny@v1 and tiny@v2."""
    storage = tmp_path_factory.mktemp("reliability-storage")
    answers = publish_tiny_models(storage, (1, 2), PROBE)
    assert answers["v1"] != answers["v2"], "the two random models must answer differently"
    return storage, answers
