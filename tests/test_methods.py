"""The hashing methods of the registry (dseh.methods.METHODS): every entry trains and evaluates
through the pipeline steps on the tiny dataset, its codes cover every item, a deep method's model
file loads, LabNet is trained exactly for the methods that need one, and config validation names
the registry's choices. Also HashNet's continuation step count and the DVC graph of the methods
without a LabNet."""

import json
import os

import numpy as np
import pytest
import torch
import yaml

from dseh import artifacts, experiments, methods, stages
from dseh.artifacts import load_step_model
from dseh.cli import main
from dseh.codes import packed_width
from dseh.config import from_dict
from dseh.data import PreparedData
from dseh.errors import DsehError
from dseh.methods import DEEP_METHODS, LINEAR_METHODS, METHODS
from dseh.models.factory import build_imgnet
from dseh.train import phases
from tests.helpers import tiny_raw


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data):
    """trained(method) -> (root, args): `train-labnet`, `train-imgnet` and `evaluate` of the CLI
    (stages.train_labnet, stages.train_imgnet, stages.evaluate) run once per method on tiny_data,
    the outputs in the default layout under root."""
    runs: dict[str, tuple] = {}

    def run(method: str):
        if method not in runs:
            root = tmp_path_factory.mktemp(method)
            params = root / "params.yaml"
            params.write_text(yaml.safe_dump(tiny_raw(method=method)))
            args = ["--params", str(params), "--root", str(root), "--data", str(tiny_data), "-q"]
            for cmd in (["train-labnet"], ["train-imgnet"], ["evaluate"]):
                assert main(cmd + args) == 0, cmd
            runs[method] = root, args
        return runs[method]

    return run


def test_registry_splits_into_deep_and_linear_methods():
    assert set(DEEP_METHODS) | set(LINEAR_METHODS) == set(METHODS)
    assert not set(DEEP_METHODS) & set(LINEAR_METHODS)
    for name, m in METHODS.items():
        assert m.name == name and (m.objective is None) != (m.fit is None), name
        assert not (m.needs_labnet and not m.deep), f"{name}: a linear hash is fitted without a LabNet"


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_codes_every_item_and_is_evaluated(trained, tiny_data, method):
    root, _ = trained(method)
    bits = tiny_raw()["bits"]
    codes = np.load(root / "imgnet/round0" / artifacts.CODES)
    assert codes.dtype == np.uint8 and codes.shape == (len(PreparedData(tiny_data).labels), packed_width(bits))
    m = json.loads((root / "eval" / artifacts.METRICS).read_text())
    assert m["bits"] == bits and 0 < m["map_all"] <= 1


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_saves_a_model_of_its_kind(trained, method):
    root, _ = trained(method)
    kind = "imgnet" if METHODS[method].deep else "linear-hash"
    model = load_step_model(root / "imgnet/round0", kind)
    assert model.method == method and model.round == 0 and model.bits == tiny_raw()["bits"]
    if kind == "linear-hash":
        with pytest.raises(DsehError, match="expected imgnet"):
            load_step_model(root / "imgnet/round0", "imgnet")


@pytest.mark.parametrize("method", list(METHODS))
def test_labnet_is_trained_exactly_for_the_methods_that_need_it(trained, method):
    root, _ = trained(method)
    needs = METHODS[method].needs_labnet
    assert (root / "labnet/round0" / artifacts.MODEL).is_file() == needs
    assert (root / "labnet/round0" / artifacts.TARGETS).is_file() == needs
    summary = json.loads((root / "labnet/round0" / artifacts.SUMMARY).read_text())
    assert ("epochs" in summary) == needs and ("labnet" in summary) != needs
    assert ("labnet" in json.loads((root / "eval" / artifacts.METRICS).read_text())) == needs


# the optimiser state each optimiser keeps per parameter
_STATE_KEY = {"adam": "exp_avg", "sgd": "momentum_buffer", "rmsprop": "square_avg"}


@pytest.mark.parametrize("method", DEEP_METHODS)
def test_every_deep_method_trains_with_its_own_recipe(trained, method):
    root, _ = trained(method)
    state = load_step_model(root / "imgnet/round0", "imgnet")
    recipe, _ = METHODS[method].recipe(state.config)
    groups = state.optimizer["param_groups"]
    assert all(g["weight_decay"] == recipe.weight_decay for g in groups)
    assert groups[0]["lr"] == pytest.approx(recipe.lr(state.config.imgnet.epochs[0] - 1, 0))
    if recipe.optimizer != "adam":
        assert all(g["momentum"] == recipe.momentum for g in groups)
    kept = next(iter(state.optimizer["state"].values()), {})
    if recipe.optimizer == "sgd" and recipe.momentum == 0:  # plain SGD keeps no state
        assert not kept
    else:
        assert _STATE_KEY[recipe.optimizer] in kept, (method, sorted(kept))


