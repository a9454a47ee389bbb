"""Shared fixtures: the tiny config, the tiny dataset prepared once per session, and (through the
tests.servers plugin) real SeaweedFS S3 and MLflow servers. Helpers that tests import live in
tests/helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from dseh.config import from_dict
from tests.helpers import tiny_raw

pytest_plugins = ["tests.servers"]


@pytest.fixture
def tiny_cfg():
    return from_dict(tiny_raw())


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """The digits-mosaic dataset of tiny_raw(), prepared once per session for the tests that only
    read it (a test that changes a dataset prepares its own). Its files are read-only, so a test
    that writes to one fails instead of changing what later tests see."""
    from dseh import stages

    out = tmp_path_factory.mktemp("tiny") / "data"
    stages.prepare(from_dict(tiny_raw()), out, progress=False)
    for path in out.rglob("*"):
        if path.is_file():
            path.chmod(0o444)
    return out
