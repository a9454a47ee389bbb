"""MLflow tracking and the model registry: one parent run per pipeline execution with a nested
run per step, the ImgNet model as a pyfunc model (uint8 images in, +-1 codes out), and safe
champion/challenger promotion.

With no MLFLOW_TRACKING_URI, MLflow's embedded default store is used (sqlite:///mlflow.db in
the working directory). A pipeline execution is the set of steps sharing DSEH_PIPELINE_RUN
(set by scripts/repro.sh and by the Kubeflow pipeline); without it, steps with the same
dataset and resolved config share one parent run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from dseh.config import Config, TrackingConfig, to_dict
from dseh.errors import DsehError

log = logging.getLogger(__name__)

PIPELINE_ENV = "DSEH_PIPELINE_RUN"
TAG_KEY = "dseh.pipeline_key"
TAG_STEP = "dseh.step"


DEFAULT_DB = "mlflow.db"  # MLflow's embedded default: a SQLite file in the working directory


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else the embedded default store, by absolute path (MLflow caches stores
    by URI, so a relative one would follow the first working directory of the process)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{os.path.abspath(DEFAULT_DB)}"


def check_server(uri: str, timeout_s: float) -> None:
    """An HTTP tracking URI must answer /health within timeout_s; local stores always do."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as resp:
            if resp.status >= 400:
                raise DsehError(f"MLflow tracking server {uri} answered HTTP {resp.status}")
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise DsehError(
            f"MLflow tracking server {uri} is unreachable ({exc}); set tracking.required=false to train without it"
        ) from exc


def _flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, list) else str(v)
    return out


def pipeline_key(cfg: Config, dataset_sha: str) -> str:
    env = os.environ.get(PIPELINE_ENV)
    if env:
        return env
    return hashlib.sha256(json.dumps([dataset_sha, to_dict(cfg)], sort_keys=True).encode()).hexdigest()[:16]


class Tracker:
    """What a step logs into its nested run."""

    def __init__(self, run_id: str):
        self.run_id = run_id

    def log_history(self, history: list[dict], offset: int = 0) -> None:
        import mlflow

        for row in history:
            metrics = {
                k: float(v) for k, v in row.items() if k not in ("round", "epoch") and isinstance(v, (int, float))
            }
            mlflow.log_metrics(metrics, step=offset + int(row["epoch"]))

    def log_metrics(self, metrics: dict[str, Any], prefix: str = "") -> None:
        import mlflow

        flat = {}
        for k, v in metrics.items():
            if isinstance(v, dict):
                for kk, vv in v.items():
                    if isinstance(vv, (int, float)):
                        flat[f"{prefix}{k}.{kk}".replace("@", "_at_")] = float(vv)
            elif isinstance(v, (int, float)):  # flags (evaluate's `collapsed`) as 0 / 1
                flat[f"{prefix}{k}"] = float(v)
        mlflow.log_metrics(flat)

    def log_artifacts(self, path: str | Path, artifact_path: str | None = None) -> None:
        import mlflow

        p = Path(path)
        if p.is_dir():
            mlflow.log_artifacts(str(p), artifact_path)
        else:
            mlflow.log_artifact(str(p), artifact_path)


