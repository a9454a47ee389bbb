"""Hostile input and faults beyond the data files (those are in test_data_inputs.py): crafted and
corrupt model files and checkpoints, bad params and CLI values, tracking servers that stall or die
mid-step, promotion that must not pretend, and leftovers of killed runs."""

import http.server
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from dseh import artifacts, stages, storage
from dseh.artifacts import Layout, load_step_model
from dseh.cli import main
from dseh.config import from_dict
from dseh.errors import DsehError
from tests.helpers import tiny_raw, write_image
from tests.servers import free_port, stop_pid


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny prepared dataset, LabNet, ImgNet and evaluation (tracking off)."""
    lay = Layout(tmp_path_factory.mktemp("hostile"))
    cfg = from_dict(tiny_raw())
    stages.prepare(cfg, lay.data, progress=False)
    stages.train_labnet(cfg, lay.data, 0, lay.labnet(0), progress=False)
    stages.train_imgnet(cfg, lay.data, 0, lay.labnet(0), lay.imgnet(0), progress=False)
    stages.evaluate(cfg, lay.data, lay.labnet(0), lay.imgnet(0), lay.eval, progress=False)
    return lay


class _RunsCode:
    """Unpickling this runs a shell command: what a crafted model file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_model_file_executes_nothing(trained, tmp_path, capsys):
    bad = tmp_path / "model"
    bad.mkdir()
    marker = tmp_path / "pwned"
    torch.save({"kind": "imgnet", "payload": _RunsCode(marker)}, bad / artifacts.MODEL)
    with pytest.raises(DsehError, match=f"{bad / artifacts.MODEL}.*loaded safely"):
        load_step_model(bad, "imgnet")
    img = tmp_path / "q.png"
    write_image(img, 0)
    assert main(["search", str(img), "--model", str(bad), "--data", str(trained.data)]) == 2
    assert "loaded safely" in capsys.readouterr().err
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"not a zip file at all", None])
def test_corrupt_truncated_or_empty_model_files_name_the_file(trained, tmp_path, content):
    bad = tmp_path / "model"
    bad.mkdir()
    good = (trained.imgnet(0) / artifacts.MODEL).read_bytes()
    (bad / artifacts.MODEL).write_bytes(good[: len(good) // 2] if content is None else content)
    with pytest.raises(DsehError, match=str(bad / artifacts.MODEL)):
        load_step_model(bad, "imgnet")


def test_a_corrupt_resume_checkpoint_is_set_aside_and_training_starts_over(trained, tmp_path, caplog):
    out = tmp_path / "labnet" / "round0"
    ckpt = artifacts.checkpoint_path(out)
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"\x00garbage")
    cfg = from_dict(tiny_raw())
    summary = stages.train_labnet(cfg, trained.data, 0, out, progress=False)
    assert summary["epochs"] == 2 and (out / artifacts.MODEL).is_file()
    assert ckpt.with_name(ckpt.name + ".bad").read_bytes() == b"\x00garbage"
    assert "cannot be read" in caplog.text


@pytest.mark.parametrize(
    "override, key",
    [
        ("seed=-1", "seed"),
        ("imgnet.lr_exp=.nan", "imgnet.lr_exp"),
        ("labnet.beta=.inf", "labnet.beta"),
        ("labnet.epochs=[0]", "labnet.epochs"),
        ("imgnet.epochs=[0]", "imgnet.epochs"),
        ("evaluate.topk=0", "evaluate.topk"),
        ("bits=5000", "bits"),
    ],
)
def test_bad_param_values_are_refused_naming_the_key(tmp_path, capsys, override, key):
    assert main(["prepare", "--root", str(tmp_path), "-q", "-S", override]) == 2
    err = capsys.readouterr().err
    assert f"'{key}'" in err and "Traceback" not in err
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("k", ["0", "-5", "x"])
def test_search_k_below_one_is_refused(trained, tmp_path, capsys, k):
    with pytest.raises(SystemExit) as e:
        main(["search", "q.png", "--model", str(trained.imgnet(0)), "--data", str(trained.data), "-k", k])
    assert e.value.code == 2
    assert "-k" in capsys.readouterr().err


def test_search_names_a_directory_given_as_an_image(trained, tmp_path, capsys):
    assert main(["search", str(tmp_path), "--model", str(trained.imgnet(0)), "--data", str(trained.data)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_a_file_where_a_step_folder_is_expected_says_so(trained, capsys):
    model_file = trained.imgnet(0) / artifacts.MODEL
    assert main(["search", "q.png", "--model", str(model_file), "--data", str(trained.data)]) == 2
    assert "is a file" in capsys.readouterr().err


# --------------------------------------------------------------------------- promotion


def _promote_cfg(**tracking):
    return from_dict(tiny_raw(tracking={"enabled": True, "timeout_s": 2.0, **tracking}))


def test_dry_run_writes_nothing_anywhere(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    before = set(tmp_path.iterdir())
    d = stages.promote(_promote_cfg(), trained.data, trained.imgnet(0), trained.eval, None, dry_run=True)
    assert d["dry_run"] and d["decision"] in ("would promote", "would not promote")
    assert set(tmp_path.iterdir()) == before  # no mlflow.db, no mlruns/


def test_promote_fails_when_the_registry_is_unreachable_whatever_required_says(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    for required in (True, False):
        with pytest.raises(DsehError, match="unreachable"):
            stages.promote(
                _promote_cfg(required=required), trained.data, trained.imgnet(0), trained.eval, tmp_path / "p"
            )
    assert not (tmp_path / "p").exists()


def test_decision_names_a_champion_only_when_one_exists(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    metrics = json.loads((trained.eval / artifacts.METRICS).read_text())
    assert metrics["collapsed"]  # the tiny model's codes collapse: it is never made champion
    d = stages.promote(
        _promote_cfg(registered_model="hostile"), trained.data, trained.imgnet(0), trained.eval, tmp_path / "p"
    )
    assert d["decision"] == "not promoted" and d["model_uri"] is None and d["champion_version"] is None
    assert json.loads((tmp_path / "p" / artifacts.DECISION).read_text())["model_uri"] is None


# --------------------------------------------------------------------------- tracking servers that fail


class _StallAfterHealth(http.server.BaseHTTPRequestHandler):
    """Answers /health, then holds every other request far longer than any timeout."""

    def _reply(self):
        if self.path.rstrip("/").endswith("/health"):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"OK")
        else:
            time.sleep(60)

    do_GET = do_POST = do_PATCH = _reply

    def log_message(self, *args):
        pass


def test_a_server_that_stalls_after_health_fails_the_step_within_a_bound(trained, tmp_path, monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StallAfterHealth)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    try:
        t0 = time.monotonic()
        with pytest.raises(DsehError, match=f"MLflow tracking server {uri}"):
            stages.train_labnet(_promote_cfg(timeout_s=1.0), trained.data, 0, tmp_path / "lab", progress=False)
        assert time.monotonic() - t0 < 20
        t0 = time.monotonic()
        with pytest.raises(DsehError, match=uri):
            stages.promote(_promote_cfg(timeout_s=1.0), trained.data, trained.imgnet(0), trained.eval, None, True)
        assert time.monotonic() - t0 < 20
    finally:
        server.shutdown()
    assert not (tmp_path / "lab").exists()


def test_a_tracking_server_killed_during_a_step_fails_it_with_one_message(trained, tmp_path, monkeypatch):
    """A real `mlflow server` that dies while LabNet trains: the step ends in one DsehError naming
    the server, within a few seconds, and the resume checkpoint of the finished epochs stays."""
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
         f"sqlite:///{tmp_path}/mlflow.db", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                from dseh.tracking import check_server

                check_server(uri, 2.0)
                break
            except DsehError:
                assert proc.poll() is None and time.time() < deadline, (tmp_path / "server.log").read_text()[-2000:]
                time.sleep(0.5)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        real = stages.run_phase

        def kill_then_train(*args, **kwargs):
            stop_pid(proc)  # the server dies after the step opened its run
            return real(*args, **kwargs)

        monkeypatch.setattr(stages, "run_phase", kill_then_train)
        t0 = time.monotonic()
        with pytest.raises(DsehError, match=f"MLflow tracking server {uri}"):
            stages.train_labnet(_promote_cfg(timeout_s=2.0), trained.data, 0, tmp_path / "lab", progress=False)
        assert time.monotonic() - t0 < 60
    finally:
        stop_pid(proc)
        log.close()


# --------------------------------------------------------------------------- leftovers of killed runs


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_rerun_removes_what_a_killed_run_left_and_restores_a_moved_aside_output(tmp_path):
    out = tmp_path / "step"
    pid = _dead_pid()
    leftover = tmp_path / f".step.tmp-{storage._HOST}-{pid}-abc123"
    (leftover / "sub").mkdir(parents=True)
    live = tmp_path / f".step.tmp-{storage._HOST}-{os.getpid()}-xyz"  # a live writer's: kept
    live.mkdir()
    moved = tmp_path / f".step.old-{storage._HOST}-{pid}"  # killed between the two renames
    moved.mkdir()
    (moved / "model.pt").write_text("previous output")
    with storage.atomic_dir(out) as tmp:
        assert (out / "model.pt").read_text() == "previous output"  # put back before anything else
        (tmp / "model.pt").write_text("new output")
    assert (out / "model.pt").read_text() == "new output"
    assert not leftover.exists() and not moved.exists() and live.exists()


def test_a_silent_s3_endpoint_fails_a_read_within_its_bound(monkeypatch):
    """A server that accepts connections and never answers: one error naming the object, within
    about s3_retries x (s3_timeout_s + 2) s (docs/data.md)."""
    import socket

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    held = []
    threading.Thread(target=lambda: [held.append(srv.accept()) for _ in iter(int, 1)], daemon=True).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{srv.getsockname()[1]}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    storage._local.__dict__.clear()
    try:
        for retries in (1, 2):
            t0 = time.monotonic()
            with pytest.raises(DsehError, match="s3://bucket/key"):
                storage.read_bytes("s3://bucket/key", timeout_s=1.0, retries=retries)
            assert time.monotonic() - t0 < retries * (1.0 + 2.0) + 1.0
    finally:
        storage._local.__dict__.clear()
        srv.close()


def test_epoch_metrics_reach_mlflow_as_each_epoch_ends(trained, tmp_path, monkeypatch):
    """A step that dies in its third epoch leaves the first two epochs' metrics in its FAILED run."""
    import mlflow

    from dseh.tracking import Tracker

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    real = Tracker.log_epoch

    def dies_in_epoch_three(self, row):
        real(self, row)
        if row["epoch"] == 2:
            raise DsehError("killed in epoch 3")

    monkeypatch.setattr(Tracker, "log_epoch", dies_in_epoch_three)
    cfg = from_dict(tiny_raw(tracking={"enabled": True, "experiment": "live"}, labnet={"epochs": [4]}))
    with pytest.raises(DsehError, match="killed in epoch 3"):
        stages.train_labnet(cfg, trained.data, 0, tmp_path / "lab", progress=False)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("live")
    (run,) = client.search_runs([exp.experiment_id], "tags.`dseh.step` = 'train_labnet'")
    assert run.info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]


def test_a_kubeflow_pod_without_a_tracking_uri_fails_naming_the_secret(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("KFP_POD_NAME", "dseh-run-abc-train-labnet")
    with pytest.raises(DsehError, match="mlflow_secret"):
        stages.train_labnet(_promote_cfg(), trained.data, 0, tmp_path / "lab", progress=False)
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "lab").exists()


def test_search_with_a_registry_model_fails_fast_when_the_server_is_unreachable(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    img = tmp_path / "q.png"
    write_image(img, 0)
    codes = trained.imgnet(0) / artifacts.CODES
    args = ["search", str(img), "--model", "models:/dseh-imgnet@champion", "--codes", str(codes)]
    t0 = time.monotonic()
    assert main([*args, "--data", str(trained.data), "--timeout", "2"]) == 2
    assert time.monotonic() - t0 < 10
    assert "unreachable" in capsys.readouterr().err


def test_review_cases_end_in_one_message(trained, tmp_path, capsys):
    """Found by trying the CLI as a user would: each ends in one `dseh: error:` line, exit 2."""
    data, img = str(trained.data), str(trained.imgnet(0))
    q = tmp_path / "q.png"
    write_image(q, 0)
    not_npy, other = tmp_path / "codes.npy", tmp_path / "other"
    not_npy.write_bytes(b"not an array")
    stages.prepare(from_dict(tiny_raw(seed=1)), other, progress=False)  # same sizes, another dataset
    (tmp_path / "afile").write_text("")
    cases = [
        (["search", str(q), "--model", img, "--data", data, "--codes", str(not_npy)], "is not a .npy array"),
        (["search", str(q), "--model", img, "--data", str(other)], "another prepared dataset"),
        (["prepare", "-q", "-S", "imgnet.dropout=1.5"], "'imgnet.dropout' must be at most 1"),
        (["prepare", "-q", "-S", "tracking.registered_model="], "must not be empty"),
        (
            [
                "train-labnet",
                "-q",
                "--data",
                data,
                "--out",
                str(tmp_path / "l"),
                "-S",
                "train.device=tpu",
                "-S",
                "tracking.enabled=false",
            ],
            "'train.device': 'tpu' is not a device",
        ),  # fmt: skip
        (["prepare", "-q", "--root", str(tmp_path / "afile"), "-S", "tracking.enabled=false"], "a file stands"),
    ]
    for args, message in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (args, err)
    with pytest.raises(SystemExit):
        main(["train-labnet", "--round", "-1"])
    assert "must be at least 0" in capsys.readouterr().err


def test_an_index_is_written_beside_the_step_output_not_inside_it(trained, capsys):
    assert main(["index", "--model", str(trained.imgnet(0)), "--data", str(trained.data), "-k", "5"]) == 0
    out = json.loads(capsys.readouterr().out)["index"]
    assert out == str(trained.imgnet(0).parent / "round0-index-ivf.faiss")
    assert not list(trained.imgnet(0).glob("index-*"))


def test_evaluate_refuses_stored_codes_that_its_model_does_not_give(trained, tmp_path):
    """evaluate re-encodes the database with the image network (evaluate.verify_codes) and fails,
    naming the share, when the stored codes are another model's; within verify_max_mismatch it
    records the count and evaluates the stored codes."""
    import shutil

    import numpy as np

    model = tmp_path / "imgnet"
    shutil.copytree(trained.imgnet(0), model)
    data = stages.as_prepared(trained.data)
    codes = np.load(model / artifacts.CODES)
    db = data.database
    metrics = json.loads((trained.eval / artifacts.METRICS).read_text())
    assert metrics["codes_verified"] == {"device": "cpu", "items": len(db), "mismatched": 0}
    codes[db[:3]] ^= 0xFF  # three database codes that the model does not give
    np.save(model / artifacts.CODES, codes)
    cfg = from_dict(tiny_raw())
    with pytest.raises(DsehError, match=rf"3 of {len(db)} stored database codes .* differ .*verify_max_mismatch"):
        stages.evaluate(cfg, trained.data, trained.labnet(0), model, tmp_path / "eval", progress=False)
    assert not (tmp_path / "eval").exists()  # nothing half-written
    raw = tiny_raw()
    raw["evaluate"] = {**raw.get("evaluate", {}), "verify_max_mismatch": 0.5}
    got = stages.evaluate(from_dict(raw), trained.data, trained.labnet(0), model, tmp_path / "eval", progress=False)
    assert got["codes_verified"]["mismatched"] == 3
    raw["evaluate"]["verify_codes"] = False
    got = stages.evaluate(from_dict(raw), trained.data, trained.labnet(0), model, tmp_path / "eval2", progress=False)
    assert "codes_verified" not in got
