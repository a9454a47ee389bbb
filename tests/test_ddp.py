"""Data-parallel training (DDP) on the CPU with 2 gloo processes under torchrun: the ranks keep
identical buffers and weights, the result matches one process, and the pipeline's steps run
under torchrun with rank 0 writing. Select with `pytest -k ddp`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from dseh import kube
from dseh.errors import DsehError
from dseh.train import device as devices
from dseh.train.device import Dist, rank_batches
from tests.helpers import LEARNING, REPO, tiny_raw
from tests.servers import free_port

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
# the ImgNet weights of 2 ranks drift from one process's by float reduction order and per-rank
# batch-norm statistics; the mAP of the whole pipeline stays within this of the one-process run
MAP_TOLERANCE = 0.05


def torchrun(args: list[str], cwd, nproc: int = 2, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [*TORCHRUN, "--nnodes", "1", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1"]
    cmd += ["--master-port", str(free_port()), *args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def test_ddp_rank_batches_interleave_like_distributed_sampler_and_pad():
    perm = np.arange(11)
    one = rank_batches(perm, 4, Dist())
    assert [b.tolist() for b in one] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    r0, r1 = rank_batches(perm, 4, Dist(0, 2)), rank_batches(perm, 4, Dist(1, 2))
    # 11 items padded to 12 by wrapping; each rank takes every other row of each global batch
    assert [b.tolist() for b in r0] == [[0, 2], [4, 6], [8, 10]]
    assert [b.tolist() for b in r1] == [[1, 3], [5, 7], [9, 0]]
    with pytest.raises(DsehError, match="batch size 5 is not divisible by the 2"):
        rank_batches(perm, 5, Dist(0, 2))


def test_ddp_two_gloo_ranks_keep_identical_buffers_and_match_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(REPO / "tests/ddp_worker.py"), str(one)], check=True, env=env, timeout=120)
    torchrun([str(REPO / "tests/ddp_worker.py"), str(two)], tmp_path)
    ref, r0, r1 = (torch.load(p) for p in (one / "rank0.pt", two / "rank0.pt", two / "rank1.pt"))
    assert r0["world"] == 2 and ref["world"] == 1
    for key in ("F", "H", "U", "labnet", "imgnet"):
        assert torch.equal(r0[key], r1[key]), key  # every rank holds the same buffers and weights
    assert r0["loss"] == r1["loss"]  # the logged epoch loss is the mean over both ranks' items
    # LabNet has no batch statistics: 2 ranks x half batches average to the one-process gradient
    torch.testing.assert_close(r0["F"], ref["F"], atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(r0["labnet"], ref["labnet"], atol=1e-6, rtol=1e-4)
    assert abs(r0["loss"][0] - ref["loss"][0]) < 1e-5
    # the buffers were filled for every item (the batch rows of both ranks reached both)
    assert bool((r0["U"] != 0).any(dim=1).all()) and bool((r0["H"] != 0).any(dim=1).all())


def test_ddp_pipeline_steps_under_torchrun_match_one_process(tmp_path, monkeypatch):
    """The Kubeflow components' path: run_training_step with gpus=2 runs the step under torchrun
    (--standalone, 2 gloo processes on the CPU here)."""

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_raw(**LEARNING)))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["--params", str(params), "--root", str(one), "-q"]
    for step in ("prepare", "train-labnet", "train-imgnet", "evaluate"):
        assert train_main([step, *args]) == 0
    text = params.read_text()
    summary = kube.run_training_step("train-labnet", text, 0, 2, one / "data", two / "labnet/round0")
    assert summary["distinct_codes"] > 1
    kube.run_training_step(
        "train-imgnet", text, 0, 2, one / "data", two / "imgnet/round0", labnet=two / "labnet/round0"
    )
    assert train_main(["evaluate", *args[:-3], "--root", str(two), "--data", str(one / "data"), "-q"]) == 0
    ref, got = (json.loads((root / "eval/metrics.json").read_text()) for root in (one, two))
    # rank 0 wrote one step output; no checkpoint or second copy is left behind
    assert sorted(p.name for p in (two / "imgnet").iterdir()) == ["round0"]
    assert not list(two.rglob("*.ckpt.pt")) and not list(two.rglob("*.tmp*"))
    hist = json.loads((two / "imgnet/round0/history.json").read_text())
    assert len(hist) == LEARNING["imgnet"]["epochs"][0]
    assert abs(got["map_all"] - ref["map_all"]) <= MAP_TOLERANCE, (ref["map_all"], got["map_all"])


def test_ddp_a_failing_step_under_torchrun_reports_its_own_error(tmp_path, monkeypatch):

    monkeypatch.setenv("PYTHONPATH", str(REPO))
    text = yaml.safe_dump(tiny_raw())
    with pytest.raises(
        DsehError, match=r"train-labnet` on 2 process\(es\) failed: dseh: error: .*is not a prepared dataset"
    ):
        kube.run_training_step("train-labnet", text, 0, 2, tmp_path / "missing", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def train_main(argv: list[str]) -> int:
    from dseh.cli import main

    return main(argv)


def test_ddp_nothing_to_join_in_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert devices.init_distributed("cpu") == Dist()
    rows = torch.arange(6.0).reshape(3, 2)
    assert torch.equal(devices.all_gather_rows(rows), rows) and devices.global_batch(rows) is rows
