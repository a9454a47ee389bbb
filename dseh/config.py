"""Typed configuration: params.yaml -> frozen dataclasses, with `key.sub=value` overrides.

Unknown keys, wrong types, non-finite numbers and out-of-range values fail loudly, naming the key;
the dataclass defaults are params.yaml's (a test holds them equal); choice lists come from the
registries (methods, backbones, data sources). The resolved config is what every stage writes
beside its outputs and into every model file. Every parameter is described in docs/algorithm.md.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dseh.data import SOURCES
from dseh.errors import DsehError
from dseh.images import MAX_PIXELS
from dseh.methods import DEEP_METHODS, METHODS, DpshConfig, HashNetConfig
from dseh.models.backbones import BACKBONES
from dseh.overrides import apply_overrides
from dseh.reads import paused
from dseh.train.recipe import INITS, OPTIMIZERS


@dataclass(frozen=True)
class DataConfig:
    """Where the images and labels come from and how `prepare` turns them into arrays."""

    source: str = "digits-mosaic"  # digits-mosaic | list-files | hdf5 | fashion-mnist | fashion-mosaic
    image_root: str = ""  # folder or s3://bucket/prefix holding the images (list-files, hdf5)
    list_dir: str = ""  # folder or s3:// prefix holding the list files (list-files)
    train_list: str = "train.txt"
    query_list: str = "test.txt"
    database_list: str = "database.txt"
    img_h5: str = ""  # Img.h5 of the DSEH release (hdf5)
    lab_h5: str = ""  # Lab.h5 of the DSEH release (hdf5)
    fashion_dir: str = "/usr/share/datasets/fashion-mnist"  # the four idx files (fashion-mnist, fashion-mosaic)
    image_size: int = 32
    n_database: int = 10000  # digits-mosaic and fashion-mosaic sizes; n_train and n_query fashion-mnist's too
    n_train: int = 5000
    n_query: int = 1000
    skip_bad_images: bool = False
    max_pixels: int = MAX_PIXELS  # larger images are refused from their header, before decoding (Pillow's limit)
    device: str = "auto"  # where list-files / hdf5 images are resized: cpu (Pillow) | cuda | cuda:N (torch) | auto
    chunk_size: int = 512
    workers: int = 4  # threads decoding images
    s3_timeout_s: float = 10.0
    s3_retries: int = 3


@dataclass(frozen=True)
class LabNetConfig:
    """LabNet (docs/algorithm.md); release values by default, paper variants as options."""

    hidden: int = 2048  # paper 4096
    lrn: bool = True  # paper: off
    batch_size: int = 32
    epochs: tuple[int, ...] = (5,)  # per round; the last value repeats
    lr_exp: float = 3.0  # lr = 10^-(lr_exp + step_exp * (floor(epoch / step_epochs) + round))
    gamma_pf: float = 1.0  # J1 semantic
    gamma_ph: float = 1.0  # J2 Hamming
    beta: float = 0.01  # J3 quantisation
    gamma_hl: float = 1.0  # J4 label
    sim_scale: float = 0.999  # s_f = s_h
    logit_scale: float = 0.5  # paper: 1.0
    quant_reduction: str = "mean"  # mean | sum (paper: beta 0.005 on a sum)
    label_head: str = "sigmoid"  # sigmoid | linear (paper: linear least squares)
    clip_value: float = 1.0  # gradients clipped by value to [-clip, clip]; 0 disables


@dataclass(frozen=True)
class ImgNetConfig:
    """ImgNet (docs/algorithm.md)."""

    backbone: str = "small"  # small | cnnf | alexnet | vgg16 | resnet50
    weights: str = ""  # local path to pretrained weights (.mat for cnnf, .pth otherwise)
    batch_size: int = 128
    epochs: tuple[int, ...] = (10,)  # per round; the last value repeats
    lr_exp: float = 3.5  # NUS-WIDE 4.0, COCO 3.5, ImageNet 4.5
    backbone_lr_mult: float = 0.1  # applied to pretrained backbone layers only
    clip_value: float = 1.0  # gradients clipped by value to [-clip, clip]; 0 disables (release: ImageNet 1, else 0)
    gamma_if: float = 1.0  # L_f semantic supervision
    eta: float = 1.0  # L_h code supervision
    sim_scale: float = 0.999  # s_i
    logit_scale: float = 0.5
    code_scale: float = 10.0  # paper: 1.0
    code_target: float = 0.999  # paper: 1.0
    hash_from: str = "pre_relu"  # pre_relu (release) | post_relu (paper)
    dropout: float = 0.5
    flip: bool = True
    shift: int = 0  # random translation by up to this many pixels (zero border); 0: none
    encode_batch_size: int = 512


@dataclass(frozen=True)
class TrainConfig:
    """What both training phases share: rounds, optimiser, schedule, device."""

    rounds: int = 1
    optimizer: str = "adam"  # adam (release) | sgd (paper) | rmsprop: DSEH's and LabNet's
    momentum: float = 0.9  # sgd only
    step_epochs: int = 10
    step_exp: float = 0.5
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # ImgNet in bf16 autocast where the device computes bf16 natively (train.device.compute_dtype)
    channels_last: bool = True
    compile: bool = False  # torch.compile the network's training step (CUDA; compile time is paid per step run)
    threads: int = 0  # torch CPU threads; 0 leaves torch's default
    loader_workers: int = 0  # threads gathering batches from the memory-mapped images; 0: train.loader_threads


@dataclass(frozen=True)
class EvaluateConfig:
    """Retrieval evaluation (docs/evaluation.md)."""

    topk: int = 1000  # the protocol's mAP@K: NUS-WIDE/COCO 5000, ImageNet 1000
    precision_at: tuple[int, ...] = (100, 200, 300, 400, 500, 600, 700, 800, 900, 1000)
    radius: int = 2  # hash-lookup precision within this Hamming radius (d <= radius)
    heatmap_items: int = 100
    example_queries: int = 5  # queries of the report's retrieval examples, spread over the label sets
    example_topk: int = 10  # database images shown per example query
    query_chunk: int = 256
    collapse_min_distinct: int = 16  # fewer distinct database codes (capped at its label sets), or all bits constant
    verify_codes: bool = True  # re-encode the database on the step's device and check the stored codes
    verify_max_mismatch: float = 0.001  # the largest share of database items whose re-encoded code may differ


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow: the tracking URI comes from MLFLOW_TRACKING_URI (unset: ./mlflow.db)."""

    enabled: bool = True
    experiment: str = "dseh"
    registered_model: str = "dseh-imgnet"
    retrieval_model: str = "dseh-retrieval"  # promote registers the retrieval model under it ("": none)
    timeout_s: float = 10.0  # a tracking server that does not answer within this fails the step
    required: bool = True  # false: warn and train on when the server is unreachable


