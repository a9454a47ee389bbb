"""One function per pipeline step (prepare, train_labnet, train_imgnet, evaluate): the orchestration
API that the CLI (dvc.yaml) and the Kubeflow components call. The only module that knows
artifact file names.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import subprocess
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dseh import __version__, tracking, train
from dseh.codes import collapse, count_distinct, pack, sign, unpack
from dseh.config import Config, EvaluateConfig, dump_config, epochs_for_round, from_dict, to_dict
from dseh.data import MANIFEST, PreparedData, open_source, write_prepared
from dseh.errors import DsehError
from dseh.models.backbones import create_backbone
from dseh.models.nets import ImgNet, LabNet
from dseh.storage import atomic_dir, copy_dir, local_copy

log = logging.getLogger(__name__)

MODEL = "model.pt"
TARGETS = "targets.npz"  # LabNet: B^l (int8 +-1) and F^l over the training items
CODES = "codes.npy"  # ImgNet: packed codes of every prepared item (see dseh.codes)
TRAIN_OUTPUTS = "train_outputs.npz"  # ImgNet: sign(u) and f^v over the training items
HISTORY_CSV = "history.csv"
HISTORY_JSON = "history.json"
SUMMARY = "summary.json"
CONFIG = "config.yaml"

METRICS = "metrics.json"
PR_CURVE = "pr_curve.csv"
PRECISION_AT = "precision_at_n.csv"
REPORT = "report.html"
FIGURES = "figures"

# params each stage reads: dvc.yaml declares exactly these
STAGE_PARAMS = {
    "prepare": ["seed", "data"],
    "train_labnet": ["seed", "bits", "method", "labnet", "train"],
    "train_imgnet": ["seed", "bits", "method", "imgnet", "train", "baseline"],
    "evaluate": ["evaluate"],
    "promote": ["tracking", "promote"],
    "sweep": ["seed", "method", "labnet", "train", "imgnet", "baseline", "evaluate"],
    "map_table": ["sweep"],
    "compare": ["seed", "labnet", "imgnet", "train", "baseline", "evaluate", "compare"],  # comparison/dvc.yaml
}


@dataclass(frozen=True)
class Layout:
    """Default locations of every step's output under one root (what dvc.yaml uses)."""

    root: Path = Path("outputs")

    @property
    def data(self) -> Path:
        return self.root / "data"

    def labnet(self, r: int) -> Path:
        return self.root / "labnet" / f"round{r}"

    def imgnet(self, r: int) -> Path:
        return self.root / "imgnet" / f"round{r}"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def promote(self) -> Path:
        return self.root / "promote"

    def sweep(self, bits: int) -> Path:
        return self.root / "sweep" / str(bits)

    @property
    def table(self) -> Path:
        return self.root / "table"


