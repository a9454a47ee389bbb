"""Each step declares exactly the params keys it reads (dseh.stages.STAGE_PARAMS, which dvc.yaml and
the steps' fingerprints use): every step runs on a recording config, the training steps once per
method of the registry, and the keys read are compared with the declaration."""

import pytest

from dseh import stages
from dseh.artifacts import Layout
from dseh.config import NEUTRAL_KEYS, from_dict
from dseh.data import SOURCES
from dseh.methods import METHODS
from dseh.reads import recording
from tests.helpers import make_list_collection, tiny_raw, write_h5_pair
from tests.test_fashion import make_fashion_dir


def _sources(root) -> dict[str, dict]:
    """A `data` params section for each data source, over small files made here."""
    make_list_collection(root / "lists")
    next((root / "lists" / "images").rglob("*.png")).unlink()  # skipped: data.skip_bad_images is read
    (root / "h5").mkdir()
    write_h5_pair(root / "h5")
    h5 = {"img_h5": str(root / "h5" / "Img.h5"), "lab_h5": str(root / "h5" / "Lab.h5")}
    fashion = {"fashion_dir": str(make_fashion_dir(root / "fashion")), "image_size": 28}
    sources = {
        "list-files": {
            "source": "list-files",
            "image_root": str(root / "lists" / "images"),
            "list_dir": str(root / "lists"),
            "skip_bad_images": True,
        },
        "hdf5": {"source": "hdf5", "image_root": str(root / "h5" / "images"), **h5, "image_size": 8},
        "fashion-mnist": {"source": "fashion-mnist", **fashion},
        "fashion-mosaic": {"source": "fashion-mosaic", **fashion},
    }
    assert set(sources) | {"digits-mosaic"} == set(SOURCES)
    return sources


@pytest.fixture(scope="module")
def reads(tmp_path_factory):
    """{step: keys read} over one run of every step (training steps for every method)."""
    root = tmp_path_factory.mktemp("reads")
    lay = Layout(root)
    seen: dict[str, set[str]] = {s: set() for s in stages.STAGE_PARAMS}

    def recorded(step: str, raw: dict):
        cfg, keys = recording(from_dict(raw))
        return cfg, lambda: seen[step].update(keys)

    for name, data in _sources(root).items():  # every data source of the registry
        cfg, done = recorded("prepare", tiny_raw(data=data))
        stages.prepare(cfg, root / "prepared" / name, progress=False)
        done()
    cfg, done = recorded("prepare", tiny_raw())
    stages.prepare(cfg, lay.data, progress=False)
    done()
    runs = [tiny_raw(method=m) for m in METHODS] + [tiny_raw(method="dseh", train={"optimizer": "sgd"})]
    for raw in runs:
        out = Layout(root / f"{raw['method']}-{raw['train'].get('optimizer', 'adam')}")
        cfg, done = recorded("train_labnet", raw)
        stages.train_labnet(cfg, lay.data, 0, out.labnet(0), progress=False)
        done()
        cfg, done = recorded("train_imgnet", raw)
        stages.train_imgnet(cfg, lay.data, 0, out.labnet(0), out.imgnet(0), progress=False)
        done()
        for encode in (False, True) if METHODS[raw["method"]].deep else (False,):
            cfg, done = recorded("evaluate", raw)
            stages.evaluate(cfg, lay.data, out.labnet(0), out.imgnet(0), out.eval, False, encode)
            done()
    return seen, lay, root


def test_each_step_declares_exactly_what_it_reads(reads):
    seen, _, _ = reads
    for step in ("prepare", "train_labnet", "train_imgnet", "evaluate"):
        declared, read = set(stages.STAGE_PARAMS[step]), seen[step] - set(NEUTRAL_KEYS)
        assert read - declared == set(), f"{step} reads keys it does not declare"
        assert declared - read == set(), f"{step} declares keys it never reads"


def test_promote_declares_what_it_reads(reads, tmp_path, monkeypatch):
    _, lay, root = reads
    out = Layout(root / "hashnet-adam")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    raw = tiny_raw(method="hashnet", tracking={"enabled": True, "registered_model": "reads"})
    for dry_run in (True, False):
        cfg, keys = recording(from_dict(raw))
        stages.promote(cfg, lay.data, out.imgnet(0), out.eval, None if dry_run else tmp_path / "p", dry_run)
        read = keys - set(NEUTRAL_KEYS)
        assert read <= set(stages.STAGE_PARAMS["promote"]), "promote reads keys it does not declare"
    assert set(stages.STAGE_PARAMS["promote"]) <= keys


def test_neutral_keys_are_declared_by_no_training_step():
    for step in ("prepare", "train_labnet", "train_imgnet", "evaluate"):
        assert not set(stages.STAGE_PARAMS[step]) & set(NEUTRAL_KEYS)


def test_dvc_yaml_declares_the_stage_params():
    import yaml

    from dseh.config import load_config
    from dseh.dvcfile import render
    from tests.helpers import REPO

    dvc = yaml.safe_load(render(load_config(REPO / "params.yaml")))["stages"]
    assert dvc["evaluate"]["params"] == list(stages.STAGE_PARAMS["evaluate"])
    assert dvc["train_imgnet_r0"]["params"] == list(stages.STAGE_PARAMS["train_imgnet"])
    assert "evaluate.collapse_min_distinct" in dvc["evaluate"]["params"]
    assert "train.loader_workers" not in dvc["train_imgnet_r0"]["params"]
    assert (REPO / "dvc.yaml").read_text() == render(load_config(REPO / "params.yaml"))
