"""Training: determinism (same seed, same codes), resume after SIGKILL, NaN guard, schedule, rounds."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from dseh import artifacts, losses, stages
from dseh.config import from_dict
from dseh.errors import DsehError
from dseh.models.factory import load_imgnet
from dseh.train.recipe import lr_for_epoch
from tests.helpers import REPO, tiny_raw


def _train_round0(cfg, data, out):
    stages.train_labnet(cfg, data, 0, out / "lab", progress=False)
    stages.train_imgnet(cfg, data, 0, out / "lab", out / "img", progress=False)


def test_determinism_same_seed_same_codes_bit_for_bit(tiny_data, tmp_path):
    cfg = from_dict(tiny_raw())
    _train_round0(cfg, tiny_data, tmp_path / "a")
    _train_round0(cfg, tiny_data, tmp_path / "b")
    for name in (artifacts.CODES,):
        assert np.array_equal(np.load(tmp_path / "a/img" / name), np.load(tmp_path / "b/img" / name))
    for d, f in (("lab", artifacts.TARGETS), ("img", artifacts.TRAIN_OUTPUTS)):
        with np.load(tmp_path / "a" / d / f) as x, np.load(tmp_path / "b" / d / f) as y:
            for k in x.files:
                assert np.array_equal(x[k], y[k]), (d, k)
    other = from_dict(tiny_raw(seed=1))
    _train_round0(other, tiny_data, tmp_path / "c")
    assert not np.array_equal(np.load(tmp_path / "a/img/codes.npy"), np.load(tmp_path / "c/img/codes.npy"))


@pytest.mark.slow
def test_compiled_training_step_trains_like_eager(tiny_data, tmp_path):
    """train.compile on the CPU (inductor needs a C compiler): the run completes, its saved model
    loads as a plain ImgNet, and its codes agree with the eager run's up to kernel rounding."""
    from dseh.codes import unpack

    _train_round0(from_dict(tiny_raw()), tiny_data, tmp_path / "eager")
    _train_round0(from_dict(tiny_raw(train={"compile": True})), tiny_data, tmp_path / "compiled")
    bits = tiny_raw()["bits"]
    eager, compiled = (unpack(np.load(tmp_path / d / "img" / artifacts.CODES), bits) for d in ("eager", "compiled"))
    assert (eager == compiled).mean() > 0.95
    model, state = load_imgnet(tmp_path / "compiled/img")
    assert state["bits"] == bits and not any(k.startswith("_orig_mod") for k in model.state_dict())


def test_two_rounds_continue_weights_and_use_imgnet_buffers(tiny_data, tmp_path):
    cfg = from_dict(tiny_raw(train={"rounds": 2}, labnet={"epochs": [2, 1]}, imgnet={"epochs": [1]}))
    _train_round0(cfg, tiny_data, tmp_path / "r0")
    stages.train_labnet(
        cfg, tiny_data, 1, tmp_path / "r1/lab", tmp_path / "r0/lab", tmp_path / "r0/img", progress=False
    )
    stages.train_imgnet(
        cfg, tiny_data, 1, tmp_path / "r1/lab", tmp_path / "r1/img", tmp_path / "r0/img", progress=False
    )
    s0 = torch.load(tmp_path / "r0/lab/model.pt", weights_only=False)
    s1 = torch.load(tmp_path / "r1/lab/model.pt", weights_only=False)
    # Adam state continued: step counts add up over rounds (2 epochs then 1 epoch of 7 batches)
    steps = lambda s: int(next(iter(s["optimizer"]["state"].values()))["step"])  # noqa: E731
    assert steps(s0) == 14 and steps(s1) == 21
    assert s1["round"] == 1
    hist = (tmp_path / "r1/lab/history.csv").read_text().splitlines()
    assert hist[0].startswith("round,epoch,lr") and len(hist) == 2
    with pytest.raises(DsehError, match="needs the LabNet and ImgNet outputs"):
        stages.train_labnet(cfg, tiny_data, 1, tmp_path / "x", progress=False)
    with pytest.raises(DsehError, match="past train.rounds"):
        stages.train_labnet(cfg, tiny_data, 2, tmp_path / "x", tmp_path / "r1/lab", tmp_path / "r1/img", progress=False)


