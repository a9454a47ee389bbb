"""Registry promotion: a candidate (the evaluated image network, its metric and the protocol it was
measured under) becomes a new version of tracking.registered_model with the alias `challenger`;
`champion` moves to it only when `decide` says so. Every decision is recorded as version tags.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from dseh import tracking
from dseh.artifacts import MODEL, file_sha, fingerprint
from dseh.config import Config
from dseh.errors import DsehError

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
COMPARABLE_TAGS = ("dseh.metric", "dseh.protocol", "dseh.dataset_sha256")
PROMOTION_KEY = "dseh.promotion_key"  # the version tag that makes a retried promotion find its version


@dataclass(frozen=True)
class Candidate:
    """What promotion knows of the evaluated model."""

    metric: str
    value: float
    tags: dict[str, str]
    collapsed: str | None  # how its codes collapsed, or None
    dataset_sha256: str
    image_size: int
    bits: int

    @classmethod
    def from_metrics(cls, cfg: Config, metrics: dict, metrics_file: Path, model, data) -> Candidate:
        """From evaluate's metrics.json, the step model (dseh.artifacts.StepModel) and its dataset."""
        name = cfg.promote.metric
        value = metrics.get(name)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            numeric = [k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
            raise DsehError(
                f"params key 'promote.metric': '{name}' is not a metric of {metrics_file}; "
                f"choose one of {', '.join(numeric)}"
            )
        protocol = f"top{metrics['protocol_topk']}/{metrics['bits']}bits/{len(data.query)}q/{len(data.database)}db"
        tags = {
            "dseh.metric": name,
            "dseh.metric_value": repr(float(value)),
            "dseh.protocol": protocol,
            "dseh.dataset_sha256": data.sha256,
            "dseh.code_version": model.code_version,
            "dseh.method": model.method,
        }
        collapsed = (
            f"{metrics['distinct_codes_database']} distinct database codes, {metrics['constant_bits_database']} of "
            f"{metrics['bits']} bits constant"
            if metrics.get("collapsed")
            else None
        )
        return cls(name, float(value), tags, collapsed, data.sha256, model.image_size, model.bits)


def version_metric(v) -> float | None:
    try:
        return float(v.tags["dseh.metric_value"])
    except (KeyError, ValueError):
        return None


def comparable(a_tags: dict, b_tags: dict) -> bool:
    """Measured with the same metric, protocol and dataset."""
    return all(a_tags.get(k) == b_tags.get(k) for k in COMPARABLE_TAGS)


def current_champion(client, name: str):
    """The version aliased champion, or None when the model or the alias does not exist (any other
    failure, such as an unreachable registry, is raised)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def decide(
    candidate_metric: float,
    candidate_tags: dict,
    champion,
    min_delta: float,
    collapsed: str | None = None,
    champion_metric: float | None = None,
) -> tuple[bool, str]:
    """(promote?, reason) for a candidate against the current champion version (or None): the
    candidate must beat the champion by at least min_delta (> 0, so an equal model never takes
    over). `champion_metric`, when given, is the champion re-evaluated on the candidate's dataset
    and protocol (see reevaluate); otherwise a champion measured elsewhere is not comparable. A
    candidate whose codes collapsed (`collapsed` says how) never becomes the champion."""
    if collapsed:
        return False, f"the candidate's codes collapsed ({collapsed})"
    if champion is None:
        return True, "no champion yet"
    where = "the champion's"
    if champion_metric is not None:
        best, where = champion_metric, "the champion's, re-evaluated on this dataset and protocol,"
    elif not comparable(champion.tags, candidate_tags):
        return False, "the champion was measured with another metric, protocol or dataset: not comparable"
    else:
        best = version_metric(champion)
        if best is None:
            return True, "the champion carries no metric"
    if candidate_metric > best and candidate_metric - best >= min_delta:
        return True, f"{candidate_metric:.6f} beats {where} {best:.6f} by at least {min_delta}"
    return False, f"{candidate_metric:.6f} does not beat {where} {best:.6f} by {min_delta}"


def reevaluate(cfg: Config, reg: str, champion, data) -> float | None:
    """The champion's promote.metric on the prepared `data` under this config's evaluate protocol:
    its registered model encodes every item (query and database) and the codes are evaluated as
    `dseh evaluate` does. None when it cannot read this dataset's images (another image size)."""
    import mlflow
    import numpy as np

    from dseh import evaluation
    from dseh.codes import pack

    model = mlflow.pyfunc.load_model(f"models:/{reg}/{champion.version}")
    shape = tuple(model.metadata.get_input_schema().inputs[0].shape[1:])
    if shape != tuple(data.images.shape[1:]):
        log.warning("the champion reads %s images, this dataset holds %s: it cannot be re-evaluated", shape,
                    tuple(data.images.shape[1:]))  # fmt: skip
        return None
    batch = cfg.imgnet.encode_batch_size
    n = len(data.labels)
    codes = np.concatenate([pack(model.predict(np.asarray(data.images[s : s + batch]))) for s in range(0, n, batch)])
    bits = int(model.metadata.get_output_schema().inputs[0].shape[1])
    metrics, _ = evaluation.split_metrics(cfg.evaluate, data, codes, bits)
    if cfg.promote.metric not in metrics:
        raise DsehError(f"params key 'promote.metric': the champion's evaluation has no '{cfg.promote.metric}'")
    log.info("champion version %s re-evaluated on %s: %s %.6f", champion.version, data.root, cfg.promote.metric,
             metrics[cfg.promote.metric])  # fmt: skip
    return float(metrics[cfg.promote.metric])


def _judge(cfg: Config, cand: Candidate, client, reg: str, data) -> tuple:
    """(champion, its metric on this dataset or None, promote?, reason)."""
    champ = current_champion(client, reg)
    if cand.collapsed or champ is None or data is None or comparable(champ.tags, cand.tags):
        return (champ, None, *decide(cand.value, cand.tags, champ, cfg.promote.min_delta, cand.collapsed))
    champ_value = reevaluate(cfg, reg, champ, data)
    if champ_value is None:
        return champ, None, True, "the champion cannot read this dataset's images: the candidate replaces it"
    return (champ, champ_value, *decide(cand.value, cand.tags, champ, cfg.promote.min_delta, None, champ_value))


def set_alias(client, name: str, alias: str, version, attempts: int = 3) -> None:
    """client.set_registered_model_alias, again when a concurrent promotion inserted the same alias
    first: a SQL store answers that race with a unique-constraint error, and the retry updates it."""
    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            client.set_registered_model_alias(name, alias, version)
            return
        except MlflowException as exc:
            if attempt == attempts - 1 or "UNIQUE constraint" not in str(exc):
                raise
            time.sleep(0.2)


def settle_champion(client, name: str, attempts: int = 3) -> None:
    """Make the champion the best of the versions ever promoted on its dataset and protocol.

    MLflow has no compare-and-set: two promotions that read the same champion can write in
    either order. Each promotion re-reads after writing and moves the alias to the best promoted
    version, so the champion's metric never ends lower than any promoted version's."""
    for _ in range(attempts):
        champ = current_champion(client, name)
        if champ is None:
            return
        promoted = [
            v
            for v in client.search_model_versions(f"name = '{name}'")
            if v.tags.get("dseh.promoted") == "true"
            and comparable(v.tags, champ.tags)
            and version_metric(v) is not None
        ]
        if not promoted:
            return
        best = max(promoted, key=lambda v: (version_metric(v), -int(v.version)))
        if best.version == champ.version:
            return
        if version_metric(best) <= (version_metric(champ) or float("-inf")):
            return
        set_alias(client, name, CHAMPION, best.version)
        time.sleep(0.2)


def _local_store_missing(uri: str) -> bool:
    """A SQLite store that does not exist yet (nothing registered; opening it would create it)."""
    return uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).exists()


