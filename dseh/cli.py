"""The `dseh` command line: one subcommand per pipeline step (what dvc.yaml runs), the experiments,
search and indexes, Kubeflow, and the dvc.yaml generator; one handler function per subcommand.
Step commands take `--params` and repeatable `-S/--set key=value`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from dseh.errors import DsehError
from dseh.pipeline_params import POD


def _set_option(p: argparse.ArgumentParser, help_text: str) -> None:
    p.add_argument(
        "-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help_text
    )  # fmt: skip


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    _set_option(p, "override a params key, e.g. -S labnet.epochs=[5,3] (repeatable)")
    p.add_argument("--root", default="outputs", help="root of the default output layout (default: outputs)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _at_least(least: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least `least`."""

    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if n < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, got {n}")
        return n

    return parse


_positive, _non_negative = _at_least(1), _at_least(0)
CHECKPOINT_HELP = "resume checkpoint file (default: beside the output, .OUT.ckpt.pt)"


def _steps(sub) -> None:
    p = sub.add_parser("prepare", help="build the prepared dataset from data.source")
    _common(p)
    p.add_argument("--out", help="output directory (default: ROOT/data)")

    p = sub.add_parser("train-labnet", help="LabNet phase of one round")
    _common(p)
    p.add_argument("--round", type=_non_negative, default=0)
    p.add_argument("--data")
    p.add_argument("--out")
    p.add_argument("--prev-labnet", help="LabNet output of the previous round (default from the layout)")
    p.add_argument("--prev-imgnet", help="ImgNet output of the previous round (default from the layout)")
    p.add_argument("--checkpoint", help=CHECKPOINT_HELP)

    p = sub.add_parser("train-imgnet", help="image-network phase of one round (any method)")
    _common(p)
    p.add_argument("--round", type=_non_negative, default=0)
    p.add_argument("--data")
    p.add_argument("--labnet", help="LabNet output of this round (default from the layout)")
    p.add_argument("--prev-imgnet", help="ImgNet output of the previous round (default from the layout)")
    p.add_argument("--out")
    p.add_argument("--checkpoint", help=CHECKPOINT_HELP)

    p = sub.add_parser("evaluate", help="metrics, plots and the HTML report of the last round")
    _common(p)
    p.add_argument("--encode", action="store_true", help="encode every item with the model, not its saved codes")
    for name in ("--data", "--labnet", "--imgnet", "--out"):
        p.add_argument(name)

    p = sub.add_parser("promote", help="register the evaluated model; move `champion` if it is better")
    _common(p)
    for name in ("--data", "--labnet", "--imgnet", "--eval", "--out"):
        p.add_argument(name)
    p.add_argument("--dry-run", action="store_true", help="say what would happen; write nothing anywhere")


def _experiments(sub) -> None:
    from dseh.methods import LINEAR_METHODS

    p = sub.add_parser("sweep", help="train and evaluate at one code length (the map_table stage's input)")
    _common(p)
    p.add_argument("--bits", type=_positive, required=True)
    p.add_argument("--data")
    p.add_argument("--out", help="default: ROOT/sweep/BITS")

    p = sub.add_parser("map-table", help="collect the sweep into map_table.csv and .md")
    _common(p)
    p.add_argument("--out", help="default: ROOT/table")
    p.add_argument("--no-main", action="store_true", help="read the main length from ROOT/sweep too, not ROOT/eval")

    p = sub.add_parser("baseline", help="a linear hash on pixels or a trained ImgNet's backbone features")
    _common(p)
    p.add_argument("--method", choices=LINEAR_METHODS, required=True)
    p.add_argument("--bits", type=_positive, help="default: params bits")
    p.add_argument("--data")
    p.add_argument("--features-from", help="an ImgNet step output whose backbone gives the features (default: pixels)")
    p.add_argument("--out", help="default: ROOT/baselines/METHOD-BITS-pixels (or -backbone with --features-from)")

    p = sub.add_parser("compare", help="every method and ablation over code lengths and seeds (Tables 1 and 2)")
    _common(p)
    p.add_argument("--data")
    p.add_argument("--out", help="default: ROOT/compare")
    p.add_argument("--runs", help="per-run result cache (default: ROOT/compare_runs); finished runs are reused")


