"""Shared fixtures: the tiny config and (through the tests.servers plugin) real SeaweedFS S3 and
MLflow servers. Helpers that tests import live in tests/helpers.py."""

from __future__ import annotations

import pytest

from dseh.config import from_dict
from tests.helpers import tiny_raw

pytest_plugins = ["tests.servers"]


@pytest.fixture
def tiny_cfg():
    return from_dict(tiny_raw())