def dry_run(cfg: Config, cand: Candidate, data=None) -> dict:
    """What `register` would decide, reading the registry only; writes nothing anywhere (not even
    the embedded store's file when it does not exist yet)."""
    reg = cfg.tracking.registered_model
    decision: dict = {"registered_model": reg, "metric": cand.metric, "value": cand.value, "dry_run": True}
    if not cfg.tracking.enabled:
        return {**decision, "decision": "skipped", "reason": "tracking.enabled is false"}
    uri = tracking.tracking_uri()
    champ, ok, reason = None, True, "no champion yet"
    if not _local_store_missing(uri):
        import mlflow

        tracking.check_server(uri, cfg.tracking.timeout_s, "")
        with tracking.guard(uri):
            champ, _, ok, reason = _judge(cfg, cand, mlflow.MlflowClient(uri), reg, data)
    elif cand.collapsed:
        ok, reason = decide(cand.value, cand.tags, None, cfg.promote.min_delta, cand.collapsed)
    verdict = "would promote" if ok else ("would keep the champion" if champ else "would not promote")
    return {**decision, "decision": verdict, "reason": reason, "champion_version": getattr(champ, "version", None)}


def register(
    cfg: Config,
    cand: Candidate,
    imgnet_dir: str | Path,
    data,
    model_uri: str | None = None,
    labnet_dir: str | Path | None = None,
) -> dict:
    """Register the candidate (the image network of the step output `imgnet_dir`, trained on the
    prepared `data`), alias it challenger, move champion when `decide` says so. The version's
    source is `model_uri` (the model train_imgnet logged in its run) when this registry reaches
    it, else the model logged anew in the promote run. A promotion with the key of one already
    registered (promotion_key) returns that one's recorded decision and registers nothing. Fails
    when the registry cannot be reached, whatever tracking.required says (that setting is for
    logging while training). The retrieval model (register_retrieval) follows the image network."""
    reg = cfg.tracking.registered_model
    decision: dict = {"registered_model": reg, "metric": cand.metric, "value": cand.value}
    if not cfg.tracking.enabled:
        return {**decision, "decision": "skipped", "reason": "tracking.enabled is false"}
    with tracking.step_run(cfg, "promote", cand.dataset_sha256, required=True) as tr:
        with tracking.guard(tracking.tracking_uri()):
            decision.update(_register_and_promote(cfg, cand, imgnet_dir, data, model_uri))
            decision.update(register_retrieval(cfg, cand, imgnet_dir, labnet_dir, data, decision["version"]))
        tr.log_metrics({"candidate_" + cand.metric: cand.value})
    return decision