def _retrieval(sub) -> None:
    from dseh.index import KINDS

    p = sub.add_parser("search", help="top-k database items for query image files or label sets")
    p.add_argument("images", nargs="*", help="image files")
    p.add_argument("--labels", action="append", help="a label set 'a,b' (class names), searched by LabNet's code")
    p.add_argument("--labnet", help="the LabNet of the model's round (default: ROOT/labnet/roundR beside --model)")
    p.add_argument("--model", default="outputs/imgnet/round0",
                   help="an ImgNet step output directory, or an MLflow model URI (models:/dseh-imgnet@champion)")  # fmt: skip
    p.add_argument("--codes", help="packed database codes (default: MODEL/codes.npy; required with an MLflow URI)")
    p.add_argument("--request", action="store_true", help="print the queries as a request to the served model")
    p.add_argument("--data", default="outputs/data", help="the prepared dataset the model was trained on")
    p.add_argument("--weights", help="CNN-F .mat to rebuild the backbone, if it moved")
    p.add_argument("-k", type=_positive, default=10)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--index", help="search this approximate index (from `dseh index`) instead of the exact scan")
    p.add_argument("--nprobe", type=int, default=0, help="ivf cells visited per query (default: the index's)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds the MLflow server may take per call (models:/)")

    p = sub.add_parser("index", help="build a faiss binary index over a model's database codes; report its recall@k")
    p.add_argument("--model", default="outputs/imgnet/round0", help="an ImgNet step output (its codes.npy)")
    p.add_argument("--codes", help="packed codes of every item (default: MODEL/codes.npy)")
    p.add_argument("--data", default="outputs/data", help="the prepared dataset (its database and query splits)")
    p.add_argument("--kind", choices=KINDS, default=KINDS[0])
    p.add_argument("--nlist", type=int, default=0, help="ivf cells (default about sqrt(database size))")
    p.add_argument("--nprobe", type=int, default=0, help="ivf cells visited per query (default nlist / 64)")
    p.add_argument("--nflip", type=int, default=0, help="mih bits flipped per substring (default 1)")
    p.add_argument("-k", type=_positive, default=100, help="recall@k is measured with the query split's codes")
    p.add_argument("--out", help="index file (default: beside MODEL, MODEL-index-KIND.faiss; not inside it)")


