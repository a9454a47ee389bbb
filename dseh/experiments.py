"""Experiments built from the steps: every round of one configuration (train_rounds), the
code-length sweep and its MAP table (the paper's Table 1 for DSEH), and the shallow baselines
(ITQ/LSH on pixels or a trained network's backbone features) under the same evaluator. The full
method comparison is dseh.compare.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from dseh import artifacts, evaluation, linear, methods, stages
from dseh.artifacts import Layout
from dseh.config import Config, dump_config
from dseh.data import PreparedData, as_prepared
from dseh.errors import DsehError
from dseh.models.factory import load_imgnet
from dseh.storage import atomic_dir, copy_dir


def train_rounds(
    cfg: Config,
    data: str | Path | PreparedData,
    lay: Layout,
    progress: bool = True,
    labnet_cache: Path | None = None,
) -> dict:
    """Every round's LabNet and image-network phases under `lay`, each continuing the round before;
    returns the last LabNet summary.

    With `labnet_cache`, round 0's LabNet is shared between runs whose LabNet inputs are the same
    (what its step fingerprint holds: its params, seed, bits and the data split), such as runs that
    differ only in ImgNet's params; a shared one's summary says `reused`."""
    data = as_prepared(data)
    summary: dict = {}
    for r in range(cfg.train.rounds):
        prev_l, prev_i = (lay.labnet(r - 1), lay.imgnet(r - 1)) if r else (None, None)
        cached = None
        if r == 0 and labnet_cache is not None and methods.get(cfg.method).needs_labnet:
            cached = Path(labnet_cache) / stages.labnet_fingerprint(cfg, 0, [data.sha256])[:24]
        if cached is not None and (cached / artifacts.SUMMARY).is_file():
            copy_dir(cached, lay.labnet(0))
            summary = {**artifacts.read_json(cached / artifacts.SUMMARY), "reused": True}
        else:
            summary = stages.train_labnet(cfg, data, r, lay.labnet(r), prev_l, prev_i, progress)
            if cached is not None:
                copy_dir(lay.labnet(0), cached)
        stages.train_imgnet(cfg, data, r, lay.labnet(r), lay.imgnet(r), prev_i, progress)
    return summary


def sweep_bits(cfg: Config, data_dir: str | Path, bits: int, out_root: str | Path, progress: bool = True) -> dict:
    """Train every round and evaluate at one code length (a column of the paper's Table 1)."""
    c = dataclasses.replace(cfg, bits=bits)
    lay = Layout(Path(out_root))
    train_rounds(c, data_dir, lay, progress)
    last = c.train.rounds - 1
    return stages.evaluate(c, data_dir, lay.labnet(last), lay.imgnet(last), lay.eval, progress)


def map_table(
    cfg: Config, sweep_root: str | Path, out_dir: str | Path, main_eval: str | Path | None = None
) -> list[dict]:
    """Collect the sweep's metrics into map_table.csv and map_table.md (mAP by code length); the row
    of the main length `bits` comes from the main pipeline's evaluation `main_eval` when given."""
    rows = []
    for bits in cfg.sweep.bits:
        where = Path(main_eval) if main_eval is not None and bits == cfg.bits else Path(sweep_root) / str(bits) / "eval"
        m = artifacts.read_json(where / artifacts.METRICS, f"run the evaluation at {bits} bits first")
        if m["bits"] != bits:
            raise DsehError(f"{where / artifacts.METRICS} holds {m['bits']}-bit codes, expected {bits}")
        row = {"bits": bits, **{k: m[k] for k in evaluation.headline_keys(m["protocol_topk"])}}
        if "labnet" in m:
            row.update(
                labnet_distinct_codes=m["labnet"]["distinct_codes_train"],
                distinct_label_sets=m["labnet"]["distinct_label_sets_train"],
            )
        rows.append(row)
    keys = list(rows[0])
    cells = [[r.get(k, "") for k in keys] for r in rows]
    with atomic_dir(out_dir) as tmp:
        artifacts.write_csv(tmp / f"{artifacts.MAP_TABLE}.csv", keys, cells)
        (tmp / f"{artifacts.MAP_TABLE}.md").write_text(artifacts.markdown_table(keys, cells))
        dump_config(cfg, tmp / artifacts.CONFIG)
    return rows


def shallow_baseline(
    cfg: Config,
    data_dir: str | Path,
    method: str,
    bits: int,
    out_dir: str | Path,
    features_from: str | Path | None = None,
) -> dict:
    """A linear method (ITQ, LSH) fitted on the training items' features and evaluated with the same
    evaluator and split as DSEH. Features: raw pixels, or a trained ImgNet's backbone output
    (`features_from` = an ImgNet step output) for the same-backbone comparison."""
    if method not in methods.LINEAR_METHODS:
        raise DsehError(f"unknown baseline '{method}'; choose one of {', '.join(methods.LINEAR_METHODS)}")
    data = PreparedData(data_dir)
    backbone = load_imgnet(features_from)[0].backbone if features_from else None
    codes, _, _ = linear.linear_codes(method, linear.image_features(cfg, data, backbone), data.train, bits, cfg.seed)
    rep = evaluation.split_report(cfg.evaluate, data, codes, bits)
    metrics = {
        "method": method,
        "features": "imgnet-backbone" if features_from else "pixels",
        "bits": bits,
        **evaluation.headline_metrics(rep),
        **evaluation.split_collapse(cfg.evaluate, data, codes, bits),
    }
    with atomic_dir(out_dir) as tmp:
        artifacts.write_json(tmp / artifacts.METRICS, metrics)
        artifacts.save_codes(tmp, codes)
        dump_config(cfg, tmp / artifacts.CONFIG)
    return metrics
