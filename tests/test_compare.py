"""`dseh compare`: tuning on a validation split, Tables 1 and 2 with collapse counted, the run
cache and the shared LabNets, parallel jobs, MLflow logging, the comparison's DVC stage."""

import csv
import json
import math

import mlflow
import numpy as np
import pytest
import yaml

from dseh import artifacts, experiments
from dseh import compare as cmp
from dseh.config import from_dict
from dseh.data import PreparedData
from dseh.errors import DsehError
from tests.helpers import REPO, tiny_raw

COMPARE = {
    "methods": ["dseh", "dpsh", "hashnet", "itq", "lsh"],
    "bits": [8],
    "seeds": [0, 1],
    "ablations": ["dseh-s", "dseh-a", "dseh-r2"],
    "ablation_bits": 8,
    "equal_time_bits": [8],
    "tune_bits": 8,
    "val_fraction": 0.25,
    "trials_dseh": ["imgnet.lr_exp=3.5"],
    "trials_dpsh": ["imgnet.lr_exp=3.5 dpsh.eta=0.1"],
    "trials_hashnet": ["imgnet.lr_exp=3.5 hashnet.alpha_bits=10"],
    "jobs": 1,
}
# short but long enough for LabNet codes to form on the 200 training items
SMALL = {
    "imgnet": {"epochs": [1]},
    "labnet": {"epochs": [8], "batch_size": 16},
    "evaluate": {"collapse_min_distinct": 2},
}


@pytest.fixture(scope="module")
def compared(tmp_path_factory, tiny_data):
    root = tmp_path_factory.mktemp("compare")
    with pytest.MonkeyPatch.context() as mp:  # MLflow exports its URI and experiment: undo that after
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
        mp.chdir(root)  # the embedded default store: ./mlflow.db
        cfg = from_dict(tiny_raw(**SMALL, tracking={"enabled": True}, compare=COMPARE))
        result = cmp.compare(cfg, tiny_data, root / "out", root / "runs")
    return root, cfg, result


def test_labnet_is_shared_only_between_runs_with_the_same_labnet_inputs(tmp_path, tiny_data):
    cache = tmp_path / "labnet-cache"
    quick = tiny_raw(imgnet={"epochs": [1]})
    first = experiments.train_rounds(from_dict(quick), tiny_data, artifacts.Layout(tmp_path / "a"), False, cache)
    imgnet_only = from_dict(quick, ["imgnet.gamma_if=0"])  # DSEH-S: ImgNet's params differ
    shared = experiments.train_rounds(imgnet_only, tiny_data, artifacts.Layout(tmp_path / "b"), False, cache)
    fresh = experiments.train_rounds(imgnet_only, tiny_data, artifacts.Layout(tmp_path / "c"), False, None)
    assert not first.get("reused") and shared["reused"] and not fresh.get("reused")
    assert shared["seconds"] == first["seconds"]  # the shared LabNet's own training time
    with np.load(tmp_path / "b/labnet/round0/targets.npz") as b, np.load(tmp_path / "c/labnet/round0/targets.npz") as c:
        assert np.array_equal(b["B"], c["B"]) and np.array_equal(b["F"], c["F"])  # sharing changes nothing
    assert np.array_equal(
        np.load(tmp_path / "b/imgnet/round0/codes.npy"), np.load(tmp_path / "c/imgnet/round0/codes.npy")
    )
    other = experiments.train_rounds(
        from_dict(quick, ["labnet.gamma_hl=0"]), tiny_data, artifacts.Layout(tmp_path / "d"), False, cache
    )
    assert not other.get("reused") and len(list(cache.iterdir())) == 2


def test_validation_split_stays_inside_the_training_set(tiny_data):
    data = PreparedData(tiny_data)
    val = cmp.validation_split(data, 0.25, seed=0)
    assert set(val.query) | set(val.train) == set(data.train)
    assert not set(val.query) & set(val.train)
    assert np.array_equal(val.train, val.database)
    assert len(val.query) == 50
    assert val.sha256 != data.sha256 and val.sha256.startswith(data.sha256)
    assert np.array_equal(cmp.validation_split(data, 0.25, seed=0).query, val.query)


def test_trials_are_equal_in_number_and_checked_before_any_run():
    with pytest.raises(DsehError, match="same number of tuning trials"):
        from_dict(tiny_raw(compare={"trials_dpsh": ["imgnet.lr_exp=3.0", "imgnet.lr_exp=3.5"]}))
    cfg = from_dict(tiny_raw(compare={"trials_dseh": ["imgnet.lr_exp=3.0", "imgnet.lr_rate=3", "imgnet.lr_exp=4.0"]}))
    with pytest.raises(DsehError, match="unknown params key 'imgnet.lr_rate'"):
        cmp._check_overrides(cfg)
    with pytest.raises(DsehError, match="'compare.ablations'"):
        cmp._check_overrides(from_dict(tiny_raw(compare={"ablations": ["dseh-x"]})))