def _cluster(sub) -> None:
    p = sub.add_parser("pipeline", help="Kubeflow Pipelines: compile, submit, schedule, run-local")
    psub = p.add_subparsers(dest="action", required=True)
    for action, text in (
        ("compile", "write the pipeline's IR YAML"),
        ("submit", "create a run on a cluster"),
        ("schedule", "create a recurring run"),
        ("run-local", "run the whole pipeline here (kfp.local)"),
    ):
        a = psub.add_parser(action, help=text)
        a.add_argument(
            "--params", default="params.yaml", help="params baked in as the default of the `params` parameter"
        )
        a.add_argument("--rounds", type=int, help="rounds to unroll (default: train.rounds)")
        a.add_argument("--gpus", type=int, default=1, help="GPUs per training/evaluation pod; >1 trains under torchrun")
        a.add_argument("--nodes", type=int, default=1, help=">1: ImgNet runs as a Kubeflow Trainer job (needs --pvc)")
        a.add_argument("--job-namespace", default="", help="namespace of the Trainer job (default: the step's own)")
        a.add_argument("--cpu-limit", default=POD.cpu)
        a.add_argument("--memory-limit", default=POD.memory)
        a.add_argument("--pvc", default="", help="PersistentVolumeClaim mounted at /data")
        a.add_argument("--checkpoint-root", default="", metavar="S3_PREFIX",
                       help="without --pvc: where retried training steps find their checkpoints (s3://bucket/prefix)")  # fmt: skip
        a.add_argument(
            "--enable-caching", action="store_true", help="reuse data steps for the same data_version and config"
        )
        a.add_argument("--image", help="the project image the steps run on (default: DSEH_IMAGE)")
        a.add_argument("--accelerator-type", default=POD.accelerator, help="the GPU resource the GPU pods ask for")
        a.add_argument("--no-gpu-prepare", action="store_true", help="prepare asks for no GPU")
        a.add_argument("--toleration", action="append", default=[], metavar="KEY[=VALUE][:EFFECT]",
                       help="a taint the GPU pods tolerate, e.g. nvidia.com/gpu=present:NoSchedule (repeatable)")  # fmt: skip
        a.add_argument("--node-selector", action="append", default=[], metavar="KEY=VALUE",
                       help="a node label the GPU pods need (repeatable)")  # fmt: skip
        if action == "compile":
            a.add_argument("-o", "--output", default="dseh_pipeline.yaml")
        else:
            _set_option(a, "a pipeline parameter (bits=64, data_version=v3) or any params key (labnet.beta=0.02)")
        if action in ("submit", "schedule"):
            a.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://localhost:8080")
            a.add_argument("--experiment", default="dseh")
            a.add_argument("--namespace", help="Kubeflow profile namespace (multi-user); credentials from the environment: "
                           "DSEH_KFP_TOKEN, KF_PIPELINES_SA_TOKEN_PATH or DSEH_KFP_COOKIES")  # fmt: skip
            a.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the KFP API to answer")
        if action == "submit":
            a.add_argument("--wait", action="store_true", help="wait for the run to finish")
            a.add_argument("--run-name", help="default: dseh-<time>-<random>, one of its own per run")
        if action == "schedule":
            a.add_argument("--cron", required=True, help="KFP cron expression with seconds, e.g. '0 0 3 * * *'")
            a.add_argument("--name", default="dseh-scheduled")
            a.add_argument("--catchup", action="store_true", help="run the intervals missed while paused, too")

    p = sub.add_parser("job-manifest", help="print the Kubeflow Trainer job that runs a dseh step under torchrun")
    p.add_argument("--name", default="dseh-train-imgnet")
    p.add_argument("--image", required=True)
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--gpus", type=int, default=1, help="GPUs (processes) per node")
    p.add_argument("--namespace", default="kubeflow")
    p.add_argument("--pvc", default="", help="PersistentVolumeClaim every node mounts at --mount")
    p.add_argument("--mount", default="/data")
    p.add_argument("step", nargs=argparse.REMAINDER, help="the dseh step and its arguments, after --")

    p = sub.add_parser("dvc-yaml", help="write dvc.yaml (and the opt-in sweep/dvc.yaml) for the rounds in params")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("-o", "--output", default="dvc.yaml")
    p.add_argument("--check", action="store_true", help="fail if the file differs from what would be written")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dseh", description="Deep Joint Semantic-Embedding Hashing pipeline")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_steps, _experiments, _retrieval, _cluster):
        add(sub)
    return parser


# --------------------------------------------------------------------------- handlers


def _context(args: argparse.Namespace):
    """(config, default layout, progress) of a step command."""
    from dseh.artifacts import Layout
    from dseh.config import load_config

    return load_config(args.params, args.overrides), Layout(Path(args.root)), not args.quiet


def _existing_dir(path: str | Path | None, what: str) -> Path | None:
    """A folder argument: a file there is refused by name (a missing one is the step's own error)."""
    if path is not None and Path(path).is_file():
        raise DsehError(f"{what} {path} is a file; give the step output folder")
    return None if path is None else Path(path)


def _prepare(args) -> None:
    from dseh import stages

    cfg, lay, progress = _context(args)
    stages.prepare(cfg, args.out or lay.data, progress)


def _train_labnet(args) -> None:
    from dseh import stages

    cfg, lay, progress = _context(args)
    r = args.round
    prev_l = args.prev_labnet or (lay.labnet(r - 1) if r > 0 else None)
    prev_i = args.prev_imgnet or (lay.imgnet(r - 1) if r > 0 else None)
    out = args.out or lay.labnet(r)
    stages.train_labnet(cfg, args.data or lay.data, r, out, prev_l, prev_i, progress, args.checkpoint)