def test_baselines_default_to_their_reference_recipes_whatever_dseh_uses():
    cfg = from_dict(tiny_raw(), ["imgnet.lr_exp=5", "train.optimizer=rmsprop", "train.momentum=0.5"])
    dseh, dseh_init = methods.dseh_recipe(cfg)
    assert (dseh.optimizer, dseh.lr_exp, dseh.momentum, dseh_init) == ("rmsprop", 5.0, 0.5, "release")
    dpsh, dpsh_init = METHODS["dpsh"].recipe(cfg)
    assert (dpsh.optimizer, dpsh.lr_exp, dpsh.weight_decay, dpsh.momentum) == ("sgd", 1.3, 1e-5, 0.0)
    hashnet, _ = METHODS["hashnet"].recipe(cfg)
    assert (hashnet.optimizer, hashnet.weight_decay, hashnet.momentum) == ("sgd", 5e-4, 0.9)
    assert dpsh_init == "default"
    over, _ = METHODS["dpsh"].recipe(from_dict(tiny_raw(), ["dpsh.optimizer=adam", "dpsh.lr_exp=3.5"]))
    assert (over.optimizer, over.lr_exp) == ("adam", 3.5)


def test_new_layers_start_from_the_methods_init(tiny_cfg):
    release, default = build_imgnet(tiny_cfg, 12, "release"), build_imgnet(tiny_cfg, 12, "default")
    # the release's N(0, 0.01^2) truncated at 2 sigma; torch's default is uniform in +-1/sqrt(fan_in) (0.044 here)
    assert float(release.fc9.weight.abs().max()) <= 0.02
    assert float(default.fc9.weight.abs().max()) > 0.03


@pytest.mark.parametrize("key", ["dpsh.optimizer=lbfgs", "hashnet.init=xavier", "dpsh.momentum=1.5"])
def test_config_refuses_a_bad_recipe_naming_the_key(key):
    with pytest.raises(DsehError, match=key.split("=")[0].replace(".", r"\.")):
        from_dict(tiny_raw(), [key])


def test_config_refuses_an_unknown_method_naming_the_registry():
    with pytest.raises(DsehError) as e:
        from_dict(tiny_raw(method="dseh2"))
    msg = str(e.value)
    assert "'method'" in msg and "'dseh2'" in msg
    assert all(name in msg for name in METHODS), msg
    for name in METHODS:
        assert from_dict(tiny_raw(method=name)).method == name


@pytest.mark.parametrize("method", ["dpsh", "hashnet", "itq"])
def test_method_param_runs_the_pipeline_steps(trained, method, capsys):
    tmp_path, args = trained(method)
    assert not (tmp_path / "labnet/round0/model.pt").exists()
    assert json.loads((tmp_path / "labnet/round0/summary.json").read_text())["method"] == method
    m = json.loads((tmp_path / "eval/metrics.json").read_text())
    assert 0 < m["map_all"] <= 1 and "labnet" not in m
    assert (tmp_path / "eval/report.html").is_file()
    assert (tmp_path / "eval/figures/heatmaps.png").exists() == (method != "itq")
    assert load_step_model(tmp_path / "imgnet/round0", ("imgnet", "linear-hash")).method == method
    if method == "itq":
        capsys.readouterr()
        assert main(["evaluate", *args, "--encode"]) == 2
        assert main(["promote", *args]) == 2
        err = capsys.readouterr().err
        assert err.count("holds itq codes, not an image network") == 2
    else:
        hist = (tmp_path / "imgnet/round0/history.csv").read_text().splitlines()[0]
        assert ("beta" in hist) == (method == "hashnet")


def test_hashnet_continuation_counts_steps_across_epochs_and_rounds(tiny_cfg):
    model = build_imgnet(tiny_cfg, 12)
    images = np.zeros((10, 12, 12, 3), np.uint8)
    seen = []

    def objective(t, f, u, step):
        seen.append(step)
        return {"loss": u.sum()}

    phase = phases.imgnet_phase(
        model, None, [1.0], images, np.arange(10), objective, tiny_cfg.imgnet, tiny_cfg.train, 1, 1, 0,
        torch.device("cpu"), methods.dseh_recipe(tiny_cfg)[0], step_offset=7,
    )  # fmt: skip
    idx = np.arange(3)
    phase.step(phase.model, idx, phase.fetch(idx, 2, 0))
    per_epoch = -(-10 // tiny_cfg.imgnet.batch_size)
    assert seen == [7 + 2 * per_epoch]


@pytest.mark.parametrize("method", ["dpsh", "itq"])
def test_every_dvc_dependency_exists_for_the_other_methods(tmp_path, tiny_data, method):
    from dseh.dvcfile import render

    cfg = from_dict(tiny_raw(method=method, train={"rounds": 2}, imgnet={"epochs": [1]}))
    lay = artifacts.Layout(tmp_path)
    lay.data.symlink_to(tiny_data)
    experiments.train_rounds(cfg, lay.data, lay, progress=False)
    stages.evaluate(cfg, lay.data, lay.labnet(1), lay.imgnet(1), lay.eval, progress=False)
    graph = yaml.safe_load(render(cfg, lay))["stages"]
    for name in ("train_labnet_r1", "train_imgnet_r0", "train_imgnet_r1", "evaluate", "promote"):
        missing = [d for d in graph[name]["deps"] if d != "dseh" and not os.path.exists(d)]
        assert not missing, (name, missing)
