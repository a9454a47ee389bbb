"""The report's retrieval examples: which queries are shown, their top-k and relevance against a brute
force, the framed grid, and the figure written and referenced from the HTML for every image source."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from dseh import evaluation, report, stages
from dseh.codes import pack
from dseh.config import from_dict
from dseh.data import PreparedData
from tests.helpers import make_list_collection, tiny_raw, write_h5_pair


def _multi_hot(sets: list[set[int]], width: int) -> np.ndarray:
    out = np.zeros((len(sets), width), dtype=np.uint8)
    for i, s in enumerate(sets):
        out[i, list(s)] = 1
    return out


def test_example_queries_single_label_one_per_class_in_split_order():
    labels = np.eye(4, dtype=np.uint8)[[0, 0, 1, 2, 1, 3, 3]]
    assert report.example_queries(labels, 3).tolist() == [0, 2, 3]
    assert report.example_queries(labels, 4).tolist() == [0, 2, 3, 5]


def test_example_queries_multi_label_most_new_classes_first_then_the_rest():
    labels = _multi_hot([{0}, {0, 1}, {2, 3, 4}, {0}, {1, 5}], 6)
    # {2,3,4} adds 3 classes; then {0,1} and {1,5} add 2 each (the earlier wins); then {1,5} adds 1
    assert report.example_queries(labels, 3).tolist() == [2, 1, 4]
    # four distinct label sets, then the first query not picked (3 repeats {0}); never more than the queries
    assert report.example_queries(labels, 9).tolist() == [2, 1, 4, 0, 3]


def test_retrieval_examples_match_a_brute_force_ranking():
    rng = np.random.default_rng(3)
    bits, n_q, n_db, k = 12, 30, 200, 10  # 12 bits: many ties, a width that is not a multiple of 8
    q = np.where(rng.random((n_q, bits)) < 0.5, -1.0, 1.0)
    db = np.where(rng.random((n_db, bits)) < 0.5, -1.0, 1.0)
    q_lab = (rng.random((n_q, 5)) < 0.3).astype(np.uint8)
    db_lab = (rng.random((n_db, 5)) < 0.3).astype(np.uint8)
    ex = report.retrieval_examples(pack(q), pack(db), q_lab, db_lab, 5, k)
    assert ex.queries.tolist() == report.example_queries(q_lab, 5).tolist()
    assert ex.results.shape == ex.distances.shape == ex.relevant.shape == (5, k)
    for i, qi in enumerate(ex.queries):
        dist = (q[qi] != db).sum(axis=1)
        order = np.argsort(dist, kind="stable")[:k]  # ties by database index
        assert ex.results[i].tolist() == order.tolist()
        assert ex.distances[i].tolist() == dist[order].tolist()
        assert ex.relevant[i].tolist() == [bool((q_lab[qi] & db_lab[j]).any()) for j in order]
    assert ex.relevant.any() and not ex.relevant.all()  # both marks are exercised


def test_retrieval_grid_frames_each_panel_by_relevance():
    rng = np.random.default_rng(0)
    n, k, panel, frame = 3, 4, 16, 2
    queries = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    results = rng.integers(0, 256, (n, k, 8, 8, 3), dtype=np.uint8)
    relevant = rng.random((n, k)) < 0.5
    grid, boxes = report.retrieval_grid(queries, results, relevant, panel=panel, frame=frame)
    assert boxes.shape == (n, k + 1, 4)
    assert len({tuple(b) for b in boxes.reshape(-1, 4)}) == n * (k + 1)  # one panel each
    colors = report.FRAME_COLORS
    for i in range(n):
        for j in range(k + 1):
            top, left, bottom, right = boxes[i, j]
            assert (bottom - top, right - left) == (panel + 2 * frame,) * 2
            want = "query" if j == 0 else ("relevant" if relevant[i, j - 1] else "irrelevant")
            edge = np.concatenate([grid[top, left:right], grid[bottom - 1, left:right], grid[top:bottom, left]])
            assert (edge == colors[want]).all(), (i, j)
            inner = grid[top + frame : bottom - frame, left + frame : right - frame]
            image = queries[i] if j == 0 else results[i, j - 1]
            assert np.array_equal(inner, image.repeat(2, axis=0).repeat(2, axis=1))  # 8 px -> 16 px blocks


def _list_files_data(root):
    make_list_collection(root / "col")
    data = {"source": "list-files", "image_root": str(root / "col/images"), "list_dir": str(root / "col")}
    return data


def _hdf5_data(root):
    write_h5_pair(root)
    return {"source": "hdf5", "img_h5": str(root / "Img.h5"), "lab_h5": str(root / "Lab.h5"),
            "image_root": str(root / "images")}  # fmt: skip


@pytest.mark.parametrize("source", ["digits-mosaic", "list-files", "hdf5"])
def test_figure_written_referenced_from_the_html_and_listed(source, tiny_data, tmp_path):
    if source == "digits-mosaic":
        data = PreparedData(tiny_data)
        cfg = from_dict(tiny_raw())
    else:
        make = _list_files_data if source == "list-files" else _hdf5_data
        cfg = from_dict(tiny_raw(data={**make(tmp_path), "image_size": 16}))
        stages.prepare(cfg, tmp_path / "data", progress=False)
        data = PreparedData(tmp_path / "data")
    rng = np.random.default_rng(1)
    codes = pack(np.where(rng.random((len(data.labels), 16)) < 0.5, -1.0, 1.0))
    metrics, rep = evaluation.split_metrics(cfg.evaluate, data, codes, 16)
    n, k = min(5, len(data.query)), min(10, len(data.database))
    ex = report.retrieval_examples(
        codes[data.query], codes[data.database], data.labels[data.query], data.labels[data.database], 5, 10
    )
    out = tmp_path / "eval"
    out.mkdir()
    report.write_evaluation(out, rep, metrics, None, None, {}, ex, data)
    png = out / "figures/retrieval.png"
    from PIL import Image

    with Image.open(png) as im:
        width, height = im.size
    grid, _ = report.retrieval_grid(data.images[data.query[ex.queries]], data.images[data.database[ex.results]],
                                    ex.relevant)  # fmt: skip
    assert (height, width) == grid.shape[:2]  # the figure is the grid, one pixel per pixel
    html = (out / "report.html").read_text()
    assert base64.b64encode(png.read_bytes()).decode() in html and "green frame" in html
    rows = json.loads((out / "figures/retrieval.json").read_text())
    assert len(rows) == n and all(len(r["result_items"]) == k for r in rows)
    for r, q, res, rel in zip(rows, ex.queries, ex.results, ex.relevant):
        assert r["query_item"] == int(data.query[q]) and r["result_items"] == data.database[res].tolist()
        labels_q = data.labels[r["query_item"]]
        assert r["relevant"] == rel.tolist() == [bool((labels_q & data.labels[i]).any()) for i in r["result_items"]]