def _train_imgnet(args) -> None:
    from dseh import stages

    cfg, lay, progress = _context(args)
    r = args.round
    prev_i = args.prev_imgnet or (lay.imgnet(r - 1) if r > 0 else None)
    labnet = args.labnet or lay.labnet(r)
    out = args.out or lay.imgnet(r)
    stages.train_imgnet(cfg, args.data or lay.data, r, labnet, out, prev_i, progress, args.checkpoint)


def _evaluate(args) -> None:
    from dseh import stages

    cfg, lay, progress = _context(args)
    last = cfg.train.rounds - 1
    labnet = _existing_dir(args.labnet or lay.labnet(last), "--labnet")
    imgnet = _existing_dir(args.imgnet or lay.imgnet(last), "--imgnet")
    metrics = stages.evaluate(cfg, args.data or lay.data, labnet, imgnet, args.out or lay.eval, progress, args.encode)
    print(json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, indent=2))


def _promote(args) -> None:
    from dseh import stages

    cfg, lay, _ = _context(args)
    imgnet = _existing_dir(args.imgnet or lay.imgnet(cfg.train.rounds - 1), "--imgnet")
    out = None if args.dry_run else (args.out or lay.promote)
    labnet = args.labnet or lay.labnet(cfg.train.rounds - 1)
    decision = stages.promote(cfg, args.data or lay.data, imgnet, args.eval or lay.eval, out, args.dry_run, labnet)
    print(json.dumps(decision, indent=2))


def _sweep(args) -> None:
    from dseh import experiments

    cfg, lay, progress = _context(args)
    experiments.sweep_bits(cfg, args.data or lay.data, args.bits, args.out or lay.sweep(args.bits), progress)


def _map_table(args) -> None:
    from dseh import artifacts, experiments

    cfg, lay, _ = _context(args)
    out = Path(args.out or lay.table)
    experiments.map_table(cfg, lay.root / "sweep", out, None if args.no_main else lay.eval)
    print((out / f"{artifacts.MAP_TABLE}.md").read_text())


def _baseline(args) -> None:
    from dseh import experiments

    cfg, lay, _ = _context(args)
    bits = args.bits or cfg.bits
    out = args.out or lay.root / "baselines" / f"{args.method}-{bits}-{'backbone' if args.features_from else 'pixels'}"
    m = experiments.shallow_baseline(cfg, args.data or lay.data, args.method, bits, out, args.features_from)
    print(json.dumps(m, indent=2))


def _compare(args) -> None:
    from dseh.compare import compare

    cfg, lay, _ = _context(args)
    compare(cfg, args.data or lay.data, args.out or lay.root / "compare", args.runs)


def _search(args) -> None:
    from dseh.search import request_body, search

    if args.request:  # the JSON body that `mlflow models serve` of dseh-retrieval answers (docs/serving.md)
        return print(json.dumps(request_body(args.data, args.images, args.labels, args.k)))
    model = args.model if args.model.startswith(("models:/", "runs:/")) else _existing_dir(args.model, "--model")
    results = search(str(model), args.data, args.images, args.k, args.weights, args.codes, args.index, args.nprobe,
                     args.timeout, args.labels, args.labnet)  # fmt: skip
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for res in results:
        print(f"{res['image']}:" if "image" in res else f"labels {','.join(res['labels'])}:")
        print(f"  {'rank':>4} {'index':>7} {'dist':>4}  labels  path")
        for r in res["results"]:
            labels = ",".join(r["labels"]) or "-"
            print(f"  {r['rank']:>4} {r['index']:>7} {r['distance']:>4}  {labels}  {r['path'] or ''}")


