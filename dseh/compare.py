"""`dseh compare`: every hashing method and the paper's ablations on one prepared dataset, with one
backbone, one split and one evaluator; learning rates and loss weights chosen on a validation split
carved from the training set; results as the paper's Table 1 and Table 2 (CSV, Markdown, a figure),
logged to MLflow. Each run's result is cached by its resolved config, so an interrupted comparison
continues where it stopped.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import re
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from dseh import __version__, artifacts, evaluation, experiments, tracking
from dseh.artifacts import Layout, markdown_table, write_dict_rows
from dseh.config import Config, dump_config, epochs_for_round, from_dict, to_dict, trials
from dseh.data import PreparedData
from dseh.errors import DsehError
from dseh.methods import DEEP_METHODS, METHODS
from dseh.storage import atomic_dir, atomic_file
from dseh.train.device import compute_dtype, resolve_device

log = logging.getLogger(__name__)

LABELS = {name: m.label for name, m in METHODS.items()}
# the paper's Table 2 ablations as named presets: params overrides applied to DSEH
ABLATIONS = {
    "dseh-s": ("imgnet.gamma_if=0",),  # no semantic supervision of ImgNet
    "dseh-ss": ("labnet.gamma_pf=0", "imgnet.gamma_if=0"),  # no semantic terms in either net
    "dseh-l": ("labnet.gamma_hl=0",),  # no label loss J4
    "dseh-a": ("train.rounds=1",),  # one round, no alternation
    "dseh-r2": (),  # two rounds with the same total epochs (see ablation_overrides)
}
ABLATION_LABELS = {
    "dseh-s": "DSEH-S (gamma_if = 0)",
    "dseh-ss": "DSEH-SS (gamma_pf = gamma_if = 0)",
    "dseh-l": "DSEH-L (gamma_hl = 0)",
    "dseh-a": "DSEH-A (1 round)",
    "dseh-r2": "DSEH, 2 rounds (same ImgNet epochs)",
}
# comparison/dvc.yaml's params: whole sections, since trials and ablations may override any key of them
PARAMS = ["seed", "labnet", "imgnet", "train", "baseline", "evaluate", "compare"]
# every run inside the comparison: no per-step tracking, one torch thread (so results do not depend on compare.jobs)
RUN_OVERRIDES = ("tracking.enabled=false", "train.threads=1", "train.loader_workers=1")


@dataclass(frozen=True)
class RunSpec:
    """One training-and-evaluation run of the comparison."""

    group: str  # tune | table1 | table2 | equal_time
    method: str
    label: str  # the row it fills
    bits: int
    seed: int
    overrides: tuple[str, ...] = ()
    validation: bool = False

    @property
    def key(self) -> str:
        tag = "-".join(o.replace("=", "_").replace("[", "").replace("]", "").replace(",", "_") for o in self.overrides)
        return f"{self.group}/{self.method}/{self.bits}/seed{self.seed}" + (f"/{tag}" if tag else "")

    def config(self, base: Config) -> Config:
        extra = [f"method={self.method}", f"bits={self.bits}", f"seed={self.seed}", *RUN_OVERRIDES]
        return from_dict(to_dict(base), [*self.overrides, *extra])


def validation_split(data: PreparedData, fraction: float, seed: int) -> PreparedData:
    """Validation protocol inside the training set: `fraction` of the training items become
    queries; the rest are both the training set and the database. The query set is never used."""
    rng = np.random.default_rng([seed, 7])
    train = data.train.copy()
    rng.shuffle(train)
    n_val = max(1, int(round(fraction * len(train))))
    rest = np.sort(train[n_val:])
    return data.with_splits(f"validation-{fraction}-{seed}", rest, np.sort(train[:n_val]), rest)


def ablation_overrides(cfg: Config, name: str) -> tuple[str, ...]:
    """The overrides of an ablation preset on top of `cfg`. dseh-r2, the alternation counterpart for
    params that train one round, splits the same total ImgNet epochs over two rounds (LabNet's
    second round gets half its first round's epochs, as in the release's decreasing schedule)."""
    if name != "dseh-r2":
        return ABLATIONS[name]
    total = sum(epochs_for_round(cfg.imgnet.epochs, r) for r in range(cfg.train.rounds))
    lab0 = epochs_for_round(cfg.labnet.epochs, 0)
    return (
        "train.rounds=2",
        f"imgnet.epochs=[{-(-total // 2)},{total // 2}]",
        f"labnet.epochs=[{lab0},{max(1, -(-lab0 // 2))}]",
    )


def _fingerprint(cfg: Config, spec: RunSpec, data: PreparedData) -> str:
    # the package version, not the commit: a documentation commit must not throw away an hour of runs;
    # the compare section is left out, so adding seeds or lengths reuses the runs already done;
    # the compute dtype counts too: bf16 autocast depends on the machine; "/2": results name their
    # metrics by evaluation.headline_keys
    run_cfg = {k: v for k, v in to_dict(cfg).items() if k != "compare"}
    dtype = compute_dtype(resolve_device(cfg.train.device), cfg.train.amp)
    return artifacts.fingerprint("compare-run/2", run_cfg, asdict(spec), data.sha256, __version__, dtype)


def run_one(base: Config, spec: RunSpec, data_dir: str, runs_root: str, val_fraction: float) -> dict:
    """Train and evaluate one run (or return its cached result); keeps only result.json."""

    cfg = spec.config(base)
    data = PreparedData(data_dir)
    if spec.validation:
        data = validation_split(data, val_fraction, base.seed)
    run_dir = Path(runs_root) / spec.key
    result_file = run_dir / "result.json"
    fp = _fingerprint(cfg, spec, data)
    if result_file.is_file():
        cached = json.loads(result_file.read_text())
        if cached.get("fingerprint") == fp:
            return cached
    work = run_dir / "work"
    shutil.rmtree(work, ignore_errors=True)
    lay = Layout(work)
    t0 = time.perf_counter()
    lab_summary = experiments.train_rounds(cfg, data, lay, progress=False, labnet_cache=Path(runs_root) / "labnet")
    # a LabNet shared with an earlier run (same LabNet inputs) counts its training time here too
    seconds = time.perf_counter() - t0 + (lab_summary.get("seconds", 0.0) if lab_summary.get("reused") else 0.0)
    codes = artifacts.load_codes(lay.imgnet(cfg.train.rounds - 1), len(data.labels), cfg.bits)
    rep = evaluation.split_report(cfg.evaluate, data, codes, cfg.bits)
    state = evaluation.split_collapse(cfg.evaluate, data, codes, cfg.bits)
    epochs = (
        sum(epochs_for_round(cfg.imgnet.epochs, r) for r in range(cfg.train.rounds)) if METHODS[cfg.method].deep else 0
    )
    result = {
        **asdict(spec),
        "key": spec.key,
        **evaluation.headline_metrics(rep),
        "topk": rep.topk,
        "train_seconds": round(seconds, 2),
        "imgnet_epochs": epochs,
        "labnet_distinct_codes": lab_summary.get("distinct_codes"),
        "distinct_label_sets": int(len(np.unique(data.labels[data.train], axis=0))),
        **state,
        "fingerprint": fp,
    }
    with atomic_file(result_file) as tmp:
        tmp.write_text(json.dumps(result, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    log.info(
        "%s: mAP@ALL %.4f, mAP@%d %.4f, %.0f s%s",
        spec.key,
        rep.map_all,
        rep.topk,
        rep.map_topk,
        seconds,
        " (collapsed)" if state["collapsed"] else "",
    )
    return result


def _init_worker(level: int) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("faiss", "faiss.loader", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _run_all(base: Config, specs: list[RunSpec], data_dir: str, runs_root: str) -> list[dict]:
    args = (data_dir, runs_root, base.compare.val_fraction)
    if base.compare.jobs == 1 or len(specs) <= 1:
        return [run_one(base, s, *args) for s in specs]
    with ProcessPoolExecutor(
        max_workers=base.compare.jobs,
        mp_context=get_context("spawn"),
        initializer=_init_worker,
        initargs=(logging.getLogger().getEffectiveLevel(),),
    ) as pool:
        futures = [pool.submit(run_one, base, s, *args) for s in specs]
        try:
            return [f.result() for f in futures]
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # finished runs stay cached for the next attempt
            raise


def _check_overrides(base: Config) -> None:
    """Every ablation is a known preset, and every trial and ablation resolves to a valid config,
    before the first run starts."""
    for a in base.compare.ablations:
        if a not in ABLATIONS:
            raise DsehError(f"params key 'compare.ablations': {a!r} is not one of {', '.join(ABLATIONS)}")
    for m in DEEP_METHODS:
        for t in trials(base, m):
            RunSpec("tune", m, m, base.bits, base.seed, tuple(t)).config(base)
    for a in base.compare.ablations:
        RunSpec("table2", "dseh", a, base.bits, base.seed, ablation_overrides(base, a)).config(base)


def plan_tuning(base: Config) -> list[RunSpec]:
    """Every deep method's trials, interleaved across methods (so DSEH's later trials start after
    its first one has trained the LabNet they share)."""
    c = base.compare
    per_method = [
        [RunSpec("tune", m, LABELS[m], c.tune_bits, c.seeds[0], tuple(t), validation=True) for t in trials(base, m)]
        for m in c.methods
        if m in DEEP_METHODS
    ]
    return [spec for group in itertools.zip_longest(*per_method) for spec in group if spec is not None]


def best_trials(results: list[dict]) -> dict[str, tuple[str, ...]]:
    """Per method, the trial with the best validation mAP@ALL among those that did not collapse."""
    best: dict[str, dict] = {}
    for r in results:
        ok = not r["collapsed"]
        cur = best.get(r["method"])
        if cur is None or (ok, r["map_all"]) > (not cur["collapsed"], cur["map_all"]):
            best[r["method"]] = r
    return {m: tuple(r["overrides"]) for m, r in best.items()}


def plan_tables(base: Config, best: dict[str, tuple[str, ...]]) -> list[RunSpec]:
    c = base.compare
    specs = [RunSpec("table1", m, LABELS[m], b, s, best.get(m, ())) for m in c.methods for b in c.bits for s in c.seeds]
    if "dseh" in c.methods:
        reference = RunSpec("table1", "dseh", "DSEH", c.ablation_bits, c.seeds[0], best.get("dseh", ()))
        for a in c.ablations:
            over = best.get("dseh", ()) + ablation_overrides(base, a)
            probe = RunSpec("table2", "dseh", ABLATION_LABELS[a], c.ablation_bits, c.seeds[0], over)
            if to_dict(probe.config(base)) == to_dict(reference.config(base)):
                continue  # the preset is what params already train: its row is DSEH's
            specs += [RunSpec("table2", "dseh", ABLATION_LABELS[a], c.ablation_bits, s, over) for s in c.seeds]
    return specs


def plan_equal_time(base: Config, best: dict[str, tuple[str, ...]], results: list[dict]) -> list[RunSpec]:
    """Deep baselines rerun with as many epochs as fit in DSEH's training wall time (same bits, seed)."""
    c = base.compare
    by = {(r["method"], r["bits"], r["seed"]): r for r in results if r["group"] == "table1"}
    specs = []
    for m in ("dpsh", "hashnet"):
        if m not in c.methods or "dseh" not in c.methods:
            continue
        for b in c.equal_time_bits:
            for s in c.seeds:
                mine, dseh = by.get((m, b, s)), by.get(("dseh", b, s))
                if mine is None or dseh is None or not mine["imgnet_epochs"]:
                    continue
                per_epoch = mine["train_seconds"] / mine["imgnet_epochs"]
                epochs = max(1, round(dseh["train_seconds"] / per_epoch))
                over = best.get(m, ()) + ("train.rounds=1", f"imgnet.epochs=[{epochs}]")
                specs.append(RunSpec("equal_time", m, f"{LABELS[m]} (equal time)", b, s, over))
    return specs


