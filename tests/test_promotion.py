"""Registry promotion's decision rule: strictly better by promote.min_delta, and a champion measured
on another dataset re-evaluated on the candidate's dataset instead of blocking every candidate."""

import json

import mlflow
import numpy as np
import pytest
import torch

from dseh import evaluation, promotion, stages
from dseh.artifacts import Layout
from dseh.codes import pack
from dseh.config import from_dict
from dseh.errors import DsehError
from tests.helpers import LEARNING, tiny_raw


class _Version:
    def __init__(self, value, **tags):
        self.tags = {"dseh.metric": "map_all", "dseh.protocol": "p", "dseh.dataset_sha256": "d", **tags}
        self.tags["dseh.metric_value"] = repr(value)


def test_only_a_strictly_better_candidate_takes_over():
    tags = _Version(0.5).tags
    assert promotion.decide(0.5, tags, _Version(0.5), 0.001)[0] is False  # equal: the champion stays
    assert promotion.decide(0.5005, tags, _Version(0.5), 0.001)[0] is False  # better, not by min_delta
    assert promotion.decide(0.502, tags, _Version(0.5), 0.001)[0] is True
    ok, reason = promotion.decide(0.9, {**tags, "dseh.dataset_sha256": "other"}, _Version(0.5), 0.001)
    assert not ok and "not comparable" in reason
    ok, reason = promotion.decide(0.6, {**tags, "dseh.dataset_sha256": "other"}, _Version(0.9), 0.001, None, 0.55)
    assert ok and "re-evaluated" in reason
    assert promotion.decide(0.9, tags, None, 0.001, collapsed="1 distinct code")[0] is False


def test_min_delta_must_be_positive():
    with pytest.raises(DsehError, match="promote.min_delta' must be positive"):
        from_dict(tiny_raw(promote={"min_delta": 0.0}))


def _trained(root, seed: int, raw: dict | None = None) -> Layout:
    lay = Layout(root)
    cfg = from_dict({**(raw or tiny_raw(**LEARNING)), "seed": seed})
    stages.prepare(cfg, lay.data, progress=False)
    stages.train_labnet(cfg, lay.data, 0, lay.labnet(0), progress=False)
    stages.train_imgnet(cfg, lay.data, 0, lay.labnet(0), lay.imgnet(0), progress=False)
    stages.evaluate(cfg, lay.data, lay.labnet(0), lay.imgnet(0), lay.eval, progress=False)
    return lay


def test_a_champion_from_another_dataset_is_re_evaluated_on_the_new_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    name = "dseh-reeval"
    raw = {**tiny_raw(**LEARNING), "tracking": {"enabled": True, "registered_model": name}}
    a, b = _trained(tmp_path / "a", 0), _trained(tmp_path / "b", 1)
    first = stages.promote(from_dict(raw), a.data, a.imgnet(0), a.eval, tmp_path / "pa")
    assert first["decision"] == "promoted", first
    dry = stages.promote(from_dict(raw), b.data, b.imgnet(0), b.eval, None, dry_run=True)
    second = stages.promote(from_dict(raw), b.data, b.imgnet(0), b.eval, tmp_path / "pb")
    assert "re-evaluated" in second["reason"] and "not comparable" not in second["reason"]
    assert dry["decision"] == ("would promote" if second["decision"] == "promoted" else "would keep the champion")
    # the champion's figure is its own model's codes on dataset b under the same protocol
    data = stages.PreparedData(b.data)
    model = mlflow.pyfunc.load_model(f"models:/{name}/{first['version']}")
    codes = pack(model.predict(np.asarray(data.images)))
    expected, _ = evaluation.split_metrics(from_dict(raw).evaluate, data, codes, 32)
    assert second["previous_champion_metric"] == pytest.approx(expected["map_all"])
    # the same candidate once more, in another pipeline run, is not strictly better than itself
    monkeypatch.setenv("DSEH_PIPELINE_RUN", "another-run")
    third = stages.promote(from_dict(raw), b.data, b.imgnet(0), b.eval, tmp_path / "pc")
    assert third["decision"] == "kept the champion" and "does not beat" in third["reason"]


def test_a_retried_promotion_registers_once_from_the_training_run(tmp_path, monkeypatch):
    """train_imgnet logs the model in its own run (no optimizer state among the run's artifacts);
    promote registers that model (the version's run is the training run), and a retried promote
    of the same pipeline run returns the recorded decision instead of registering again."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DSEH_PIPELINE_RUN", "kfp-run-1")
    name = "dseh-retried"
    raw = {**tiny_raw(**LEARNING), "tracking": {"enabled": True, "registered_model": name}}
    lay = _trained(tmp_path / "a", 0, raw)
    summary = json.loads((lay.imgnet(0) / "summary.json").read_text())
    train_run = summary["model_run_id"]
    assert summary["model_uri"] == f"runs:/{train_run}/imgnet"
    client = mlflow.MlflowClient()
    assert client.get_run(train_run).data.tags["dseh.step"] == "train_imgnet"
    step_files = {f.path for f in client.list_artifacts(train_run, "imgnet")}
    assert "imgnet/codes.npy" in step_files and "imgnet/model.pt" not in step_files
    logged = client.search_logged_models([client.get_run(train_run).info.experiment_id])
    held = [f.path for m in logged for f in client.list_logged_model_artifacts(m.model_id, "artifacts")]
    assert held == ["artifacts/imgnet_module.pt", "artifacts/meta.json"]
    module = torch.load(mlflow.artifacts.download_artifacts(f"{summary['model_uri']}/artifacts/imgnet_module.pt"),
                        weights_only=False)  # fmt: skip
    assert isinstance(module, torch.nn.Module)  # the network alone: no optimizer state anywhere in the run

    first = stages.promote(from_dict(raw), lay.data, lay.imgnet(0), lay.eval, tmp_path / "p1")
    again = stages.promote(from_dict(raw), lay.data, lay.imgnet(0), lay.eval, tmp_path / "p2")
    assert again == first and len(client.search_model_versions(f"name = '{name}'")) == 1
    version = client.get_model_version(name, first["version"])
    assert version.run_id == train_run  # lineage: the registered version's source run is the training run
    assert version.tags["dseh.promotion_key"].startswith("kfp-run-1/")
    monkeypatch.setenv("DSEH_PIPELINE_RUN", "kfp-run-2")  # another pipeline run: a version of its own
    other = stages.promote(from_dict(raw), lay.data, lay.imgnet(0), lay.eval, tmp_path / "p3")
    assert other["version"] != first["version"] and len(client.search_model_versions(f"name = '{name}'")) == 2
    # a model URI this registry cannot reach: the model is logged in the promote run instead
    (lay.imgnet(0) / "summary.json").write_text(json.dumps({**summary, "model_uri": "runs:/0123456789abcdef/imgnet"}))
    monkeypatch.setenv("DSEH_PIPELINE_RUN", "kfp-run-3")
    fallback = stages.promote(from_dict(raw), lay.data, lay.imgnet(0), lay.eval, tmp_path / "p4")
    run = client.get_run(client.get_model_version(name, fallback["version"]).run_id)
    assert run.data.tags["dseh.step"] == "promote"
