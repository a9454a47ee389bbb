"""Search by labels and the registered retrieval model: `dseh search --labels`, the pyfunc that
`dseh promote` registers as tracking.retrieval_model, and `mlflow models serve` answering it over
HTTP with the ids `dseh search` finds; bad requests get a 400 with a message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dseh import stages
from dseh.artifacts import Layout
from dseh.codes import unpack
from dseh.config import from_dict
from dseh.data import PreparedData
from dseh.errors import DsehError
from dseh.retrieval import label_codes, label_vector
from dseh.search import request_body, search
from tests.helpers import LEARNING, tiny_raw
from tests.servers import free_port, stop_pid, wait_http

NAME, RETRIEVAL = "dseh-serve-test", "dseh-serve-test-retrieval"


@pytest.fixture(scope="module")
def promoted(tiny_data, tmp_path_factory):
    """A tiny model trained on tiny_data, evaluated and promoted into an embedded MLflow store."""
    root = tmp_path_factory.mktemp("serve")
    raw = tiny_raw(**LEARNING, tracking={"enabled": True, "registered_model": NAME, "retrieval_model": RETRIEVAL})
    cfg = from_dict(raw)
    lay = Layout(root / "outputs")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setenv("DSEH_PIPELINE_RUN", "serve-test")
        stages.train_labnet(cfg, tiny_data, 0, lay.labnet(0), progress=False)
        stages.train_imgnet(cfg, tiny_data, 0, lay.labnet(0), lay.imgnet(0), progress=False)
        metrics = stages.evaluate(cfg, tiny_data, lay.labnet(0), lay.imgnet(0), lay.eval, progress=False)
        decision = stages.promote(cfg, tiny_data, lay.imgnet(0), lay.eval, lay.promote, labnet_dir=lay.labnet(0))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    return {"root": root, "lay": lay, "data": tiny_data, "metrics": metrics, "decision": decision, "uri": uri}


def _query_png(data: PreparedData, item: int, folder: Path) -> tuple[Path, np.ndarray]:
    img = np.asarray(data.images[item])
    path = folder / f"query-{item}.png"
    Image.fromarray(img).save(path)
    return path, img


def _search_ids(promoted, images=(), labels=None, k=5) -> list[list[tuple[int, int]]]:
    res = search(str(promoted["lay"].imgnet(0)), str(promoted["data"]), [str(p) for p in images], k, labels=labels)
    return [[(r["index"], r["distance"]) for r in q["results"]] for q in res]


def test_search_by_labels_ranks_image_codes_by_labnet_code(promoted):
    data = PreparedData(promoted["data"])
    lay = promoted["lay"]
    res = search(str(lay.imgnet(0)), str(promoted["data"]), [], 7, labels=["0,3", "5"])
    assert [q["labels"] for q in res] == [["0", "3"], ["5"]]
    # brute force: LabNet's code of the label vector against the database's stored ImgNet codes
    from dseh.models.factory import load_labnet

    labnet, _ = load_labnet(lay.labnet(0))
    q = label_codes(labnet, np.stack([label_vector("0,3", data.classes), label_vector(["5"], data.classes)]))
    codes = np.load(lay.imgnet(0) / "codes.npy")[data.database]
    bits = LEARNING["bits"]
    dist = (unpack(q, bits)[:, None, :] != unpack(codes, bits)[None, :, :]).sum(-1)
    for row, qres in zip(dist, res):
        order = np.argsort(row, kind="stable")[:7]
        assert [r["index"] for r in qres["results"]] == [int(data.database[j]) for j in order]
        assert [r["distance"] for r in qres["results"]] == [int(row[j]) for j in order]
        for r in qres["results"]:  # each hit says which labels it carries
            assert r["labels"] == [data.classes[c] for c in np.flatnonzero(data.labels[r["index"]])]
    with pytest.raises(DsehError, match=r"unknown label 'cat': the classes are 0, 1"):
        search(str(lay.imgnet(0)), str(promoted["data"]), [], 3, labels=["cat"])
    with pytest.raises(DsehError, match="at least one class"):
        search(str(lay.imgnet(0)), str(promoted["data"]), [], 3, labels=[" , "])


def test_evaluate_measures_label_queries(promoted):
    lab = promoted["metrics"]["labnet"]
    for key in ("label_query_map_all", "label_query_map_at_100", "label_query_map_tie_aware"):
        assert 0.0 < lab[key] <= 1.0
    # the figure is `dseh search --labels` on every query's label set, scored as usual
    data = PreparedData(promoted["data"])
    from dseh import evaluation
    from dseh.models.factory import load_labnet

    labnet, _ = load_labnet(promoted["lay"].labnet(0))
    codes = np.load(promoted["lay"].imgnet(0) / "codes.npy")
    q = label_codes(labnet, data.labels[data.query].astype(np.float32))
    rep = evaluation.retrieval_report(q, codes[data.database], data.labels[data.query], data.labels[data.database],
                                      LEARNING["bits"], 100)  # fmt: skip
    assert lab["label_query_map_all"] == pytest.approx(rep.map_all)


def test_promote_registers_the_retrieval_model_with_the_encoders_aliases(promoted, tmp_path):
    d = promoted["decision"]
    assert d["decision"] == "promoted" and d["retrieval_model"] == RETRIEVAL
    assert d["retrieval_uri"] == f"models:/{RETRIEVAL}@champion"
    client = mlflow.MlflowClient(promoted["uri"])
    for alias in ("champion", "challenger"):
        v = client.get_model_version_by_alias(RETRIEVAL, alias)
        assert v.tags["dseh.encoder_version"] == str(client.get_model_version_by_alias(NAME, alias).version)
    mlflow.set_tracking_uri(promoted["uri"])
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{RETRIEVAL}@champion", dst_path=str(tmp_path)))
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert not [f for f in files if f.endswith((".pkl", ".pickle"))]  # logged as code: nothing pickled
    assert {"artifacts/imgnet/model.pt", "artifacts/labnet/model.pt", "artifacts/database/codes.npy"} <= files
    mlmodel = (local / "MLmodel").read_text()
    assert "python_model.pkl" not in mlmodel and "retrieval_model.py" in mlmodel

    data = PreparedData(promoted["data"])
    model = mlflow.pyfunc.load_model(f"models:/{RETRIEVAL}@champion")
    items = [int(i) for i in np.sort(data.query)[:2]]
    pngs = [_query_png(data, i, tmp_path) for i in items]
    names = [data.classes[c] for c in np.flatnonzero(data.labels[items[0]])]
    frame = pd.DataFrame({"image": [pngs[0][1].ravel(), pngs[1][1].ravel(), None], "labels": [None, None, names]})
    out = model.predict(frame, params={"k": 5})
    got = [list(zip(g["id"], g["distance"])) for _, g in out.groupby("query")]
    assert got == _search_ids(promoted, [p for p, _ in pngs], [",".join(names)], k=5)
    assert out["labels"].iloc[0] == [data.classes[c] for c in np.flatnonzero(data.labels[out["id"].iloc[0]])]


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_mlflow_models_serve_answers_images_and_label_sets(promoted, tmp_path):
    """`mlflow models serve -m models:/NAME@champion --env-manager local` on a free loopback port:
    an image and a label set get the ids and distances of `dseh search`; bad requests a 400."""
    data = PreparedData(promoted["data"])
    item = int(np.sort(data.query)[0])
    png, img = _query_png(data, item, tmp_path)
    names = [data.classes[c] for c in np.flatnonzero(data.labels[item])]
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": promoted["uri"]}
    log = open(tmp_path / "serve.log", "w")
    mlflow_exe = str(Path(sys.executable).parent / "mlflow")
    cmd = [mlflow_exe, "models", "serve", "-m", f"models:/{RETRIEVAL}@champion", "--env-manager", "local",
           "--host", "127.0.0.1", "-p", str(port), "-w", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/ping", proc, tmp_path / "serve.log")
        expected_img, expected_lab = _search_ids(promoted, [png], [",".join(names)], k=5)
        # `dseh search IMAGE --labels a,b --request` prints this body: an image row and a label-set row
        status, body = _post(
            url + "/invocations", request_body(str(promoted["data"]), [str(png)], [",".join(names)], 5)
        )
        assert status == 200, body
        got = [[(p["id"], p["distance"]) for p in body["predictions"] if p["query"] == q] for q in (0, 1)]
        assert got == [expected_img, expected_lab]
        status, body = _post(
            url + "/invocations", {"dataframe_records": [{"image": img.ravel().tolist()}], "params": {"k": 5}}
        )
        assert status == 200, body
        assert [(p["id"], p["distance"]) for p in body["predictions"]] == expected_img
        status, body = _post(url + "/invocations", {"dataframe_records": [{"labels": names}], "params": {"k": 5}})
        assert status == 200, body
        assert [(p["id"], p["distance"]) for p in body["predictions"]] == expected_lab
        assert all(p["labels"] for p in body["predictions"])

        bad = {
            "wrong size": (
                {"dataframe_records": [{"image": img[:8].ravel().tolist()}]},
                "3072 uint8 values, an (32, 32, 3)",
            ),
            "nested lists": ({"dataframe_records": [{"image": img.tolist()}]}, "image"),
            "unknown label": ({"dataframe_records": [{"labels": ["cat"]}]}, "unknown label 'cat'"),
            "k too large": ({"dataframe_records": [{"labels": names}], "params": {"k": 10**6}}, "k must be"),
            "k zero": ({"dataframe_records": [{"labels": names}], "params": {"k": 0}}, "k must be"),
            "both": ({"dataframe_records": [{"labels": names, "image": img.ravel().tolist()}]}, "exactly one"),
            "value range": ({"dataframe_records": [{"image": (img.astype(int) + 300).ravel().tolist()}]}, "0 to 255"),
            # MLflow drops columns its signature does not name: such a row reaches the model as no row
            "neither column": ({"dataframe_records": [{}]}, "no queries"),
            "only an unknown column": ({"dataframe_records": [{"foo": 1}]}, "no queries"),
            "no rows": ({"dataframe_records": []}, "no queries"),
        }
        for what, (request, message) in bad.items():
            status, body = _post(url + "/invocations", request)
            assert status == 400, (what, body)
            assert message in body["message"], (what, body["message"][-300:])
            assert "Traceback" not in json.dumps(body), what
    finally:
        stop_pid(proc, grace=5)
        log.close()
    assert proc.poll() is not None


def test_cli_search_by_labels_and_request(promoted, tmp_path, capsys):
    from dseh.cli import main

    lay, data_dir = promoted["lay"], str(promoted["data"])
    assert main(["search", "--labels", "0,3", "--model", str(lay.imgnet(0)), "--data", data_dir, "-k", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "labels 0,3:" and len(out) == 5  # the query, the header, three hits with their labels
    expected = _search_ids(promoted, labels=["0,3"], k=3)[0]
    assert [(int(line.split()[1]), int(line.split()[2])) for line in out[2:]] == expected
    assert main(["search", "--labels", "0,x", "--model", str(lay.imgnet(0)), "--data", data_dir]) == 2
    assert "unknown label 'x'" in capsys.readouterr().err
    data = PreparedData(data_dir)
    png, img = _query_png(data, int(data.query[0]), tmp_path)
    assert main(["search", str(png), "--labels", "2", "--request", "-k", "4", "--data", data_dir]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body == {"dataframe_records": [{"image": img.ravel().tolist(), "labels": None}, {"image": None, "labels": ["2"]}],
                    "params": {"k": 4}}  # fmt: skip


def test_a_retriever_without_labnet_refuses_label_sets_and_checks_k(promoted):
    from dseh.models.factory import load_imgnet
    from dseh.promotion import retrieval_database
    from dseh.retrieval import Retriever

    data = PreparedData(promoted["data"])
    imgnet, state = load_imgnet(promoted["lay"].imgnet(0))
    r = Retriever(imgnet, None, retrieval_database(promoted["lay"].imgnet(0), data, state.bits), state.image_size, 64)
    img = np.asarray(data.images[int(data.query[0])])
    out = r.answer(pd.DataFrame({"image": [img.ravel()]}), 3)
    assert list(out["id"]) == [
        i for i, _ in _search_ids(promoted, [_query_png(data, int(data.query[0]), promoted["root"])[0]], k=3)[0]
    ]
    with pytest.raises(DsehError, match="no LabNet"):
        r.answer(pd.DataFrame({"labels": [["1"]]}), 3)
    for k in (0, len(data.database) + 1, 2.5, True):
        with pytest.raises(DsehError, match="k must be an integer from 1 to 400"):
            r.answer(pd.DataFrame({"image": [img.ravel()]}), k)
    with pytest.raises(DsehError, match="unknown input column"):
        r.answer(pd.DataFrame({"img": [img.ravel()]}), 3)