def test_each_phase_clips_with_its_own_network_value(tiny_data, tmp_path, monkeypatch):
    """labnet.clip_value in the LabNet phase, imgnet.clip_value in the ImgNet phase; 0 never clips."""
    seen: list[float] = []
    real = torch.nn.utils.clip_grad_value_

    def spy(params, clip_value, **kw):
        seen.append(clip_value)
        return real(params, clip_value, **kw)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_value_", spy)
    cfg = from_dict(tiny_raw(labnet={"clip_value": 0.25}, imgnet={"clip_value": 0}))
    stages.train_labnet(cfg, tiny_data, 0, tmp_path / "lab", progress=False)
    assert seen and set(seen) == {0.25}
    seen.clear()
    stages.train_imgnet(cfg, tiny_data, 0, tmp_path / "lab", tmp_path / "img", progress=False)
    assert seen == []
    cfg = from_dict(tiny_raw(labnet={"clip_value": 0.25}, imgnet={"clip_value": 0.5}))
    stages.train_imgnet(cfg, tiny_data, 0, tmp_path / "lab", tmp_path / "img2", progress=False)
    assert seen and set(seen) == {0.5}


def test_release_lr_schedule():
    assert lr_for_epoch(3.0, 0.5, 10, 0, 0) == pytest.approx(1e-3)
    assert lr_for_epoch(3.0, 0.5, 10, 10, 0) == pytest.approx(10**-3.5)
    assert lr_for_epoch(3.0, 0.5, 10, 25, 1) == pytest.approx(10**-4.5)


def test_prefetch_keeps_order_and_only_depth_batches_alive():
    import weakref
    from concurrent.futures import ThreadPoolExecutor

    from dseh.train.feed import prefetch

    class Batch:
        def __init__(self, idx, epoch, i):
            self.key = (int(idx[0]), epoch, i)

    alive = weakref.WeakSet()

    def fetch(idx, epoch, i):
        b = Batch(idx, epoch, i)
        alive.add(b)
        return b

    batches = [np.array([10 * i]) for i in range(40)]
    seen, most = [], 0
    with ThreadPoolExecutor(max_workers=3) as pool:
        for b in prefetch(pool, fetch, batches, 7, depth=4):
            seen.append(b.key)
            del b  # no cycles: reference counting frees a batch at once (no gc.collect, slow with torch loaded)
            most = max(most, len(alive))
    assert seen == [(10 * i, 7, i) for i in range(40)]
    assert most <= 5  # the 4 batches in flight and the one in use, never the epoch's 40
    assert [b.key for b in prefetch(ThreadPoolExecutor(1), fetch, batches[:2], 0, depth=5)] == [(0, 0, 0), (10, 0, 1)]


def test_gather_images_reads_rows_in_order_and_mirror_flips_the_chosen_ones(tmp_path):
    from dseh.train.feed import gather_images, mirror

    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.integers(0, 255, (50, 6, 5, 3), dtype=np.uint8))
    images = np.load(tmp_path / "x.npy", mmap_mode="r")
    items = rng.permutation(50)[:17]
    flip = rng.random(17) < 0.5
    expected = np.asarray(images)[items].copy()
    expected[flip] = expected[flip, :, ::-1]
    got = gather_images(images, items)
    assert got.dtype == torch.uint8 and np.array_equal(got.numpy(), np.asarray(images)[items])
    assert np.array_equal(mirror(got, torch.from_numpy(flip)).numpy(), expected)


def test_translate_shifts_each_image_by_its_offsets_with_a_zero_border():
    from dseh.train.feed import translate

    rng = np.random.default_rng(0)
    x = rng.integers(1, 255, (4, 6, 5, 3), dtype=np.uint8)
    offsets = np.array([[0, 0], [1, -2], [-2, 2], [2, 1]])
    expected = np.zeros_like(x)
    for i, (dy, dx) in enumerate(offsets):  # output (r, c) reads input (r + dy, c + dx) where that exists
        for r in range(6):
            for c in range(5):
                if 0 <= r + dy < 6 and 0 <= c + dx < 5:
                    expected[i, r, c] = x[i, r + dy, c + dx]
    got = translate(torch.from_numpy(x), torch.from_numpy(offsets), 2)
    assert got.dtype == torch.uint8 and np.array_equal(got.numpy(), expected)