def code_version() -> str:
    """The git commit of the code when it runs from a checkout, else the package version."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        if rev.returncode == 0:
            return rev.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return f"dseh {__version__}"


def _fingerprint(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _file_sha(path: Path) -> str:
    from dseh.data import sha256_file

    return sha256_file(path) if path.is_file() else ""


def phase_seed(seed: int, name: str, round_index: int) -> int:
    return int(hashlib.sha256(f"{seed}/{name}/{round_index}".encode()).hexdigest()[:8], 16)


def _checkpoint_path(out_dir: Path) -> Path:
    # beside the output, not inside it: DVC removes a stage's outputs before it runs again
    return out_dir.parent / f".{out_dir.name}.ckpt.pt"


def _write_history(out: Path, history: list[dict]) -> None:
    (out / HISTORY_JSON).write_text(json.dumps(history, indent=1))
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    with open(out / HISTORY_CSV, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history)


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _load_model_file(path: Path, kind: str | tuple[str, ...]) -> dict:
    f = path / MODEL
    if not f.is_file():
        raise DsehError(f"{f} does not exist: run the step that produces {path} first")
    state = torch.load(f, map_location="cpu", weights_only=False)
    kinds = (kind,) if isinstance(kind, str) else kind
    if state.get("kind") not in kinds:
        raise DsehError(f"{f} holds a {state.get('kind')} model, expected {' or '.join(kinds)}")
    return state


def _open_data(data: str | Path | PreparedData) -> PreparedData:
    return data if isinstance(data, PreparedData) else PreparedData(data)


def _write_step_dir(out: Path, cfg: Config, summary: dict, history: list[dict] | None = None) -> None:
    """The files every training step writes beside its model (inside an atomic_dir)."""
    if history is not None:
        _write_history(out, history)
    (out / SUMMARY).write_text(json.dumps(summary, indent=2))
    dump_config(cfg, out / CONFIG)


# --------------------------------------------------------------------------- prepare


def prepare(cfg: Config, out_dir: str | Path, progress: bool = True) -> dict:
    """Build the prepared dataset directory from `cfg.data` (atomic: all or nothing)."""
    src = open_source(cfg.data, cfg.seed)
    with atomic_dir(out_dir) as tmp:
        manifest = write_prepared(src, cfg.data, cfg.seed, tmp, progress)
        dump_config(cfg, tmp / CONFIG)
    log.info("prepared %s: %s", out_dir, manifest["sizes"])
    with tracking.step_run(cfg, "prepare", manifest["dataset_sha256"]) as tr:
        if tr is not None:
            tr.log_metrics(manifest["sizes"], "data.")
            tr.log_artifacts(Path(out_dir) / MANIFEST, "data")
    return manifest


# --------------------------------------------------------------------------- LabNet


def load_labnet(path: str | Path) -> tuple[LabNet, dict]:
    state = _load_model_file(Path(path), "labnet")
    lc = state["config"]["labnet"]
    model = LabNet(state["n_classes"], state["bits"], lc["hidden"], lc["lrn"])
    model.load_state_dict(state["state_dict"])
    return model, state


def train_labnet(
    cfg: Config,
    data_dir: str | Path,
    round_index: int,
    out_dir: str | Path,
    prev_labnet: str | Path | None = None,
    prev_imgnet: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """LabNet phase of round r. Round 0 starts from random weights and N(0,1) buffers; round r > 0
    continues LabNet r-1 (weights and optimiser) with buffers from ImgNet r-1:
    H~ = sign(u), F~ = f^v over the training images."""
    if round_index >= cfg.train.rounds:
        raise DsehError(f"round {round_index} is past train.rounds={cfg.train.rounds}")
    if round_index > 0 and (prev_labnet is None or prev_imgnet is None):
        raise DsehError(
            f"round {round_index} of train_labnet needs the LabNet and ImgNet outputs of round {round_index - 1}"
        )
    if cfg.method != "dseh":
        # the other methods have no label network: the stage records that, so the DVC graph stays one shape
        summary = {"round": round_index, "method": cfg.method, "labnet": f"not used by method {cfg.method}"}
        if _secondary_rank():
            return summary
        with atomic_dir(out_dir) as tmp:
            _write_step_dir(tmp, cfg, summary)
        return summary
    data = _open_data(data_dir)
    rank = train.init_distributed(cfg.train.device)
    with tracking.step_run(cfg, "train_labnet", data.sha256, {"dseh.round": str(round_index)}) as tr:
        device = train.resolve_device(cfg.train.device)
        seed = phase_seed(cfg.seed, "labnet", round_index)
        train.set_determinism(seed, cfg.train.threads)
        labels = torch.from_numpy(data.labels[data.train]).to(device)
        n, bits = len(labels), cfg.bits
        model = train.build_labnet(data.n_classes, bits, cfg.labnet).to(device)
        optimizer = train.make_optimizer([{"params": list(model.parameters()), "lr": 1e-3}], cfg.train)
        inputs = [data.sha256]
        if round_index == 0:
            g = torch.Generator().manual_seed(seed)
            F_buf = torch.randn(n, 512, generator=g).to(device)
            H_buf = torch.randn(n, bits, generator=g).to(device)
        else:
            prev = _load_model_file(Path(prev_labnet), "labnet")
            _check_compatible(prev, cfg, data, prev_labnet)
            model.load_state_dict(prev["state_dict"])
            optimizer.load_state_dict(prev["optimizer"])
            with np.load(Path(prev_imgnet) / TRAIN_OUTPUTS) as z:
                F_buf = torch.from_numpy(z["F"]).float().to(device)
                H_buf = torch.from_numpy(z["B"]).float().to(device)
            if F_buf.shape != (n, 512) or H_buf.shape != (n, bits):
                raise DsehError(f"{prev_imgnet}: ImgNet outputs do not match {n} training items at {bits} bits")
            inputs += [_file_sha(Path(prev_labnet) / MODEL), _file_sha(Path(prev_imgnet) / TRAIN_OUTPUTS)]
        epochs = epochs_for_round(cfg.labnet.epochs, round_index)
        phase = train.labnet_phase(
            model, optimizer, labels, F_buf, H_buf, cfg.labnet, cfg.train, round_index, epochs, seed
        )
        out = Path(out_dir)
        fp = _labnet_fingerprint(cfg, round_index, inputs)
        ckpt = _checkpoint_path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        history = train.run_phase(phase, cfg.train, ckpt, fp, progress)
        if not rank.main:  # rank 0 writes the step output
            return {"round": round_index, "rank": rank.rank, "epochs": epochs}
        F_lab, H_lab = train.encode_labels(model, labels)
        B_lab = sign(H_lab.cpu().numpy())
        summary = {
            "round": round_index,
            "epochs": epochs,
            "distinct_codes": count_distinct(pack(B_lab)),
            "distinct_label_sets": int(len(np.unique(data.labels[data.train], axis=0))),
            "seconds": round(time.perf_counter() - t0, 3),
            "final": {k: v for k, v in (history[-1] if history else {}).items() if k not in ("round", "epoch")},
        }
        with atomic_dir(out) as tmp:
            torch.save(
                {
                    "kind": "labnet",
                    "state_dict": model.cpu().state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "config": to_dict(cfg),
                    "code_version": code_version(),
                    "n_classes": data.n_classes,
                    "bits": bits,
                    "round": round_index,
                    "dataset_sha256": data.sha256,
                },
                tmp / MODEL,
            )
            np.savez(tmp / TARGETS, B=B_lab, F=F_lab.cpu().numpy().astype(np.float32), train=data.train)
            _write_step_dir(tmp, cfg, summary, history)
        ckpt.unlink(missing_ok=True)
        log.info(
            "LabNet round %d: %d distinct codes for %d label sets",
            round_index,
            summary["distinct_codes"],
            summary["distinct_label_sets"],
        )
        if tr is not None:
            tr.log_history(history)
            tr.log_metrics(summary)
            tr.log_artifacts(out, "labnet")
    return summary


def _labnet_fingerprint(cfg: Config, round_index: int, inputs: list[str]) -> str:
    """What a LabNet phase's result depends on: its params, the training params, seed, bits and
    its inputs' hashes (the resume checkpoint and the comparison's shared LabNets are keyed by it)."""
    return _fingerprint(
        "train_labnet", round_index, to_dict(cfg.labnet), to_dict(cfg.train), cfg.seed, cfg.bits, inputs
    )


def _secondary_rank() -> bool:
    """Started by torchrun as a rank other than 0 (which alone writes a step's output)."""
    return int(os.environ.get("RANK", "0")) > 0


def _check_compatible(state: dict, cfg: Config, data: PreparedData, where) -> None:
    if state["bits"] != cfg.bits:
        raise DsehError(f"{where} was trained with {state['bits']} bits, params say bits={cfg.bits}")
    if state.get("dataset_sha256") != data.sha256:
        raise DsehError(f"{where} was trained on another prepared dataset than {data.root}")


# --------------------------------------------------------------------------- ImgNet


def build_imgnet(cfg: Config, image_size: int) -> ImgNet:
    """ImgNet for cfg; pretrained weights from a local path or an s3:// URI (downloaded first)."""
    with (
        local_copy(cfg.imgnet.weights, cfg.data.s3_timeout_s, cfg.data.s3_retries)
        if cfg.imgnet.weights
        else nullcontext("") as w
    ):
        backbone = create_backbone(cfg.imgnet.backbone, w, image_size, cfg.imgnet.dropout)
    return ImgNet(backbone, cfg.bits, cfg.imgnet.hash_from)


def load_imgnet(path: str | Path, weights: str | None = None) -> tuple[ImgNet, dict]:
    """An ImgNet step output as a model in eval mode. CNN-F needs its .mat (the recorded
    imgnet.weights, local or s3://, or `weights`) to rebuild the layer shapes."""
    import dataclasses

    state = _load_model_file(Path(path), "imgnet")
    cfg = from_dict(state["config"])
    if weights is not None:
        cfg = dataclasses.replace(cfg, imgnet=dataclasses.replace(cfg.imgnet, weights=weights))
    model = build_imgnet(cfg, int(state["image_size"]))
    model.load_state_dict(state["state_dict"])
    model.eval()
    return model, state


def train_imgnet(
    cfg: Config,
    data_dir: str | Path | PreparedData,
    round_index: int,
    labnet_dir: str | Path | None,
    out_dir: str | Path,
    prev_imgnet: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """ImgNet phase of round r. With method dseh it is supervised by LabNet round r's fixed targets
    (B^l, F^l); dpsh and hashnet train the same network in the same loop with their own loss
    (round r > 0 continues round r - 1); itq and lsh fit a linear hash on the image features.

    Writes the model, the packed codes of every item, sign(u) and f^v over the training items
    (the next LabNet round's buffers) and the history."""
    if round_index >= cfg.train.rounds:
        raise DsehError(f"round {round_index} is past train.rounds={cfg.train.rounds}")
    if round_index > 0 and prev_imgnet is None:
        raise DsehError(f"round {round_index} of train_imgnet needs the ImgNet output of round {round_index - 1}")
    data = _open_data(data_dir)
    if cfg.method in SHALLOW_METHODS:
        if _secondary_rank():  # a linear hash is fitted once, by rank 0 under torchrun
            return {"round": round_index, "method": cfg.method, "rank": int(os.environ["RANK"])}
        return fit_linear_hash(cfg, data, round_index, out_dir)
    rank = train.init_distributed(cfg.train.device)
    with tracking.step_run(cfg, "train_imgnet", data.sha256, {"dseh.round": str(round_index)}) as tr:
        device = train.resolve_device(cfg.train.device)
        precision = train.precision(device, cfg.train.amp)  # bf16 or fp32: in the fingerprint and summary
        seed = phase_seed(cfg.seed, "imgnet", round_index)
        train.set_determinism(seed, cfg.train.threads)
        image_size = int(data.images.shape[1])
        model = train.place_model(build_imgnet(cfg, image_size), device, cfg.train)
        epochs = epochs_for_round(cfg.imgnet.epochs, round_index)
        base = train.lr_for_epoch(cfg.imgnet.lr_exp, cfg.train.step_exp, cfg.train.step_epochs, 0, round_index)
        groups, mults = train.imgnet_param_groups(model, base, cfg.imgnet.backbone_lr_mult)
        optimizer = train.make_optimizer(groups, cfg.train)
        labels = torch.from_numpy(data.labels[data.train]).to(device)
        inputs = [data.sha256]
        buffers: dict[str, torch.Tensor] = {}
        if round_index > 0:
            prev = _load_model_file(Path(prev_imgnet), "imgnet")
            _check_compatible(prev, cfg, data, prev_imgnet)
            model.load_state_dict(prev["state_dict"])
            optimizer.load_state_dict(prev["optimizer"])
            inputs.append(_file_sha(Path(prev_imgnet) / MODEL))
        if cfg.method == "dseh":
            if labnet_dir is None:
                raise DsehError("method dseh needs the LabNet output of the same round")
            lab_state = _load_model_file(Path(labnet_dir), "labnet")
            _check_compatible(lab_state, cfg, data, labnet_dir)
            with np.load(Path(labnet_dir) / TARGETS) as z:
                B_lab = torch.from_numpy(z["B"]).float().to(device)
                F_lab = torch.from_numpy(z["F"]).float().to(device)
            inputs.append(_file_sha(Path(labnet_dir) / TARGETS))
            objective = train.dseh_objective(labels, B_lab, F_lab, cfg.imgnet)
        elif cfg.method == "dpsh":
            # U holds every training item's latest u: zeros at first, the previous round's sign(u) after
            U = torch.zeros(len(labels), cfg.bits)
            if round_index > 0:
                with np.load(Path(prev_imgnet) / TRAIN_OUTPUTS) as z:
                    U = torch.from_numpy(z["B"]).float()
            buffers = {"U": U.to(device)}
            objective = train.dpsh_objective(labels, buffers["U"], cfg.baseline.dpsh_eta)
        else:
            objective = train.hashnet_objective(labels, cfg.bits, cfg.baseline)
        per_epoch = -(-len(data.train) // cfg.imgnet.batch_size)
        step_offset = per_epoch * sum(epochs_for_round(cfg.imgnet.epochs, r) for r in range(round_index))
        phase = train.imgnet_phase(
            model,
            optimizer,
            mults,
            data.images,
            data.train,
            objective,
            cfg.imgnet,
            cfg.train,
            round_index,
            epochs,
            seed,
            device,
            step_offset,
            buffers,
        )
        out = Path(out_dir)
        out.parent.mkdir(parents=True, exist_ok=True)
        fp = _fingerprint(
            "train_imgnet",
            round_index,
            cfg.method,
            to_dict(cfg.imgnet),
            to_dict(cfg.train),
            to_dict(cfg.baseline) if cfg.method != "dseh" else None,
            cfg.seed,
            cfg.bits,
            inputs,
            precision,
        )
        ckpt = _checkpoint_path(out)
        t0 = time.perf_counter()
        history = train.run_phase(phase, cfg.train, ckpt, fp, progress)
        if not rank.main:  # rank 0 encodes and writes the step output
            return {"round": round_index, "rank": rank.rank, "epochs": epochs}
        all_items = np.arange(len(data.labels))
        f_all, u_all = train.encode_images(
            model, data.images, all_items, cfg.imgnet.encode_batch_size, device, progress=progress
        )
        train.finite_or_raise("ImgNet outputs", u_all)
        codes = pack(u_all)
        summary = {
            "round": round_index,
            "method": cfg.method,
            "epochs": epochs,
            "precision": precision,
            "seconds": round(time.perf_counter() - t0, 3),
            "distinct_codes_database": count_distinct(codes[data.database]),
            "final": {k: v for k, v in (history[-1] if history else {}).items() if k not in ("round", "epoch")},
        }
        with atomic_dir(out) as tmp:
            torch.save(
                {
                    "kind": "imgnet",
                    "method": cfg.method,
                    "state_dict": model.cpu().state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "config": to_dict(cfg),
                    "code_version": code_version(),
                    "n_classes": data.n_classes,
                    "bits": cfg.bits,
                    "image_size": image_size,
                    "round": round_index,
                    "dataset_sha256": data.sha256,
                },
                tmp / MODEL,
            )
            np.save(tmp / CODES, codes)
            np.savez(tmp / TRAIN_OUTPUTS, B=sign(u_all[data.train]), F=f_all[data.train].astype(np.float32))
            _write_step_dir(tmp, cfg, summary, history)
        ckpt.unlink(missing_ok=True)
        if tr is not None:
            tr.log_history(history)
            tr.log_metrics(summary)
            tr.log_artifacts(out, "imgnet")
    return summary


SHALLOW_METHODS = ("itq", "lsh")


def image_features(data: PreparedData, backbone: torch.nn.Module | None, batch: int) -> np.ndarray:
    """float64 features of every prepared item: a backbone's output, or the raw pixels (refused
    when they would not fit in memory)."""
    items = np.arange(len(data.labels))
    if backbone is None:
        size = data.images.size * 8
        if size > 4 * 2**30:
            raise DsehError(
                f"raw-pixel features of {data.root} would take {size / 2**30:.0f} GiB; "
                "use pretrained backbone features (imgnet.weights, baseline.features=backbone)"
            )
        return np.asarray(data.images, dtype=np.float64).reshape(len(items), -1)
    backbone.eval()
    feats = []
    with torch.no_grad():
        for s in range(0, len(items), batch):
            x = train.gather_images(data.images, items[s : s + batch])
            feats.append(backbone(backbone.preprocess(x)).float().numpy())
    return np.concatenate(feats).astype(np.float64)


def _linear_codes(method: str, x_all: np.ndarray, fit_items: np.ndarray, bits: int, seed: int) -> tuple:
    """Fit LSH or ITQ on the rows `fit_items` of `x_all`; (packed codes of every row, projection, mean)."""
    from dseh import baselines

    if method == "lsh":
        proj, mean = baselines.lsh(x_all[fit_items], bits, seed)
    else:
        proj, mean, _ = baselines.itq(x_all[fit_items], bits, seed)
    return pack(baselines.project(x_all, proj, mean)), proj, mean


def fit_linear_hash(cfg: Config, data: PreparedData, round_index: int, out_dir: str | Path) -> dict:
    """method itq | lsh: fit on the training items' features (baseline.features: the pretrained
    backbone's output, or raw pixels), encode every item, write the step output like ImgNet's."""
    use_backbone = cfg.baseline.features == "backbone" or (cfg.baseline.features == "auto" and bool(cfg.imgnet.weights))
    t0 = time.perf_counter()
    backbone = build_imgnet(cfg, int(data.images.shape[1])).backbone if use_backbone else None
    x_all = image_features(data, backbone, cfg.imgnet.encode_batch_size)
    codes, proj, mean = _linear_codes(cfg.method, x_all, data.train, cfg.bits, cfg.seed)
    features = f"{cfg.imgnet.backbone}-backbone" if use_backbone else "pixels"
    summary = {
        "round": round_index,
        "method": cfg.method,
        "features": features,
        "seconds": round(time.perf_counter() - t0, 3),
        "distinct_codes_database": count_distinct(codes[data.database]),
    }
    with atomic_dir(out_dir) as tmp:
        torch.save(
            {
                "kind": "linear-hash",
                "method": cfg.method,
                "projection": proj,
                "mean": mean,
                "features": features,
                "config": to_dict(cfg),
                "code_version": code_version(),
                "bits": cfg.bits,
                "round": round_index,
                "dataset_sha256": data.sha256,
            },
            tmp / MODEL,
        )
        np.save(tmp / CODES, codes)
        np.savez(tmp / TRAIN_OUTPUTS, B=unpack(codes[data.train], cfg.bits))
        _write_step_dir(tmp, cfg, summary)
    log.info("%s on %s: %d distinct database codes", cfg.method, features, summary["distinct_codes_database"])
    return summary


# --------------------------------------------------------------------------- evaluate


def _query_database_report(ev: EvaluateConfig, data: PreparedData, q_codes, db_codes, bits: int, precision_at=None):
    """The retrieval report of packed query codes against packed database codes, with the split's labels."""
    from dseh import evaluation

    return evaluation.retrieval_report(
        q_codes,
        db_codes,
        data.labels[data.query],
        data.labels[data.database],
        bits,
        ev.topk,
        precision_at or ev.precision_at,
        ev.query_chunk,
    )


def database_collapse(cfg: Config, data: PreparedData, codes: np.ndarray, bits: int) -> dict:
    """dseh.codes.collapse of the packed codes' database rows, with baseline.collapse_min_distinct
    capped at the database's number of distinct label sets."""
    label_sets = int(len(np.unique(data.labels[data.database], axis=0)))
    return collapse(codes[data.database], bits, cfg.baseline.collapse_min_distinct, label_sets)


def evaluate(
    cfg: Config,
    data_dir: str | Path,
    labnet_dir: str | Path,
    imgnet_dir: str | Path,
    out_dir: str | Path,
    progress: bool = True,
    encode: bool = False,
) -> dict:
    """Retrieval metrics (query -> database) of the saved ImgNet codes (or, with `encode`, codes
    computed anew by the saved model), LabNet's label retrieval, DVC plot data, figures and the
    self-contained HTML report."""
    from dseh import report

    data = _open_data(data_dir)
    with tracking.step_run(cfg, "evaluate", data.sha256) as tr:
        img_state = _load_model_file(Path(imgnet_dir), ("imgnet", "linear-hash"))
        expected_round = cfg.train.rounds - 1
        if img_state["round"] != expected_round:
            raise DsehError(
                f"{imgnet_dir} is round {img_state['round']} but train.rounds={cfg.train.rounds}: the pipeline "
                "has stages for another number of rounds; regenerate dvc.yaml with `dseh dvc-yaml`"
            )
        if img_state.get("dataset_sha256") != data.sha256:
            raise DsehError(f"{imgnet_dir} was trained on another prepared dataset than {data_dir}")
        bits = img_state["bits"]
        if encode and img_state["kind"] != "imgnet":
            raise DsehError(f"{imgnet_dir} holds {img_state['method']} codes, not an image network: --encode needs one")
        if encode:
            model, _ = load_imgnet(imgnet_dir)
            device = train.resolve_device(cfg.train.device)
            _, u = train.encode_images(
                model.to(device),
                data.images,
                np.arange(len(data.labels)),
                cfg.imgnet.encode_batch_size,
                device,
                progress=progress,
            )
            codes = pack(u)
        else:
            codes = np.load(Path(imgnet_dir) / CODES)
        if codes.shape != (len(data.labels), (bits + 7) // 8):
            raise DsehError(
                f"{imgnet_dir}/{CODES} has shape {codes.shape}, expected ({len(data.labels)}, {(bits + 7) // 8})"
            )
        ev = cfg.evaluate
        rep = _query_database_report(ev, data, codes[data.query], codes[data.database], bits)
        with np.load(Path(imgnet_dir) / TRAIN_OUTPUTS) as z:
            img_feats = z["F"] if "F" in z else None
        n_max = max(rep.precision_at)
        metrics = {
            "bits": bits,
            "protocol_topk": rep.topk,
            "map_all": rep.map_all,
            f"map_at_{rep.topk}": rep.map_topk,
            "map_tie_aware": rep.map_tie_aware,
            f"precision_radius_{ev.radius}": rep.precision_within(ev.radius),
            f"precision_at_{n_max}": rep.precision_at[n_max],
            f"recall_at_{n_max}": rep.recall_at[n_max],
            "queries": int(len(data.query)),
            "database": int(len(data.database)),
            "queries_without_relevant": rep.queries_without_relevant,
        }
        state = database_collapse(cfg, data, codes, bits)
        metrics.update(
            distinct_codes_database=state["distinct_codes"],
            constant_bits_database=state["constant_bits"],
            collapsed=state["collapsed"],
        )
        lab_feats = None
        if img_state.get("method", "dseh") == "dseh":
            labnet, _ = load_labnet(labnet_dir)
            _, h_q = train.encode_labels(labnet, torch.from_numpy(data.labels[data.query]))
            _, h_db = train.encode_labels(labnet, torch.from_numpy(data.labels[data.database]))
            lab_rep = _query_database_report(ev, data, pack(h_q.numpy()), pack(h_db.numpy()), bits, (ev.topk,))
            with np.load(Path(labnet_dir) / TARGETS) as z:
                lab_codes, lab_feats = z["B"], z["F"]
            metrics["labnet"] = {
                "label_map_all": lab_rep.map_all,
                f"label_map_at_{rep.topk}": lab_rep.map_topk,
                "distinct_codes_train": count_distinct(pack(lab_codes)),
                "distinct_label_sets_train": int(len(np.unique(data.labels[data.train], axis=0))),
            }
        if state["collapsed"] or state["constant_bits"]:
            log.warning(
                "%s: %d distinct database codes, %d of %d bits constant",
                "codes collapsed" if state["collapsed"] else "some bits carry nothing",
                state["distinct_codes"],
                state["constant_bits"],
                bits,
            )
        with atomic_dir(out_dir) as tmp:
            (tmp / METRICS).write_text(json.dumps(metrics, indent=2))
            _write_csv(
                tmp / PR_CURVE,
                ["radius", "precision", "recall"],
                [[r, f"{p:.6f}", f"{q:.6f}"] for r, (p, q) in enumerate(zip(rep.pr_precision, rep.pr_recall))],
            )
            _write_csv(
                tmp / PRECISION_AT,
                ["n", "precision", "recall"],
                [[n, f"{rep.precision_at[n]:.6f}", f"{rep.recall_at[n]:.6f}"] for n in rep.precision_at],
            )
            rng = np.random.default_rng(cfg.seed)
            n_train = len(data.train)
            sample = rng.choice(n_train, size=min(ev.heatmap_items, n_train), replace=False)
            # rows grouped by label set, so items that share labels sit together as in the paper's figure
            train_labels = data.labels[data.train][sample]
            sample = sample[np.lexsort(train_labels.T[::-1])]
            figs = report.make_figures(
                rep,
                None if lab_feats is None else lab_feats[sample],
                None if img_feats is None else img_feats[sample],
                tmp / FIGURES,
            )
            report.write_html(tmp / REPORT, metrics, rep.precision_at, rep.recall_at, figs, to_dict(cfg))
            dump_config(cfg, tmp / CONFIG)
        log.info(
            "%s: mAP@ALL %.4f, mAP@%d %.4f%s",
            img_state.get("method", "dseh"),
            rep.map_all,
            rep.topk,
            rep.map_topk,
            f", LabNet label mAP@ALL {metrics['labnet']['label_map_all']:.4f}" if "labnet" in metrics else "",
        )
        if tr is not None:
            tr.log_metrics(metrics)
            tr.log_artifacts(out_dir, "eval")
    return metrics


# --------------------------------------------------------------------------- promote


def promote(
    cfg: Config,
    data_dir: str | Path,
    imgnet_dir: str | Path,
    eval_dir: str | Path,
    out_dir: str | Path | None,
    dry_run: bool = False,
) -> dict:
    """Register the evaluated ImgNet model as a new version of tracking.registered_model, alias it
    `challenger`, and move `champion` to it only if its metric (same metric, protocol and dataset)
    beats the champion's by at least promote.min_delta, or if there is no champion; never when
    evaluate found its codes collapsed. Every decision is recorded as version tags. With dry_run
    nothing is written anywhere."""
    data = PreparedData(data_dir)
    metrics_file = Path(eval_dir) / METRICS
    if not metrics_file.is_file():
        raise DsehError(f"{metrics_file} does not exist: run `dseh evaluate` first")
    metrics = json.loads(metrics_file.read_text())
    name = cfg.promote.metric
    value = metrics.get(name)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        numeric = [k for k, v in metrics.items() if isinstance(v, (int, float))]
        raise DsehError(
            f"params key 'promote.metric': '{name}' is not a metric of {metrics_file}; choose one of {', '.join(numeric)}"
        )
    img_state = _load_model_file(Path(imgnet_dir), ("imgnet", "linear-hash"))
    if img_state["kind"] != "imgnet":
        raise DsehError(
            f"{imgnet_dir} holds {img_state['method']} codes, not an image network: only dseh, dpsh and hashnet "
            "models can be registered"
        )
    if img_state.get("dataset_sha256") != data.sha256:
        raise DsehError(f"{imgnet_dir} was trained on another prepared dataset than {data_dir}")
    tags = {
        "dseh.metric": name,
        "dseh.metric_value": repr(float(value)),
        "dseh.protocol": f"top{metrics['protocol_topk']}/{metrics['bits']}bits/{len(data.query)}q/{len(data.database)}db",
        "dseh.dataset_sha256": data.sha256,
        "dseh.code_version": str(img_state.get("code_version")),
        "dseh.method": str(img_state.get("method", "dseh")),
    }
    collapsed = (
        f"{metrics['distinct_codes_database']} distinct database codes, {metrics['constant_bits_database']} of "
        f"{metrics['bits']} bits constant"
        if metrics.get("collapsed")
        else None
    )
    reg = cfg.tracking.registered_model
    decision: dict = {"registered_model": reg, "metric": name, "value": float(value)}
    if not cfg.tracking.enabled:
        decision.update(decision="skipped", reason="tracking.enabled is false")
    elif dry_run:
        import mlflow

        tracking.check_server(tracking.tracking_uri(), cfg.tracking.timeout_s)
        champ = tracking.current_champion(mlflow.MlflowClient(tracking.tracking_uri()), reg)
        ok, reason = tracking.decide(float(value), tags, champ, cfg.promote.min_delta, collapsed)
        decision.update(
            decision="would promote" if ok else ("would keep the champion" if champ else "would not promote"),
            reason=reason,
            champion_version=getattr(champ, "version", None),
            dry_run=True,
        )
    else:
        with tracking.step_run(cfg, "promote", data.sha256) as tr:
            if tr is None:
                decision.update(decision="skipped", reason="tracking server unreachable and tracking.required is false")
            else:
                decision.update(_register_and_promote(cfg, data, imgnet_dir, img_state, float(value), tags, collapsed))
                tr.log_metrics({"candidate_" + name: float(value)})
    if out_dir is not None and not dry_run:
        with atomic_dir(out_dir) as tmp:
            (tmp / "decision.json").write_text(json.dumps(decision, indent=2))
            dump_config(cfg, tmp / CONFIG)
    log.info("promote: %s (%s)", decision["decision"], decision.get("reason"))
    return decision


def _register_and_promote(
    cfg: Config, data: PreparedData, imgnet_dir, img_state: dict, value: float, tags: dict, collapsed: str | None
) -> dict:
    import mlflow

    client = mlflow.MlflowClient()
    reg = cfg.tracking.registered_model
    model, _ = load_imgnet(imgnet_dir)
    example = np.asarray(data.images[np.sort(data.query[:2])])
    info = tracking.log_imgnet_model(
        model, int(img_state["image_size"]), int(img_state["bits"]), cfg.imgnet.encode_batch_size, example
    )
    version = mlflow.register_model(info.model_uri, reg, tags=tags).version
    client.set_registered_model_alias(reg, tracking.CHALLENGER, version)
    champ = tracking.current_champion(client, reg)
    ok, reason = tracking.decide(value, tags, champ, cfg.promote.min_delta, collapsed)
    champ_metric = tracking._version_metric(champ) if champ is not None else None
    verdict = "promoted" if ok else ("kept the champion" if champ is not None else "not promoted")
    client.set_model_version_tag(reg, version, "dseh.decision", verdict)
    client.set_model_version_tag(reg, version, "dseh.reason", reason)
    client.set_model_version_tag(reg, version, "dseh.champion_metric", repr(champ_metric))
    if ok:
        client.set_model_version_tag(reg, version, "dseh.promoted", "true")
        client.set_registered_model_alias(reg, tracking.CHAMPION, version)
    tracking.settle_champion(client, reg)
    final = tracking.current_champion(client, reg)
    return {
        "decision": verdict,
        "reason": reason,
        "version": version,
        "previous_champion_metric": champ_metric,
        "champion_version": getattr(final, "version", None),
        "model_uri": f"models:/{reg}@{tracking.CHAMPION}",
    }


# --------------------------------------------------------------------------- a training step on several GPUs


def run_training_step(
    step: str,
    config_text: str,
    round_index: int,
    gpus: int,
    data_dir: str | Path,
    out_dir: str | Path,
    labnet: str | Path | None = None,
    prev_labnet: str | Path | None = None,
    prev_imgnet: str | Path | None = None,
) -> dict:
    """A training step (train-labnet or train-imgnet) from resolved params text, as a Kubeflow
    component runs it: in this process for one GPU, else data-parallel under torchrun with one
    process per GPU (rank 0 writes the output). Returns the step's summary."""
    import tempfile

    from dseh import kube
    from dseh.config import from_yaml_text

    cfg = from_yaml_text(config_text)
    if gpus <= 1:
        if step == "train-labnet":
            return train_labnet(cfg, data_dir, round_index, out_dir, prev_labnet, prev_imgnet, progress=False)
        return train_imgnet(cfg, data_dir, round_index, labnet, out_dir, prev_imgnet, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        params = Path(tmp) / "params.yaml"
        params.write_text(config_text)
        args = [step, "--params", str(params), "--round", str(round_index), "--data", str(data_dir), "-q"]
        for flag, path in (("--labnet", labnet), ("--prev-labnet", prev_labnet), ("--prev-imgnet", prev_imgnet)):
            if path:
                args += [flag, str(path)]
        kube.run_local([*args, "--out", str(out_dir)], gpus, cwd=tmp)
    return json.loads((Path(out_dir) / SUMMARY).read_text())


# --------------------------------------------------------------------------- code-length sweep


def sweep_bits(cfg: Config, data_dir: str | Path, bits: int, out_root: str | Path, progress: bool = True) -> dict:
    """Train every round and evaluate at one code length (a column of the paper's Table 1)."""
    import dataclasses

    c = dataclasses.replace(cfg, bits=bits)
    lay = Layout(Path(out_root))
    train_rounds(c, data_dir, lay, progress)
    last = c.train.rounds - 1
    return evaluate(c, data_dir, lay.labnet(last), lay.imgnet(last), lay.eval, progress)


def train_rounds(
    cfg: Config,
    data: str | Path | PreparedData,
    lay: Layout,
    progress: bool = True,
    labnet_cache: Path | None = None,
) -> dict:
    """Every round's LabNet and ImgNet phases under `lay`, each continuing the round before;
    returns the last LabNet summary.

    With `labnet_cache`, round 0's LabNet is shared between runs whose LabNet inputs are the same
    (its params, the training params, seed, bits and data split: what its step fingerprint holds),
    such as runs that differ only in ImgNet's params; a shared one's summary says `reused`."""
    data = _open_data(data)
    summary: dict = {}
    for r in range(cfg.train.rounds):
        prev_l, prev_i = (lay.labnet(r - 1), lay.imgnet(r - 1)) if r else (None, None)
        cached = None
        if r == 0 and labnet_cache is not None and cfg.method == "dseh":
            cached = Path(labnet_cache) / _labnet_fingerprint(cfg, 0, [data.sha256])[:24]
        if cached is not None and (cached / SUMMARY).is_file():
            copy_dir(cached, lay.labnet(0))
            summary = {**json.loads((cached / SUMMARY).read_text()), "reused": True}
        else:
            summary = train_labnet(cfg, data, r, lay.labnet(r), prev_l, prev_i, progress)
            if cached is not None:
                copy_dir(lay.labnet(0), cached)
        train_imgnet(cfg, data, r, lay.labnet(r), lay.imgnet(r), prev_i, progress)
    return summary


def map_table(cfg: Config, sweep_root: str | Path, out_dir: str | Path) -> list[dict]:
    """Collect the sweep's metrics into map_table.csv and map_table.md (mAP by code length)."""
    rows = []
    for bits in cfg.sweep.bits:
        f = Path(sweep_root) / str(bits) / "eval" / METRICS
        if not f.is_file():
            raise DsehError(f"{f} does not exist: run the sweep stage for {bits} bits first")
        m = json.loads(f.read_text())
        k = m["protocol_topk"]
        rows.append(
            {
                "bits": bits,
                "map_all": m["map_all"],
                f"map_at_{k}": m[f"map_at_{k}"],
                "map_tie_aware": m["map_tie_aware"],
                "labnet_distinct_codes": m["labnet"]["distinct_codes_train"],
                "distinct_label_sets": m["labnet"]["distinct_label_sets_train"],
            }
        )
    keys = list(rows[0])
    with atomic_dir(out_dir) as tmp:
        _write_csv(tmp / "map_table.csv", keys, [[r[k] for k in keys] for r in rows])
        lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += [
            "| " + " | ".join(f"{r[k]:.4f}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |"
            for r in rows
        ]
        (tmp / "map_table.md").write_text("\n".join(lines) + "\n")
        dump_config(cfg, tmp / CONFIG)
    return rows


# --------------------------------------------------------------------------- shallow baselines


def shallow_baseline(
    cfg: Config,
    data_dir: str | Path,
    method: str,
    bits: int,
    out_dir: str | Path,
    features_from: str | Path | None = None,
) -> dict:
    """LSH or ITQ (dseh.baselines) fitted on the training items' features, evaluated with the same
    evaluator and split as DSEH. Features: raw pixels, or a trained ImgNet's backbone output
    (`features_from` = an ImgNet step output) for the same-backbone comparison."""
    if method not in SHALLOW_METHODS:
        raise DsehError(f"unknown baseline '{method}'; choose lsh or itq")
    data = PreparedData(data_dir)
    backbone = load_imgnet(features_from)[0].backbone if features_from else None
    x_all = image_features(data, backbone, cfg.imgnet.encode_batch_size)
    codes, _, _ = _linear_codes(method, x_all, data.train, bits, cfg.seed)
    ev = cfg.evaluate
    rep = _query_database_report(ev, data, codes[data.query], codes[data.database], bits)
    state = database_collapse(cfg, data, codes, bits)
    metrics = {
        "method": method,
        "features": "imgnet-backbone" if features_from else "pixels",
        "bits": bits,
        "map_all": rep.map_all,
        f"map_at_{rep.topk}": rep.map_topk,
        "map_tie_aware": rep.map_tie_aware,
        **state,
    }
    with atomic_dir(out_dir) as tmp:
        (tmp / METRICS).write_text(json.dumps(metrics, indent=2))
        np.save(tmp / CODES, codes)
        dump_config(cfg, tmp / CONFIG)
    return metrics