def _cell(rows: list[dict], key: str) -> dict:
    ok = [r[key] for r in rows if not r["collapsed"]]
    return {
        "mean": float(np.mean(ok)) if ok else math.nan,
        "std": float(np.std(ok)) if ok else math.nan,
        "runs": len(rows),
        "collapsed": len(rows) - len(ok),
    }


def _fmt(cell: dict) -> str:
    if not cell["runs"]:
        return ""
    if cell["collapsed"] == cell["runs"]:
        return f"collapsed ({cell['runs']}/{cell['runs']})"
    text = f"{cell['mean']:.4f} ± {cell['std']:.4f}"
    return text + (f" ({cell['collapsed']}/{cell['runs']} collapsed)" if cell["collapsed"] else "")


def build_tables(base: Config, results: list[dict]) -> dict:
    """Table 1 (method x bits) and Table 2 (ablations at compare.ablation_bits): mean and std over
    seeds of the runs that did not collapse; collapsed runs are counted in the cell, never averaged."""
    c = base.compare
    topk = next((r["topk"] for r in results), base.evaluate.topk)
    t1 = [r for r in results if r["group"] in ("table1", "equal_time")]
    labels = list(dict.fromkeys(r["label"] for r in t1))
    long_rows, md = [], []
    k_key = evaluation.headline_keys(topk)[1]  # map_at_<topk>
    for metric, title in (("map_all", "mAP@ALL"), (k_key, f"mAP@{topk}")):
        rows = []
        for label in labels:
            cells = []
            for b in c.bits:
                runs = [r for r in t1 if r["label"] == label and r["bits"] == b]
                cell = _cell(runs, metric)
                cells.append(_fmt(cell))
                if runs:
                    secs = float(np.mean([r["train_seconds"] for r in runs]))
                    epochs = runs[0]["imgnet_epochs"]
                    long_rows.append(
                        {
                            "table": 1,
                            "row": label,
                            "bits": b,
                            "metric": metric,
                            **cell,
                            "train_seconds": secs,
                            "epochs": epochs,
                        }
                    )
            rows.append([label, *cells])
        md.append(f"**Table 1, {title}** (mean ± std over seeds {list(c.seeds)})\n\n")
        md.append(markdown_table(["method", *[f"{b} bits" for b in c.bits]], rows) + "\n")
    budget = []
    for label in labels:
        runs = [r for r in t1 if r["label"] == label]
        epochs = sorted({r["imgnet_epochs"] for r in runs})
        secs = [
            f"{b}: {np.mean([r['train_seconds'] for r in runs if r['bits'] == b]):.0f}"
            for b in c.bits
            if any(r["bits"] == b for r in runs)
        ]
        budget.append([label, ", ".join(map(str, epochs)), ", ".join(secs)])
    md.append(
        f"**Training budget** (image-network epochs; bits: mean training seconds per run, one thread, "
        f"{c.jobs} run(s) at a time)\n\n"
    )
    md.append(markdown_table(["method", "epochs", "seconds"], budget) + "\n")
    # Table 2
    t2 = [r for r in results if r["group"] == "table2" or (r["group"] == "table1" and r["label"] == "DSEH")]
    t2 = [r for r in t2 if r["bits"] == c.ablation_bits]
    t2_labels = ["DSEH"] + [ABLATION_LABELS[a] for a in c.ablations]
    rows2 = []
    for label in t2_labels:
        runs = [r for r in t2 if r["label"] == label]
        same = not runs and label != "DSEH"
        if same:
            runs = [r for r in t2 if r["label"] == "DSEH"]
        if not runs:
            continue
        cells = {m: _cell(runs, m) for m in ("map_all", k_key)}
        lab = [r["labnet_distinct_codes"] for r in runs if r["labnet_distinct_codes"] is not None]
        distinct = f"{np.mean(lab):.1f}" if lab else ""
        for m, cell in cells.items():
            long_rows.append(
                {"table": 2, "row": label, "bits": c.ablation_bits, "metric": m, **cell, "same_as_dseh": same}
            )
        rows2.append(
            [
                label + (" = DSEH (params already say so)" if same else ""),
                _fmt(cells["map_all"]),
                _fmt(cells[k_key]),
                distinct,
                str(runs[0]["distinct_label_sets"]),
            ]
        )
    md.append(f"**Table 2, ablations at {c.ablation_bits} bits** (mean ± std over seeds {list(c.seeds)})\n\n")
    md.append(
        markdown_table(
            ["variant", "mAP@ALL", f"mAP@{topk}", "distinct LabNet codes", "distinct label sets (train)"], rows2
        )
    )
    return {"long": long_rows, "markdown": "".join(md), "topk": topk}