def test_shift_augments_training_and_zero_keeps_the_codes(tiny_data, tmp_path):
    base = from_dict(tiny_raw())
    _train_round0(base, tiny_data, tmp_path / "a")
    _train_round0(from_dict(tiny_raw(), ["imgnet.shift=0"]), tiny_data, tmp_path / "b")
    _train_round0(from_dict(tiny_raw(), ["imgnet.shift=2"]), tiny_data, tmp_path / "c")
    weights = {k: artifacts.load_step_model(tmp_path / k / "img", "imgnet").state_dict["fc9.weight"] for k in "abc"}
    assert np.array_equal(np.load(tmp_path / "a/img" / artifacts.CODES), np.load(tmp_path / "b/img" / artifacts.CODES))
    assert torch.equal(weights["a"], weights["b"]) and not torch.equal(weights["a"], weights["c"])


def test_loader_threads_per_device(monkeypatch):
    from dseh.train.feed import loader_threads

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert loader_threads(from_dict({"train": {"loader_workers": 3}}).train, gpu) == 3
    auto = from_dict({}).train
    assert auto.loader_workers == 0 and loader_threads(auto, cpu) == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(16)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert loader_threads(auto, gpu) == 8  # 16 cores for one GPU process: capped at 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert loader_threads(auto, gpu) == 4  # a quarter of the cores per GPU
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert loader_threads(auto, gpu) == 2  # never fewer than 2


def test_nan_loss_stops_naming_term_and_epoch_and_keeps_checkpoint(tiny_data, tmp_path, monkeypatch):
    real = losses.quantization_loss_j3
    calls = {"n": 0}

    def flaky(h, reduction="mean"):
        calls["n"] += 1
        value = real(h, reduction)
        return value * float("nan") if calls["n"] > 10 else value  # 7 batches per epoch: NaN in epoch 2

    monkeypatch.setattr(losses, "quantization_loss_j3", flaky)
    cfg = from_dict(tiny_raw(labnet={"epochs": [3]}))
    with pytest.raises(DsehError, match=r"loss term 'J3' became nan at epoch 2.*last good checkpoint"):
        stages.train_labnet(cfg, tiny_data, 0, tmp_path / "lab", progress=False)
    ckpt = artifacts.checkpoint_path(tmp_path / "lab")
    assert ckpt.is_file() and torch.load(ckpt, weights_only=False)["epoch"] == 1
    assert not (tmp_path / "lab").exists()


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    import shutil

    import yaml

    raw = tiny_raw(data={"n_database": 400, "n_train": 400}, imgnet={"epochs": [5], "batch_size": 16})
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    cfg = from_dict(raw)
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    stages.prepare(cfg, clean / "data", progress=False)
    stages.train_labnet(cfg, clean / "data", 0, clean / "labnet/round0", progress=False)
    shutil.copytree(clean, killed)
    cmd = [sys.executable, "-m", "dseh", "train-imgnet", "-q", "--params", str(params), "--root", str(killed)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ckpt = artifacts.checkpoint_path(killed / "imgnet/round0")
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training finished before it could be killed"
    assert not (killed / "imgnet/round0").exists()
    done = torch.load(ckpt, weights_only=False)["epoch"]
    assert 1 <= done < 5
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming after epoch {done}" in resumed.stderr
    assert not ckpt.exists()  # removed once the step completed
    stages.train_imgnet(cfg, clean / "data", 0, clean / "labnet/round0", clean / "imgnet/round0", progress=False)
    a = torch.load(killed / "imgnet/round0/model.pt", weights_only=False)
    b = torch.load(clean / "imgnet/round0/model.pt", weights_only=False)
    for k in b["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    assert np.array_equal(np.load(killed / "imgnet/round0/codes.npy"), np.load(clean / "imgnet/round0/codes.npy"))