@contextmanager
def step_run(cfg: Config, step: str, dataset_sha: str, tags: dict[str, str] | None = None) -> Iterator[Tracker | None]:
    """A nested MLflow run for one step under the pipeline's parent run; None when tracking is
    off (or unreachable with tracking.required=false) and on ranks other than 0. A failing step
    ends its run FAILED."""
    tc: TrackingConfig = cfg.tracking
    from dseh.train import dist_info

    if not tc.enabled or not dist_info().main:  # under torchrun only rank 0 tracks
        yield None
        return
    uri = tracking_uri()
    try:
        check_server(uri, tc.timeout_s)
    except DsehError as exc:
        if tc.required:
            raise
        log.warning("%s; continuing without tracking", exc)
        yield None
        return
    import mlflow

    from dseh.stages import code_version

    mlflow.set_tracking_uri(uri)
    exp = mlflow.set_experiment(tc.experiment)
    key = pipeline_key(cfg, dataset_sha)
    client = mlflow.MlflowClient()
    found = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{TAG_KEY}` = '{key}' and tags.`{TAG_STEP}` = 'pipeline'",
        max_results=1,
    )
    common = {"dseh.git_commit": code_version(), "dseh.dataset_sha256": dataset_sha, TAG_KEY: key}
    if found:
        parent_id = found[0].info.run_id
    else:
        parent = client.create_run(exp.experiment_id, run_name=f"dseh-{key[:8]}", tags={**common, TAG_STEP: "pipeline"})
        parent_id = parent.info.run_id
        client.set_terminated(parent_id, "FINISHED")
    with mlflow.start_run(run_id=parent_id):
        with mlflow.start_run(run_name=step, nested=True, tags={**common, TAG_STEP: step, **(tags or {})}) as run:
            params = _flatten(to_dict(cfg))
            mlflow.log_params(params)
            yield Tracker(run.info.run_id)


# --------------------------------------------------------------------------- the pyfunc model


def _pyfunc_class():
    import mlflow.pyfunc

    class ImgNetCodes(mlflow.pyfunc.PythonModel):
        """uint8 images (N, H, W, 3) -> +-1 codes (N, bits) int8, sign(0) = +1."""

        def load_context(self, context):
            import torch

            self.model = torch.load(context.artifacts["imgnet"], map_location="cpu", weights_only=False)
            self.model.eval()
            meta = json.loads(Path(context.artifacts["meta"]).read_text())
            self.batch = int(meta["encode_batch_size"])

        def predict(self, context, model_input, params=None):
            import torch

            from dseh.codes import sign

            if isinstance(model_input, dict):  # a named-tensor request: the one tensor is the images
                (model_input,) = model_input.values()
            x = np.asarray(model_input, dtype=np.uint8)
            out = []
            with torch.no_grad():
                for s in range(0, len(x), self.batch):
                    _, u = self.model(torch.from_numpy(np.ascontiguousarray(x[s : s + self.batch])))
                    out.append(sign(u.float().numpy()))
            return np.concatenate(out) if out else np.zeros((0, 0), np.int8)

    return ImgNetCodes


def log_imgnet_model(
    model, image_size: int, bits: int, encode_batch_size: int, example: np.ndarray, name: str = "imgnet"
):
    """Log the ImgNet model as a pyfunc model with signature and input example; returns ModelInfo."""
    import mlflow
    import torch
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    import dseh

    sig = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, image_size, image_size, 3))]),
        outputs=Schema([TensorSpec(np.dtype(np.int8), (-1, bits))]),
    )
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(model.cpu().eval(), Path(tmp) / "imgnet_module.pt")
        (Path(tmp) / "meta.json").write_text(
            json.dumps({"encode_batch_size": encode_batch_size, "bits": bits, "image_size": image_size})
        )
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=_pyfunc_class()(),
            artifacts={"imgnet": str(Path(tmp) / "imgnet_module.pt"), "meta": str(Path(tmp) / "meta.json")},
            code_paths=[str(Path(dseh.__file__).parent)],
            signature=sig,
            input_example=example,
            pip_requirements=[
                f"torch=={torch.__version__.split('+')[0]}",
                f"numpy=={np.__version__}",
                f"mlflow=={mlflow.__version__}",
            ],
        )


# --------------------------------------------------------------------------- promotion


CHAMPION, CHALLENGER = "champion", "challenger"


def _version_metric(v) -> float | None:
    try:
        return float(v.tags["dseh.metric_value"])
    except (KeyError, ValueError):
        return None


def _comparable(a, b) -> bool:
    keys = ("dseh.metric", "dseh.protocol", "dseh.dataset_sha256")
    return all(a.tags.get(k) == b.tags.get(k) for k in keys)


def current_champion(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def decide(
    candidate_metric: float, candidate_tags: dict, champion, min_delta: float, collapsed: str | None = None
) -> tuple[bool, str]:
    """(promote?, reason) for a candidate against the current champion version (or None); a candidate
    whose codes collapsed (`collapsed` says how) never becomes the champion, even with none yet."""
    if collapsed:
        return False, f"the candidate's codes collapsed ({collapsed})"
    if champion is None:
        return True, "no champion yet"
    keys = ("dseh.metric", "dseh.protocol", "dseh.dataset_sha256")
    if any(champion.tags.get(k) != candidate_tags.get(k) for k in keys):
        return False, "the champion was measured with another metric, protocol or dataset: not comparable"
    best = _version_metric(champion)
    if best is None:
        return True, "the champion carries no metric"
    if candidate_metric >= best + min_delta:
        return True, f"{candidate_metric:.6f} beats the champion's {best:.6f} by at least {min_delta}"
    return False, f"{candidate_metric:.6f} does not beat the champion's {best:.6f} by {min_delta}"


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
            if v.tags.get("dseh.promoted") == "true" and _comparable(v, champ) and _version_metric(v) is not None
        ]
        if not promoted:
            return
        best = max(promoted, key=lambda v: (_version_metric(v), -int(v.version)))
        if best.version == champ.version:
            return
        if _version_metric(best) <= (_version_metric(champ) or float("-inf")):
            return
        client.set_registered_model_alias(name, CHAMPION, best.version)
        time.sleep(0.2)
