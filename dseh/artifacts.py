"""What the steps write and read: the output layout and file names, the one step-model file format
(LabNet, ImgNet and linear-hash models alike), fingerprints and the code version, and the
CSV / Markdown / history writers. Steps never spell a file format themselves.
"""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dseh import __version__
from dseh.config import Config, dump_config, from_dict, to_dict
from dseh.errors import DsehError

MODEL = "model.pt"
TARGETS = "targets.npz"  # LabNet: B^l (int8 +-1) and F^l over the training items
CODES = "codes.npy"  # ImgNet and linear hashes: packed codes of every prepared item (see dseh.codes)
TRAIN_OUTPUTS = "train_outputs.npz"  # sign(u) and f^v over the training items (the next LabNet round's buffers)
HISTORY_CSV = "history.csv"
HISTORY_JSON = "history.json"
SUMMARY = "summary.json"
CONFIG = "config.yaml"

METRICS = "metrics.json"
PR_CURVE = "pr_curve.csv"
PRECISION_AT = "precision_at_n.csv"
REPORT = "report.html"
FIGURES = "figures"
DECISION = "decision.json"
MAP_TABLE = "map_table"  # .csv and .md
DB_IDS = "ids.npy"  # a retrieval database: the prepared items' indices, in database order
DB_LABELS = "labels.npy"  # ... their multi-hot labels (uint8); CODES holds their packed codes
DB_META = "database.json"  # ... the class names and the code length

KINDS = ("labnet", "imgnet", "linear-hash")  # what a step model file holds


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


# --------------------------------------------------------------------------- identity


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


def fingerprint(*parts: object) -> str:
    """sha256 of the JSON of `parts`: what a result depends on (resume checkpoints, cached runs)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def file_sha(path: Path) -> str:
    """sha256 of a file's content ('' when it does not exist)."""
    from dseh.data import sha256_file

    return sha256_file(path) if path.is_file() else ""


def phase_seed(seed: int, name: str, round_index: int) -> int:
    """The seed of one network's phase in one round, derived from params' seed."""
    return int(hashlib.sha256(f"{seed}/{name}/{round_index}".encode()).hexdigest()[:8], 16)


def checkpoint_path(out_dir: Path) -> Path:
    """A step's resume checkpoint: beside its output, not inside it (DVC removes a stage's outputs
    before it runs again)."""
    return out_dir.parent / f".{out_dir.name}.ckpt.pt"


def durable_checkpoint(folder: str | Path, run_id: str, step: str, round_index: int) -> Path:
    """A step's resume checkpoint in a folder that outlives its pod (a claim's folder): one per
    pipeline run, step and round, so a retried step (a new pod with a new output path) finds it."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in run_id).strip(".") or "run"
    return Path(folder) / safe / f"{step}-round{round_index}.ckpt.pt"


# --------------------------------------------------------------------------- the step model file


@dataclass(frozen=True)
class StepModel:
    """A step's model file: what it is, the resolved config it was trained with (bits, method and
    the network's shape come from there), its tensors, and where it came from."""

    kind: str  # one of KINDS
    config: Config
    state_dict: dict[str, torch.Tensor]
    optimizer: dict | None
    round: int
    dataset_sha256: str
    code_version: str
    n_classes: int
    image_size: int = 0  # imgnet only
    features: str = ""  # linear-hash only: what it was fitted on

    @property
    def bits(self) -> int:
        return self.config.bits

    @property
    def method(self) -> str:
        return self.config.method


def save_step_model(
    out_dir: Path,
    kind: str,
    cfg: Config,
    state_dict: dict[str, torch.Tensor],
    *,
    round_index: int,
    dataset_sha256: str,
    n_classes: int,
    optimizer: dict | None = None,
    image_size: int = 0,
    features: str = "",
) -> None:
    """Write MODEL in `out_dir`: plain tensors and YAML-able values only, so it loads with
    torch.load(weights_only=True)."""
    if kind not in KINDS:
        raise ValueError(f"unknown step model kind {kind!r}")
    torch.save(
        {
            "kind": kind,
            "config": to_dict(cfg),
            "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
            "optimizer": optimizer,
            "round": round_index,
            "dataset_sha256": dataset_sha256,
            "code_version": code_version(),
            "n_classes": n_classes,
            "image_size": image_size,
            "features": features,
        },
        Path(out_dir) / MODEL,
    )


def load_step_model(path: str | Path, kinds: str | tuple[str, ...]) -> StepModel:
    """The model file of a step output folder, of one of `kinds`. Loaded with weights_only=True: a
    file that holds anything but tensors and plain values is refused, never executed."""
    f = Path(path) / MODEL
    if not f.is_file():
        if Path(path).is_file():
            raise DsehError(f"{path} is a file; give the step output folder that holds {MODEL}")
        raise DsehError(f"{f} does not exist: run the step that produces {path} first")
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for corrupt or unsafe files
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DsehError(f"{f} is not a dseh model file that can be loaded safely ({why})") from None
    kinds = (kinds,) if isinstance(kinds, str) else kinds
    if not isinstance(state, dict) or state.get("kind") not in kinds:
        held = state.get("kind") if isinstance(state, dict) else type(state).__name__
        raise DsehError(f"{f} holds a {held} model, expected {' or '.join(kinds)}")
    try:
        return StepModel(
            kind=state["kind"],
            config=from_dict(state["config"]),
            state_dict=state["state_dict"],
            optimizer=state["optimizer"],
            round=int(state["round"]),
            dataset_sha256=state["dataset_sha256"],
            code_version=state["code_version"],
            n_classes=int(state["n_classes"]),
            image_size=int(state["image_size"]),
            features=state["features"],
        )
    except KeyError as exc:
        raise DsehError(f"{f} lacks the field {exc}: written by another version of dseh? train it again") from exc