@dataclass(frozen=True)
class PromoteConfig:
    """Registry promotion of the evaluated ImgNet model."""

    metric: str = "map_all"  # a key of metrics.json
    min_delta: float = 0.001  # the champion moves only if the candidate beats it by at least this (> 0)


@dataclass(frozen=True)
class SweepConfig:
    """The code-length sweep (the paper's Table 1) run by the `map_table` stage."""

    bits: tuple[int, ...] = (16, 32, 48, 64)


@dataclass(frozen=True)
class BaselineConfig:
    """The other hashing methods (`method`), trained in the same loop or fitted on the same features."""

    features: str = "auto"  # itq / lsh input: auto (backbone if pretrained weights, else pixels) | pixels | backbone


@dataclass(frozen=True)
class CompareConfig:
    """`dseh compare`: every method and ablation over code lengths and seeds (the paper's Tables 1 and 2)."""

    methods: tuple[str, ...] = ("dseh", "dpsh", "hashnet", "itq", "lsh")
    bits: tuple[int, ...] = (16, 32, 48, 64)
    seeds: tuple[int, ...] = (0, 1, 2)
    ablations: tuple[str, ...] = ("dseh-s", "dseh-ss", "dseh-l", "dseh-a", "dseh-r2")  # dseh.compare.ABLATIONS
    ablation_bits: int = 32
    equal_time_bits: tuple[int, ...] = (32,)  # deep baselines rerun with DSEH's wall time at these lengths
    val_fraction: float = 0.2  # validation queries carved from the training set for tuning
    tune_bits: int = 32
    # one string per trial, space-separated key=value overrides; every deep method gets as many trials,
    # its reference recipe first (params.yaml says what each trial is)
    trials_dseh: tuple[str, ...] = ("imgnet.lr_exp=3.5", "imgnet.lr_exp=3.2", "imgnet.lr_exp=3.5 imgnet.gamma_if=0.5")
    trials_dpsh: tuple[str, ...] = ("dpsh.lr_exp=1.3", "dpsh.lr_exp=0.3", "dpsh.lr_exp=1.3 dpsh.eta=1.0")
    trials_hashnet: tuple[str, ...] = (
        "hashnet.lr_exp=2.5",
        "hashnet.optimizer=adam hashnet.lr_exp=3.5 hashnet.momentum=0 hashnet.weight_decay=0",
        "hashnet.lr_exp=2.5 hashnet.alpha_bits=20",
    )
    jobs: int = 2  # runs in parallel, one torch thread each (results do not depend on it)