def log_model(cfg: Config, model, image_size: int, bits: int, data):
    """Log an image network as the pyfunc model `imgnet` in the active run, two query images of the
    prepared `data` as its input example; returns ModelInfo."""
    import numpy as np

    example = np.asarray(data.images[np.sort(data.query[:2])])
    return tracking.log_imgnet_model(model, image_size, bits, cfg.imgnet.encode_batch_size, example)


def log_step_model(cfg: Config, imgnet_dir: str | Path, data):
    """log_model for the image network of the step output `imgnet_dir`."""
    from dseh.models.factory import load_imgnet

    model, state = load_imgnet(imgnet_dir)
    return log_model(cfg, model, state.image_size, state.bits, data)


def promotion_key(cfg: Config, cand: Candidate, imgnet_dir: str | Path) -> str:
    """What makes two promotions one: the pipeline run (DSEH_PIPELINE_RUN, else the key of the
    dataset and config, as for the parent run), the sha256 of the model file and the candidate's
    evaluation (metric, value, protocol): `run/sha256 of the model file and the evaluation`."""
    run = tracking.pipeline_key(cfg, cand.dataset_sha256)
    return f"{run}/{fingerprint(file_sha(Path(imgnet_dir) / MODEL), cand.tags)}"


def find_promotion(client, reg: str, key: str):
    """The version of `reg` registered under the promotion key `key`, or None."""
    versions = client.search_model_versions(f"name = '{reg}'")
    return next((v for v in versions if v.tags.get(PROMOTION_KEY) == key), None)


def _recorded(client, reg: str, version) -> dict:
    """The decision recorded on a version's tags, as _register_and_promote returns it."""
    final = current_champion(client, reg)
    metric = version.tags.get("dseh.champion_metric", "None")
    return {
        "decision": version.tags["dseh.decision"],
        "reason": version.tags.get("dseh.reason"),
        "version": version.version,
        "previous_champion_metric": None if metric == "None" else float(metric),
        "champion_version": getattr(final, "version", None),
        "model_uri": f"models:/{reg}@{CHAMPION}" if final is not None else None,
    }