def save_codes(out: Path, codes) -> None:
    """CODES: the packed codes of every prepared item (dseh.codes), uint8 (items, packed width)."""
    import numpy as np

    np.save(Path(out) / CODES, codes)


def load_codes(model_dir: str | Path, n_items: int, bits: int):
    """The packed codes of every item that a step output holds, checked against the item count."""
    import numpy as np

    from dseh.codes import packed_width

    codes = np.load(Path(model_dir) / CODES)
    if codes.shape != (n_items, packed_width(bits)):
        raise DsehError(f"{model_dir}/{CODES} has shape {codes.shape}, expected ({n_items}, {packed_width(bits)})")
    return codes


def save_targets(out: Path, codes, features, train) -> None:
    """TARGETS: LabNet's B^l (int8 +-1) and F^l (float32) over the training items, and those items."""
    import numpy as np

    np.savez(Path(out) / TARGETS, B=codes, F=features, train=train)


def load_targets(labnet_dir: str | Path) -> tuple:
    """(B^l, F^l) of a LabNet step output."""
    import numpy as np

    with np.load(Path(labnet_dir) / TARGETS) as z:
        return z["B"], z["F"]


def save_train_outputs(out: Path, codes, features=None) -> None:
    """TRAIN_OUTPUTS: sign(u) over the training items (and f^v for a network): the next LabNet
    round's buffers, the heat maps' rows, DPSH's next-round start."""
    import numpy as np

    if features is None:
        np.savez(Path(out) / TRAIN_OUTPUTS, B=codes)
    else:
        np.savez(Path(out) / TRAIN_OUTPUTS, B=codes, F=features)


def load_train_outputs(model_dir: str | Path) -> tuple:
    """(sign(u), f^v or None) over the training items of an image-network step output."""
    import numpy as np

    with np.load(Path(model_dir) / TRAIN_OUTPUTS) as z:
        return z["B"], (z["F"] if "F" in z else None)


def save_weights(out_dir: Path, state: StepModel) -> None:
    """A step model file without its optimizer state (what a registered model bundles)."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    save_step_model(Path(out_dir), state.kind, state.config, state.state_dict, round_index=state.round,
                    dataset_sha256=state.dataset_sha256, n_classes=state.n_classes, image_size=state.image_size,
                    features=state.features)  # fmt: skip


@dataclass(frozen=True)
class Database:
    """What a retrieval model searches: packed codes in database order, the items' indices in the
    prepared data, their labels, the class names and the code length."""

    codes: Any  # uint8 (n, packed width)
    ids: Any  # int64 (n,)
    labels: Any  # uint8 (n, classes)
    classes: list[str]
    bits: int


def save_database(out_dir: Path, db: Database) -> None:
    """The .npy arrays and the JSON of a Database in `out_dir` (no pickles)."""
    import numpy as np

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    np.save(Path(out_dir) / CODES, np.ascontiguousarray(db.codes, dtype=np.uint8))
    np.save(Path(out_dir) / DB_IDS, np.asarray(db.ids, dtype=np.int64))
    np.save(Path(out_dir) / DB_LABELS, np.asarray(db.labels, dtype=np.uint8))
    write_json(Path(out_dir) / DB_META, {"classes": list(db.classes), "bits": int(db.bits)})


def load_database(folder: str | Path) -> Database:
    """The Database of save_database, read with allow_pickle=False and checked for consistent sizes."""
    import numpy as np

    f = Path(folder)
    meta = read_json(f / DB_META, "not a retrieval database folder")
    arrays = [np.load(f / name, allow_pickle=False) for name in (CODES, DB_IDS, DB_LABELS)]
    db = Database(*arrays, classes=list(meta["classes"]), bits=int(meta["bits"]))
    if not len(db.codes) == len(db.ids) == len(db.labels) or db.labels.shape[1:] != (len(db.classes),):
        raise DsehError(f"{f}: codes {db.codes.shape}, ids {db.ids.shape} and labels {db.labels.shape} disagree")
    return db


# --------------------------------------------------------------------------- writers


def write_json(path: Path, obj: Any) -> None:
    Path(path).write_text(json.dumps(obj, indent=2))


def read_json(path: Path, what: str = "") -> Any:
    p = Path(path)
    if not p.is_file():
        raise DsehError(f"{p} does not exist" + (f": {what}" if what else ""))
    return json.loads(p.read_text())


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def write_dict_rows(path: Path, rows: list[dict]) -> None:
    """CSV of dict rows; the header is the union of their keys in first-seen order; lists as JSON."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    write_csv(
        path,
        keys,
        [[json.dumps(r[k]) if isinstance(r.get(k), (list, tuple)) else r.get(k, "") for k in keys] for r in rows],
    )


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A GitHub Markdown table; floats with 4 decimals."""

    def cell(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]) + "\n"


def write_step_dir(out: Path, cfg: Config, summary: dict, history: list[dict] | None = None) -> None:
    """The files every training step writes beside its model (inside an atomic_dir): the history
    (JSON and CSV), the summary and the resolved config."""
    if history is not None:
        (out / HISTORY_JSON).write_text(json.dumps(history, indent=1))
        write_dict_rows(out / HISTORY_CSV, history)
    write_json(out / SUMMARY, summary)
    dump_config(cfg, out / CONFIG)
