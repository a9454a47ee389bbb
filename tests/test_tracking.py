"""MLflow tracking and registry promotion against a real `mlflow server` process (artifacts on a real
SeaweedFS), the embedded default store, concurrent promotions, and unreachable servers."""

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace

import mlflow
import numpy as np
import pytest
import yaml

from dseh import artifacts, stages
from dseh.codes import unpack
from dseh.config import from_dict
from dseh.errors import DsehError
from tests.helpers import LEARNING, REPO, tiny_raw
from tests.servers import free_port


def _raw(**extra):
    raw = tiny_raw(**LEARNING)
    raw["tracking"] = {
        "enabled": True,
        "experiment": "dseh-test",
        "registered_model": "dseh-imgnet-test",
        "timeout_s": 5.0,
    }
    for k, v in extra.items():
        raw.setdefault(k, {}).update(v) if isinstance(v, dict) else raw.__setitem__(k, v)
    return raw


@pytest.fixture(scope="module")
def tracked(mlflow_server, tmp_path_factory):
    """The tiny pipeline run once against the tracking server, with a fixed pipeline key."""
    root = tmp_path_factory.mktemp("tracked")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    mp.setenv("DSEH_PIPELINE_RUN", "pipeline-test-1")
    mp.chdir(root)
    cfg = from_dict(_raw())
    lay = artifacts.Layout(root / "outputs")
    stages.prepare(cfg, lay.data, progress=False)
    stages.train_labnet(cfg, lay.data, 0, lay.labnet(0), progress=False)
    stages.train_imgnet(cfg, lay.data, 0, lay.labnet(0), lay.imgnet(0), progress=False)
    metrics = stages.evaluate(cfg, lay.data, lay.labnet(0), lay.imgnet(0), lay.eval, progress=False)
    yield cfg, lay, metrics, root
    mp.undo()


def test_one_parent_run_with_a_nested_run_per_step(tracked, mlflow_server):
    cfg, lay, metrics, _ = tracked
    client = mlflow.MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("dseh-test")
    runs = client.search_runs([exp.experiment_id], "tags.`dseh.pipeline_key` = 'pipeline-test-1'")
    by_step = {r.data.tags["dseh.step"]: r for r in runs}
    assert set(by_step) >= {"pipeline", "prepare", "train_labnet", "train_imgnet", "evaluate"}
    parent = by_step["pipeline"].info.run_id
    data_sha = json.loads((lay.data / "manifest.json").read_text())["dataset_sha256"]
    for step in ("prepare", "train_labnet", "train_imgnet", "evaluate"):
        r = by_step[step]
        assert r.data.tags["mlflow.parentRunId"] == parent
        assert r.data.tags["dseh.dataset_sha256"] == data_sha
        assert len(r.data.tags["dseh.git_commit"]) >= 7
        assert r.info.status == "FINISHED"
    lab = by_step["train_labnet"]
    assert lab.data.params["labnet.epochs"] == "[30]" and lab.data.params["bits"] == "32"
    history = client.get_metric_history(lab.info.run_id, "J2")
    assert [m.step for m in history] == list(range(1, 31))
    assert len(client.get_metric_history(by_step["train_imgnet"].info.run_id, "L_f")) == 6
    ev = by_step["evaluate"]
    assert ev.data.metrics["map_all"] == pytest.approx(metrics["map_all"])
    assert ev.data.metrics["collapsed"] == 0.0  # the flag as 0 / 1
    files = {f.path for f in client.list_artifacts(ev.info.run_id, "eval")}
    assert "eval/report.html" in files and "eval/metrics.json" in files
    figures = {f.path for f in client.list_artifacts(ev.info.run_id, "eval/figures")}
    assert {"eval/figures/retrieval.png", "eval/figures/retrieval.json"} <= figures


def test_artifacts_land_in_the_s3_bucket(tracked, mlflow_server, s3_server):
    keys = []
    for page in s3_server.client().get_paginator("list_objects_v2").paginate(Bucket=mlflow_server.bucket):
        keys += [o["Key"] for o in page.get("Contents", [])]
    report = [k for k in keys if k.endswith("eval/report.html")]
    assert report, keys[:20]
    body = s3_server.client().get_object(Bucket=mlflow_server.bucket, Key=report[0])["Body"].read()
    assert body == (tracked[1].eval / "report.html").read_bytes()
    # the model that train_imgnet logged (the network alone); the step file with the optimizer state stays out
    assert any(k.endswith("artifacts/imgnet_module.pt") for k in keys)
    assert not any(k.endswith("imgnet/model.pt") for k in keys)