def _reachable(model_uri: str | None) -> bool:
    """The registry's tracking server holds the model at `model_uri`."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if not model_uri:
        return False
    try:
        mlflow.models.get_model_info(model_uri)
    except (MlflowException, OSError) as exc:
        log.warning("%s is not on this tracking server (%s): the model is logged in the promote run", model_uri, exc)
        return False
    return True


def _register_and_promote(cfg: Config, cand: Candidate, imgnet_dir: str | Path, data, model_uri: str | None) -> dict:
    import mlflow

    client = mlflow.MlflowClient()
    reg = cfg.tracking.registered_model
    key = promotion_key(cfg, cand, imgnet_dir)
    found = find_promotion(client, reg, key)
    if found is not None and "dseh.decision" in found.tags:
        log.info("version %s of %s holds this promotion (%s) already: its decision stands", found.version, reg, key)
        return _recorded(client, reg, found)
    if found is not None:  # registered by an attempt that ended before it decided
        version = found.version
    else:
        source = model_uri if _reachable(model_uri) else log_step_model(cfg, imgnet_dir, data).model_uri
        version = mlflow.register_model(source, reg, tags={**cand.tags, PROMOTION_KEY: key}).version
    set_alias(client, reg, CHALLENGER, version)
    champ, reevaluated, ok, reason = _judge(cfg, cand, client, reg, data)
    champ_metric = reevaluated if reevaluated is not None else (version_metric(champ) if champ is not None else None)
    verdict = "promoted" if ok else ("kept the champion" if champ is not None else "not promoted")
    client.set_model_version_tag(reg, version, "dseh.decision", verdict)
    client.set_model_version_tag(reg, version, "dseh.reason", reason)
    client.set_model_version_tag(reg, version, "dseh.champion_metric", repr(champ_metric))
    if ok:
        client.set_model_version_tag(reg, version, "dseh.promoted", "true")
        set_alias(client, reg, CHAMPION, version)
    settle_champion(client, reg)
    final = current_champion(client, reg)
    return {
        "decision": verdict,
        "reason": reason,
        "version": version,
        "previous_champion_metric": champ_metric,
        "champion_version": getattr(final, "version", None),
        "model_uri": f"models:/{reg}@{CHAMPION}" if final is not None else None,
    }


# --------------------------------------------------------------------------- the retrieval model

ENCODER_VERSION = "dseh.encoder_version"  # a retrieval version's tag: the image network's version it bundles


def retrieval_database(imgnet_dir: str | Path, data, bits: int):
    """The Database (dseh.artifacts) of an ImgNet step output of `bits`-bit codes: its stored codes
    of the prepared `data`'s database items, which `dseh search` ranks too."""
    import numpy as np

    from dseh.artifacts import Database, load_codes

    codes = load_codes(imgnet_dir, len(data.labels), bits)
    items = np.asarray(data.database, dtype=np.int64)
    return Database(codes[items], items, data.labels[items], list(data.classes), bits)


def retrieval_example(data):
    """The retrieval model's input example: the first query image and the first query's label set."""
    import numpy as np
    import pandas as pd

    first = int(np.sort(data.query)[0])
    names = [data.classes[c] for c in np.flatnonzero(data.labels[first])]
    image = np.asarray(data.images[first]).ravel().astype(np.int64)  # the signature's flat (H, W, 3) values
    return pd.DataFrame({"image": [image, None], "labels": [None, names]})


def register_retrieval(cfg: Config, cand: Candidate, imgnet_dir, labnet_dir, data, encoder_version) -> dict:
    """Register the retrieval model (tracking.retrieval_model) bundling the ImgNet and LabNet of
    this promotion and its database, tagged with the image network's version; once per promotion
    key. Its `champion` and `challenger` aliases then follow the image network's (follow_aliases)."""
    import mlflow

    name = cfg.tracking.retrieval_model
    if not name:
        return {}
    client = mlflow.MlflowClient()
    key = promotion_key(cfg, cand, imgnet_dir)
    found = find_promotion(client, name, key)
    if found is None:
        info = tracking.log_retrieval_model(imgnet_dir, labnet_dir, retrieval_database(imgnet_dir, data, cand.bits),
                                            retrieval_example(data) if labnet_dir else retrieval_example(data)[:1])  # fmt: skip
        tags = {**cand.tags, PROMOTION_KEY: key, ENCODER_VERSION: str(encoder_version)}
        found = mlflow.register_model(info.model_uri, name, tags=tags)
    follow_aliases(client, cfg.tracking.registered_model, name)
    final = current_champion(client, name)
    return {
        "retrieval_model": name,
        "retrieval_version": found.version,
        "retrieval_uri": f"models:/{name}@{CHAMPION}" if final is not None else None,
    }


def follow_aliases(client, encoder: str, retrieval: str) -> None:
    """Point the retrieval model's champion and challenger at its versions that bundle the image
    network's champion and challenger; an alias whose image network has no retrieval version is
    removed, so it never names a model other than the encoder's."""
    from mlflow.exceptions import MlflowException

    versions = client.search_model_versions(f"name = '{retrieval}'")
    for alias in (CHALLENGER, CHAMPION):
        try:
            target = client.get_model_version_by_alias(encoder, alias).version
        except MlflowException:
            target = None
        match = [v for v in versions if target is not None and v.tags.get(ENCODER_VERSION) == str(target)]
        if match:
            set_alias(client, retrieval, alias, max(match, key=lambda v: int(v.version)).version)
            continue
        try:
            client.delete_registered_model_alias(retrieval, alias)
        except MlflowException:
            pass