@dataclass(frozen=True)
class Config:
    """The whole resolved configuration."""

    seed: int = 0
    bits: int = 32
    method: str = "dseh"  # dseh | dpsh | hashnet (same loop and backbone) | itq | lsh (on features)
    data: DataConfig = field(default_factory=DataConfig)
    labnet: LabNetConfig = field(default_factory=LabNetConfig)
    imgnet: ImgNetConfig = field(default_factory=ImgNetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    promote: PromoteConfig = field(default_factory=PromoteConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    dpsh: DpshConfig = field(default_factory=DpshConfig)
    hashnet: HashNetConfig = field(default_factory=HashNetConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)


_CHOICES = {
    "method": tuple(METHODS),
    "baseline.features": ("auto", "pixels", "backbone"),
    "data.source": tuple(SOURCES),
    "labnet.quant_reduction": ("mean", "sum"),
    "labnet.label_head": ("sigmoid", "linear"),
    "imgnet.backbone": tuple(BACKBONES),
    "imgnet.hash_from": ("pre_relu", "post_relu"),
    **{f"{m}.optimizer": OPTIMIZERS for m in ("train", "dpsh", "hashnet")},
    **{f"{m}.init": INITS for m in ("dpsh", "hashnet")},
}


_MAY_BE_EMPTY = {"compare.ablations", "compare.equal_time_bits"}  # lists that may opt out with []


_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is tuple:
        return f"list of {typing.get_args(tp)[0].__name__}"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted for floats."""
    bad = DsehError(f"params key '{key}': expected {_type_name(tp)}, got {value!r}")
    origin = typing.get_origin(tp)
    if origin is tuple:
        (inner,) = typing.get_args(tp)[:1]
        if not isinstance(value, (list, tuple)) or (not value and key not in _MAY_BE_EMPTY):
            raise bad
        return tuple(_coerce(key, inner, v) for v in value)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        return _coerce_float(key, value, bad)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"unsupported config type {tp} for {key}")  # a bug in this module


def _coerce_float(key: str, value: Any, bad: DsehError) -> float:
    """A finite number; `1e-5` is one too (a float in YAML 1.2 and to dvc, a string to PyYAML's 1.1)."""
    if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad
    if not math.isfinite(value):
        raise DsehError(f"params key '{key}': expected a finite number, got {value!r}")
    return float(value)


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "top level"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise DsehError(f"params section '{where}': expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in raw if k not in names]
    if unknown:
        raise DsehError(f"unknown params key '{prefix}{unknown[0]}'; valid keys of {where}: {', '.join(names)}")
    values = {}
    for name in names:
        if name not in raw:
            continue
        tp = hints[name]
        key = prefix + name
        if dataclasses.is_dataclass(tp):
            values[name] = _build(tp, raw[name], key + ".")
        else:
            values[name] = _coerce(key, tp, raw[name])
            if key in _CHOICES and values[name] not in _CHOICES[key]:
                raise DsehError(f"params key '{key}': {values[name]!r} is not one of {', '.join(_CHOICES[key])}")
    return cls(**values)


def from_dict(raw: dict, overrides: list[str] | None = None) -> Config:
    """Build and validate a Config from a params mapping plus overrides."""
    cfg = _build(Config, apply_overrides(raw or {}, overrides or []), "")
    _validate(cfg)
    return cfg


def from_yaml_text(text: str, overrides: list[str] | None = None) -> Config:
    """Build a Config from params YAML given as text (how Kubeflow steps receive it)."""
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise DsehError(f"params text is not valid YAML ({exc})") from exc
    return from_dict(raw, overrides)


def load_config(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Config:
    """Read params.yaml (a missing file means all defaults) and apply overrides."""
    p = Path(path)
    raw: dict = {}
    if p.exists():
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise DsehError(f"{p}: not valid YAML ({exc})") from exc
    elif str(path) != "params.yaml":
        raise DsehError(f"params file {p} does not exist")
    return from_dict(raw, overrides)


# the smallest allowed value of numeric keys (of each element, for lists); the largest for some
_AT_LEAST: dict[str, float] = {
    "seed": 0, "bits": 1, "train.rounds": 1, "labnet.batch_size": 1, "imgnet.batch_size": 1,
    "labnet.epochs": 0, "imgnet.epochs": 0, "imgnet.encode_batch_size": 1, "data.image_size": 8,
    "data.chunk_size": 1, "data.max_pixels": 1, "data.workers": 1, "data.s3_retries": 0, "evaluate.topk": 1,
    "evaluate.precision_at": 1, "evaluate.radius": 0, "evaluate.query_chunk": 1, "evaluate.collapse_min_distinct": 1,
    "evaluate.example_queries": 1, "evaluate.example_topk": 1, "evaluate.verify_max_mismatch": 0,
    "train.step_epochs": 1, "imgnet.dropout": 0, "imgnet.code_target": 0, "imgnet.shift": 0, "labnet.clip_value": 0, "imgnet.clip_value": 0,
    "train.threads": 0, "train.loader_workers": 0,
    "sweep.bits": 1, "compare.bits": 1, "compare.jobs": 1, "compare.seeds": 0, "hashnet.step_size": 1,
    "train.momentum": 0, "dpsh.momentum": 0, "hashnet.momentum": 0, "dpsh.weight_decay": 0, "hashnet.weight_decay": 0,
}  # fmt: skip
_AT_MOST = {
    "bits": 4096, "sweep.bits": 4096, "compare.bits": 4096, "imgnet.dropout": 1, "imgnet.code_target": 1,
    "train.momentum": 1, "dpsh.momentum": 1, "hashnet.momentum": 1, "evaluate.verify_max_mismatch": 1,
}  # fmt: skip
_NOT_EMPTY = ("tracking.experiment", "tracking.registered_model", "promote.metric", "train.device", "data.device")
_ABOVE_ZERO = ("data.s3_timeout_s", "tracking.timeout_s", "compare.val_fraction", "promote.min_delta")


def _validate(cfg: Config) -> None:
    flat = dict(_leaves(to_dict(cfg)))
    _check_ranges(flat)
    for key in ("labnet.epochs", "imgnet.epochs"):
        if flat[key][0] < 1:
            raise DsehError(f"params key '{key}' must train at least 1 epoch in the first round, got {flat[key]}")
    if cfg.compare.val_fraction >= 1:
        raise DsehError(f"params key 'compare.val_fraction' must be below 1, got {cfg.compare.val_fraction}")
    if len(set(cfg.compare.seeds)) != len(cfg.compare.seeds):
        raise DsehError("params key 'compare.seeds' must not repeat a seed")
    _check_compare_methods(cfg)


def _check_ranges(flat: dict[str, Any]) -> None:
    """_AT_LEAST, _AT_MOST and _ABOVE_ZERO, each broken rule one message naming the key and value."""
    for key, lo in _AT_LEAST.items():
        bad = [v for v in _as_list(flat[key]) if v < lo]
        if bad:
            rule = "must not be negative" if lo == 0 else f"must be at least {lo:g}"
            raise DsehError(f"params key '{key}' {rule}, got {bad[0]}")
    for key, hi in _AT_MOST.items():
        bad = [v for v in _as_list(flat[key]) if v > hi]
        if bad:
            raise DsehError(f"params key '{key}' must be at most {hi}, got {bad[0]}")
    for key in _ABOVE_ZERO:
        if not flat[key] > 0:
            raise DsehError(f"params key '{key}' must be positive, got {flat[key]}")
    for key in _NOT_EMPTY:
        if not str(flat[key]).strip():
            raise DsehError(f"params key '{key}' must not be empty")


def _check_compare_methods(cfg: Config) -> None:
    for m in cfg.compare.methods:
        if m not in METHODS:
            raise DsehError(f"params key 'compare.methods': {m!r} is not one of {', '.join(METHODS)}")
    counts = {m: len(trials(cfg, m)) for m in DEEP_METHODS if m in cfg.compare.methods}
    if len(set(counts.values())) > 1:
        raise DsehError(
            "params keys 'compare.trials_*': every deep method gets the same number of tuning trials, got "
            + ", ".join(f"{m} {n}" for m, n in counts.items())
        )


def _leaves(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in d.items():
        out += _leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [(prefix + k, v)]
    return out


def _as_list(v: Any) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def trials(cfg: Config, method: str) -> list[list[str]]:
    """The tuning trials of a deep method as lists of `key=value` overrides (compare.trials_<method>)."""
    return [t.split() for t in getattr(cfg.compare, f"trials_{method}")]


def epochs_for_round(epochs: tuple[int, ...], round_index: int) -> int:
    """Epochs of a phase in round r: the r-th entry, the last one repeating."""
    return epochs[min(round_index, len(epochs) - 1)]


def to_dict(cfg: Any) -> dict:
    """The resolved config as plain YAML-able data (tuples become lists). Not a read of every key
    for `recording` (it serves records and fingerprints, not results)."""

    def plain(v: Any) -> Any:
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    with paused():
        return plain(dataclasses.asdict(cfg))


def values(cfg: Config, keys: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """{key: value} of leaf keys such as `labnet.epochs` (lists as lists): what a fingerprint over a
    stage's declared params holds."""
    flat = dict(_leaves(to_dict(cfg)))
    return {k: flat[k] for k in keys}


# keys that change how fast or where a step runs and logs, never what it writes: no stage declares
# them, so changing one reruns nothing (tracking.* is declared by promote, whose output it is)
NEUTRAL_KEYS = (
    "data.workers",
    "data.chunk_size",
    "data.s3_timeout_s",
    "data.s3_retries",
    "train.loader_workers",
    "evaluate.query_chunk",
    "tracking.enabled",
    "tracking.experiment",
    "tracking.registered_model",
    "tracking.timeout_s",
    "tracking.required",
)


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