def _index(args) -> None:
    import numpy as np

    from dseh import index as ix
    from dseh.artifacts import CODES, MODEL, load_step_model
    from dseh.data import PreparedData
    from dseh.search import item_codes

    data = PreparedData(args.data)
    codes = item_codes(Path(args.codes or Path(args.model) / CODES), data, args.data)
    model_dir = Path(args.model)  # not inside the step output: DVC would see it changed
    out = Path(args.out or model_dir.parent / f"{model_dir.name}-index-{args.kind}.faiss")
    db, q = codes[np.asarray(data.database)], np.asarray(codes[np.asarray(data.query)])
    model = Path(args.model) / MODEL
    bits = load_step_model(args.model, ("imgnet", "linear-hash")).bits if model.is_file() else None
    index, report = ix.build_and_measure(db, q, args.k, args.kind, args.nlist, args.nprobe, args.nflip, bits=bits)
    ix.save_index(index, out, report)
    print(json.dumps({"index": str(out), **report}, indent=2))


def _pipeline(args) -> None:
    from dseh import kfp_cli

    kw = {
        "rounds": args.rounds, "gpus": args.gpus, "nodes": args.nodes,
        "job_namespace": args.job_namespace, "cpu_limit": args.cpu_limit, "memory_limit": args.memory_limit,
        "pvc_name": args.pvc, "checkpoint_root": args.checkpoint_root, "enable_caching": args.enable_caching, "image": args.image,
        "accelerator_type": args.accelerator_type, "gpu_prepare": not args.no_gpu_prepare,
        "placement": (args.toleration, args.node_selector),
    }  # fmt: skip
    if args.action == "compile":
        print(f"wrote {kfp_cli.compile_pipeline(args.params, args.output, **kw)}")
        return
    if args.action == "submit":
        where = kfp_cli.Endpoint(args.host, args.timeout, args.namespace)
        out = kfp_cli.submit(where, args.params, args.experiment, args.overrides, args.wait, args.run_name, **kw)
    elif args.action == "schedule":
        where = kfp_cli.Endpoint(args.host, args.timeout, args.namespace)
        out = kfp_cli.schedule(
            where, args.params, args.experiment, args.cron, args.overrides, args.name, args.catchup, **kw
        )
    else:
        out = kfp_cli.run_local(args.params, args.overrides, **kw)
    print(json.dumps(out, indent=2))


def _job_manifest(args) -> None:
    import yaml

    from dseh import kube

    step = args.step[1:] if args.step[:1] == ["--"] else args.step
    if not step:
        raise DsehError("give the dseh step to run after --, e.g. -- train-imgnet --params /data/params.yaml")
    opts = kube.JobOptions(
        name=args.name, image=args.image, nodes=args.nodes, gpus_per_node=args.gpus,
        namespace=args.namespace, pvc_name=args.pvc, mount_path=args.mount,
    )  # fmt: skip
    print(yaml.safe_dump(kube.job_manifest(opts, step), sort_keys=False), end="")


def _dvc_yaml(args) -> None:
    from dseh.config import load_config
    from dseh.dvcfile import render, render_sweep

    cfg = load_config(args.params)
    out = Path(args.output)
    files = {out: render(cfg), out.parent / "sweep" / "dvc.yaml": render_sweep(cfg)}
    for path, text in files.items():
        if args.check and (not path.is_file() or path.read_text() != text):
            raise DsehError(f"{path} is out of date with {args.params}: run `dseh dvc-yaml`")
    if args.check:
        return
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    print(f"wrote {', '.join(map(str, files))} ({cfg.train.rounds} rounds)")


HANDLERS: dict[str, Callable[[argparse.Namespace], None]] = {
    "prepare": _prepare,
    "train-labnet": _train_labnet,
    "train-imgnet": _train_imgnet,
    "evaluate": _evaluate,
    "promote": _promote,
    "sweep": _sweep,
    "map-table": _map_table,
    "baseline": _baseline,
    "compare": _compare,
    "search": _search,
    "index": _index,
    "pipeline": _pipeline,
    "job-manifest": _job_manifest,
    "dvc-yaml": _dvc_yaml,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("faiss", "faiss.loader", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        HANDLERS[args.command](args)
        return 0
    except DsehError as exc:
        print(f"dseh: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dseh: interrupted", file=sys.stderr)
        return 130
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Under torchrun, leave the data-parallel group the training step joined."""
    if "dseh.train.device" in sys.modules:
        sys.modules["dseh.train.device"].leave_distributed()