def _figure(base: Config, long_rows: list[dict], path: Path) -> None:
    from dseh.report import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    metrics = list(dict.fromkeys(r["metric"] for r in long_rows if r["table"] == 1))  # map_all, map_at_<k>
    for ax, metric in zip(axes, metrics):
        rows = [r for r in long_rows if r["table"] == 1 and r["metric"] == metric]
        for label in dict.fromkeys(r["row"] for r in rows):
            pts = [r for r in rows if r["row"] == label and not math.isnan(r["mean"])]
            if pts:
                ax.errorbar(
                    [r["bits"] for r in pts],
                    [r["mean"] for r in pts],
                    yerr=[r["std"] for r in pts],
                    marker="o",
                    capsize=3,
                    label=label,
                )
        ax.set(
            xlabel="bits",
            ylabel=metric.replace("map_at_", "mAP@").replace("map_all", "mAP@ALL"),
            xticks=list(base.compare.bits),
        )
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Table 1: mean ± std over seeds (collapsed runs left out and counted in the tables)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _metric_name(row: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", row).strip("_")


def compare(cfg: Config, data_dir: str | Path, out_dir: str | Path, runs_root: str | Path | None = None) -> dict:
    """Tune, run Table 1, Table 2 and the equal-time rows, and write the tables under out_dir."""
    data = PreparedData(data_dir)
    _check_overrides(cfg)
    runs_root = Path(runs_root) if runs_root else Path(out_dir).parent / "compare_runs"
    t0 = time.perf_counter()
    tune = _run_all(cfg, plan_tuning(cfg), str(data_dir), str(runs_root))
    best = best_trials(tune)
    log.info("tuned on the validation split: %s", best)
    main = _run_all(cfg, plan_tables(cfg, best), str(data_dir), str(runs_root))
    extra = _run_all(cfg, plan_equal_time(cfg, best, main), str(data_dir), str(runs_root))
    results = main + extra
    tables = build_tables(cfg, results)
    summary = {
        "best_trials": {m: list(t) for m, t in best.items()},
        "runs": len(tune) + len(results),
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "collapsed_runs": [r["key"] for r in tune + results if r["collapsed"]],
    }
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        write_dict_rows(tmp / "tables.csv", tables["long"])
        write_dict_rows(tmp / "runs.csv", tune + results)
        (tmp / "tables.md").write_text(tables["markdown"])
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
        _figure(cfg, tables["long"], tmp / "table1.png")
        dump_config(cfg, tmp / artifacts.CONFIG)
    with tracking.step_run(cfg, "compare", data.sha256) as tr:
        if tr is not None:
            tr.log_metrics(
                {
                    f"table{r['table']}.{_metric_name(r['row'])}.{r['bits']}bits.{r['metric']}.{stat}": r[stat]
                    for r in tables["long"]
                    for stat in ("mean", "std", "collapsed")
                    if not (isinstance(r[stat], float) and math.isnan(r[stat]))
                }
            )
            tr.log_artifacts(out, "compare")
    print(tables["markdown"])
    return {"tables": tables, **summary}