def test_promotion_registry_and_pyfunc_codes(tracked, mlflow_server, monkeypatch, tmp_path):
    cfg, lay, metrics, root = tracked
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.chdir(root)
    name = "dseh-promote-a"
    cfg = from_dict(_raw(tracking={"registered_model": name}, promote={"min_delta": 0.01}))
    dry = stages.promote(cfg, lay.data, lay.imgnet(0), lay.eval, tmp_path / "p0", dry_run=True)
    assert dry["decision"] == "would promote" and not (tmp_path / "p0").exists()
    first = stages.promote(cfg, lay.data, lay.imgnet(0), lay.eval, tmp_path / "p1")
    assert first["decision"] == "promoted" and first["reason"] == "no champion yet"
    client = mlflow.MlflowClient(mlflow_server.uri)
    champ = client.get_model_version_by_alias(name, "champion")
    assert champ.version == first["version"]
    assert champ.tags["dseh.metric"] == "map_all" and float(champ.tags["dseh.metric_value"]) == pytest.approx(
        metrics["map_all"]
    )
    assert client.get_model_version_by_alias(name, "challenger").version == first["version"]
    assert client.get_model_version(name, first["version"]).run_id == _train_imgnet_run(lay)  # lineage
    # a retry of the promotion in the same pipeline run registers nothing new
    assert stages.promote(cfg, lay.data, lay.imgnet(0), lay.eval, tmp_path / "p1") == first
    assert len(client.search_model_versions(f"name = '{name}'")) == 1
    # the same model in another pipeline run: not better by min_delta, so the champion stays
    monkeypatch.setenv("DSEH_PIPELINE_RUN", "pipeline-test-2")
    second = stages.promote(cfg, lay.data, lay.imgnet(0), lay.eval, tmp_path / "p2")
    assert second["decision"] == "kept the champion" and "does not beat" in second["reason"]
    v2 = client.get_model_version(name, second["version"])
    assert v2.tags["dseh.decision"] == "kept the champion" and "dseh.promoted" not in v2.tags
    assert client.get_model_version_by_alias(name, "champion").version == first["version"]
    assert client.get_model_version_by_alias(name, "challenger").version == second["version"]
    assert json.loads((tmp_path / "p2/decision.json").read_text())["decision"] == "kept the champion"
    # the registered model returns the codes the training step saved
    data = stages.PreparedData(lay.data)
    items = np.sort(data.query[:16])
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    codes = model.predict(np.asarray(data.images[items]))
    saved = unpack(np.load(lay.imgnet(0) / "codes.npy")[items], 32)
    assert codes.dtype == np.int8 and np.array_equal(codes, saved)
    sig = model.metadata.signature
    assert sig.inputs.to_dict()[0]["tensor-spec"]["dtype"] == "uint8"
    # dseh search from the registry URI ranks like the step output it came from
    from PIL import Image

    from dseh.search import search

    Image.fromarray(np.asarray(data.images[int(data.query[0])])).save(tmp_path / "q.png")
    by_uri = search(
        f"models:/{name}@champion",
        str(lay.data),
        [str(tmp_path / "q.png")],
        5,
        codes_path=str(lay.imgnet(0) / "codes.npy"),
    )
    by_dir = search(str(lay.imgnet(0)), str(lay.data), [str(tmp_path / "q.png")], 5)
    assert by_uri == by_dir and len(by_uri[0]["results"]) == 5
    with pytest.raises(DsehError, match="--codes"):
        search(f"models:/{name}@champion", str(lay.data), [str(tmp_path / "q.png")], 5)


def _train_imgnet_run(lay) -> str:
    return json.loads((lay.imgnet(0) / "summary.json").read_text())["model_run_id"]


def _fake_eval(src, dst, value):
    shutil.copytree(src, dst)
    m = json.loads((dst / "metrics.json").read_text())
    m["map_all"] = value
    (dst / "metrics.json").write_text(json.dumps(m))


