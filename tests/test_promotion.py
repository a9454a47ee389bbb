"""Registry promotion's decision rule: strictly better by promote.min_delta, and a champion measured
on another dataset re-evaluated on the candidate's dataset instead of blocking every candidate."""

import mlflow
import numpy as np
import pytest

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


def _trained(root, seed: int) -> Layout:
    lay = Layout(root)
    cfg = from_dict(tiny_raw(**LEARNING, seed=seed))
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
    # the same candidate once more is not strictly better than itself (or than the champion)
    third = stages.promote(from_dict(raw), b.data, b.imgnet(0), b.eval, tmp_path / "pc")
    assert third["decision"] == "kept the champion" and "does not beat" in third["reason"]