def test_tables_count_collapsed_runs_and_never_average_them(tiny_cfg):
    base = {"group": "table1", "method": "dpsh", "label": "DPSH", "bits": 16, "topk": 100}
    results = [
        {
            **base,
            "seed": 0,
            "map_all": 0.6,
            "map_at_100": 0.7,
            "collapsed": False,
            "train_seconds": 1,
            "imgnet_epochs": 2,
        },
        {
            **base,
            "seed": 1,
            "map_all": 0.8,
            "map_at_100": 0.9,
            "collapsed": False,
            "train_seconds": 1,
            "imgnet_epochs": 2,
        },
        {
            **base,
            "seed": 2,
            "map_all": 0.36,
            "map_at_100": 0.37,
            "collapsed": True,
            "train_seconds": 1,
            "imgnet_epochs": 2,
        },
    ]
    cfg = from_dict(tiny_raw(compare={"bits": [16], "methods": ["dpsh"], "ablations": []}))
    tables = cmp.build_tables(cfg, results)
    row = next(r for r in tables["long"] if r["row"] == "DPSH" and r["metric"] == "map_all")
    assert row["mean"] == pytest.approx(0.7) and row["std"] == pytest.approx(0.1)
    assert row["collapsed"] == 1 and row["runs"] == 3
    assert "0.7000 ± 0.1000 (1/3 collapsed)" in tables["markdown"]
    all_bad = [{**r, "collapsed": True} for r in results]
    assert "collapsed (3/3)" in cmp.build_tables(cfg, all_bad)["markdown"]
    assert math.isnan(next(r for r in cmp.build_tables(cfg, all_bad)["long"] if r["metric"] == "map_all")["mean"])


def test_compare_writes_tables_1_and_2_and_logs_them(compared):
    root, cfg, result = compared
    out = root / "out"
    for name in ("tables.md", "tables.csv", "runs.csv", "summary.json", "table1.png", "config.yaml"):
        assert (out / name).is_file(), name
    md = (out / "tables.md").read_text()
    for label in ("DSEH", "DPSH", "HashNet", "ITQ", "LSH", "DPSH (equal time)", "HashNet (equal time)"):
        assert f"| {label} |" in md, label
    assert "Table 1, mAP@ALL" in md and "Table 1, mAP@100" in md
    assert "DSEH-S (gamma_if = 0)" in md
    assert "DSEH-A (1 round) = DSEH (params already say so)" in md  # tiny params train one round
    assert "DSEH, 2 rounds (same ImgNet epochs)" in md
    with open(out / "runs.csv") as f:
        runs = list(csv.DictReader(f))
    tune = [r for r in runs if r["group"] == "tune"]
    assert {r["method"] for r in tune} == {"dseh", "dpsh", "hashnet"}
    assert all(r["validation"] == "True" for r in tune)
    groups = {r["group"] for r in runs}
    assert groups == {"tune", "table1", "table2", "equal_time"}
    r2 = [r for r in runs if r["label"].startswith("DSEH, 2 rounds")]
    assert len(r2) == 2 and all(r["imgnet_epochs"] == "1" for r in r2)  # 1 epoch split as [1, 0]
    table1 = [r for r in runs if r["group"] == "table1"]
    assert len(table1) == 5 * 2 and all(0 < float(r["map_all"]) <= 1 for r in table1)
    assert set(result["best_trials"]) == {"dseh", "dpsh", "hashnet"}
    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    run = next(r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("dseh.step") == "compare")
    assert "table1.DSEH.8bits.map_all.mean" in run.data.metrics
    assert "table2.DSEH-S_gamma_if_0.8bits.map_all.mean" in run.data.metrics
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "compare")}
    assert "compare/tables.md" in arts


def test_compare_reuses_finished_runs(compared, tiny_data):
    root, cfg, result = compared
    stamps = {p: p.stat().st_mtime_ns for p in (root / "runs").rglob("result.json")}
    again = cmp.compare(
        from_dict(tiny_raw(**SMALL, tracking={"enabled": False}, compare=COMPARE)),
        tiny_data,
        root / "out2",
        root / "runs",
    )
    assert {p: p.stat().st_mtime_ns for p in (root / "runs").rglob("result.json")} == stamps
    assert again["tables"]["markdown"] == result["tables"]["markdown"]


def test_results_do_not_depend_on_parallel_jobs(compared, tiny_data, tmp_path):
    root, cfg, result = compared
    best = {m: tuple(t) for m, t in result["best_trials"].items()}
    specs = [s for s in cmp.plan_tables(cfg, best) if s.method == "dseh" and s.group == "table1"]
    cfg2 = from_dict(tiny_raw(**SMALL, compare={**COMPARE, "jobs": 2}))
    parallel = cmp._run_all(cfg2, specs, str(tiny_data), str(tmp_path))
    serial = [json.loads((root / "runs" / s.key / "result.json").read_text()) for s in specs]
    assert [r["map_all"] for r in parallel] == [r["map_all"] for r in serial]


def test_comparison_dvc_stage_follows_the_stage_contract(compared):
    root, _, _ = compared
    stage = yaml.safe_load((REPO / "comparison/dvc.yaml").read_text())["stages"]["compare"]
    assert stage["wdir"] == ".." and stage["cmd"] == "dseh compare -q"
    assert stage["params"] == cmp.PARAMS
    assert {"dseh", "outputs/data"} <= set(stage["deps"])
    outs = [o if isinstance(o, str) else next(iter(o)) for o in stage["outs"]]
    written = {p.name for p in (root / "out").iterdir()}
    assert {o.removeprefix("outputs/compare/") for o in outs} == written