def test_collapsed_codes_never_become_champion(tracked, mlflow_server, monkeypatch, tmp_path):
    cfg, lay, _, root = tracked
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.chdir(root)
    # the trained model's saved codes replaced by one code for every item: evaluate calls it collapsed
    shutil.copytree(lay.imgnet(0), tmp_path / "imgnet")
    codes = np.load(tmp_path / "imgnet/codes.npy")
    np.save(tmp_path / "imgnet/codes.npy", np.zeros_like(codes))
    unchecked = replace(cfg, evaluate=replace(cfg.evaluate, verify_codes=False))  # they are not the model's
    metrics = stages.evaluate(
        unchecked, lay.data, lay.labnet(0), tmp_path / "imgnet", tmp_path / "eval", progress=False
    )
    assert metrics["collapsed"] and metrics["distinct_codes_database"] == 1 and metrics["constant_bits_database"] == 32
    name = "dseh-promote-collapsed"
    cfg = from_dict(_raw(tracking={"registered_model": name}))
    dry = stages.promote(cfg, lay.data, tmp_path / "imgnet", tmp_path / "eval", None, dry_run=True)
    assert dry["decision"] == "would not promote" and "collapsed (1 distinct database codes" in dry["reason"]
    first = stages.promote(cfg, lay.data, tmp_path / "imgnet", tmp_path / "eval", tmp_path / "p1")
    assert first["decision"] == "not promoted" and first["champion_version"] is None
    client = mlflow.MlflowClient(mlflow_server.uri)
    assert client.get_model_version(name, first["version"]).tags["dseh.decision"] == "not promoted"
    assert client.get_model_version_by_alias(name, "challenger").version == first["version"]
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_model_version_by_alias(name, "champion")
    # the model's own codes do not collapse, and become the champion
    second = stages.promote(cfg, lay.data, lay.imgnet(0), lay.eval, tmp_path / "p2")
    assert second["decision"] == "promoted" and second["reason"] == "no champion yet"


@pytest.mark.parametrize("order", ["better_first", "worse_first"])
def test_concurrent_promotions_keep_the_better_champion(tracked, mlflow_server, tmp_path, order):
    _, lay, _, root = tracked
    name = f"dseh-race-{order}"
    raw = _raw(tracking={"registered_model": name})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    _fake_eval(lay.eval, tmp_path / "better", 0.9)
    _fake_eval(lay.eval, tmp_path / "worse", 0.6)
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.uri, "PYTHONPATH": str(REPO)}
    procs = []
    for which in ["better", "worse"] if order == "better_first" else ["worse", "better"]:
        cmd = [
            sys.executable,
            "-m",
            "dseh",
            "promote",
            "-q",
            "--params",
            str(tmp_path / "params.yaml"),
            "--data",
            str(lay.data),
            "--imgnet",
            str(lay.imgnet(0)),
            "--eval",
            str(tmp_path / which),
            "--out",
            str(tmp_path / f"decision-{which}"),
        ]
        procs.append(
            subprocess.Popen(cmd, env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    client = mlflow.MlflowClient(mlflow_server.uri)
    champ = client.get_model_version_by_alias(name, "champion")
    assert float(champ.tags["dseh.metric_value"]) == 0.9
    assert len(client.search_model_versions(f"name = '{name}'")) == 2


def test_unreachable_tracking_server_fails_fast_or_warns(tmp_path, tiny_data, monkeypatch, caplog):
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    cfg = from_dict(tiny_raw(tracking={"enabled": True, "timeout_s": 2.0}))
    t0 = time.time()
    with pytest.raises(DsehError, match=f"tracking server {uri} is unreachable"):
        stages.train_labnet(cfg, tiny_data, 0, tmp_path / "lab", progress=False)
    assert time.time() - t0 < 15 and not (tmp_path / "lab").exists()
    lenient = from_dict(tiny_raw(tracking={"enabled": True, "timeout_s": 2.0, "required": False}))
    stages.train_labnet(lenient, tiny_data, 0, tmp_path / "lab", progress=False)
    assert (tmp_path / "lab/model.pt").is_file()
    assert "continuing without tracking" in caplog.text


def test_embedded_default_store_when_no_uri(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = from_dict(tiny_raw(tracking={"enabled": True}))
    stages.prepare(cfg, tmp_path / "data", progress=False)
    assert (tmp_path / "mlflow.db").is_file()
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("dseh")
    runs = client.search_runs([exp.experiment_id])
    assert {r.data.tags["dseh.step"] for r in runs} == {"pipeline", "prepare"}
