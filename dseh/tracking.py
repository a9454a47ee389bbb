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
import math
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from dseh.artifacts import code_version
from dseh.config import Config, TrackingConfig, to_dict
from dseh.errors import DsehError
from dseh.train.device import dist_info

log = logging.getLogger(__name__)

PIPELINE_ENV = "DSEH_PIPELINE_RUN"
TAG_KEY = "dseh.pipeline_key"
TAG_STEP = "dseh.step"


DEFAULT_DB = "mlflow.db"  # MLflow's embedded default: a SQLite file in the working directory


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else the embedded default store, by absolute path (MLflow caches stores
    by URI, so a relative one would follow the first working directory of the process). In a
    Kubeflow pod (KFP_POD_NAME set) there is no fallback: a file in the pod would be thrown away."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    if os.environ.get("KFP_POD_NAME"):
        raise DsehError(
            "no MLFLOW_TRACKING_URI in this Kubeflow pod: the MLflow Secret named by the pipeline's "
            "mlflow_secret parameter (default dseh-mlflow) must hold it, or set tracking.enabled=false"
        )
    return f"sqlite:///{os.path.abspath(DEFAULT_DB)}"


def bound_http(timeout_s: float) -> None:
    """Bound every MLflow REST call of this process by tracking.timeout_s: one request times out
    after it, with at most one retry (MLflow's defaults, 120 s and 7 retries with backoff, let a
    stalled server hold a step for many minutes)."""
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, math.ceil(timeout_s)))
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "1"
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"


def check_server(uri: str, timeout_s: float, hint: str = "; set tracking.required=false to train without it") -> None:
    """An HTTP tracking URI must answer /health within timeout_s; local stores always do. Every
    later MLflow call of the process is bounded too (bound_http)."""
    if not uri.startswith(("http://", "https://")):
        return
    bound_http(timeout_s)
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as resp:
            if resp.status >= 400:
                raise DsehError(f"MLflow tracking server {uri} answered HTTP {resp.status}")
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise DsehError(f"MLflow tracking server {uri} is unreachable ({exc}){hint}") from exc


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


@contextmanager
def guard(uri: str) -> Iterator[None]:
    """MLflow's failures (a server that stalls, refuses or dies; each call bounded by bound_http) as
    one DsehError naming the tracking URI."""
    import requests
    from mlflow.exceptions import MlflowException

    try:
        yield
    except (MlflowException, requests.RequestException, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DsehError(f"MLflow tracking server {uri} failed: {first[:300]}") from exc


class Tracker:
    """What a step logs into its nested run; every call bounded, a failure one DsehError."""

    def __init__(self, run_id: str, uri: str = ""):
        self.run_id = run_id
        self.uri = uri or tracking_uri()

    def log_epoch(self, row: dict) -> None:
        """One training history row, as its epoch ends (step = the epoch)."""
        import mlflow

        metrics = {k: float(v) for k, v in row.items() if k not in ("round", "epoch") and isinstance(v, (int, float))}
        with guard(self.uri):
            mlflow.log_metrics(metrics, step=int(row["epoch"]))

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
        with guard(self.uri):
            mlflow.log_metrics(flat)

    def log_artifacts(self, path: str | Path, artifact_path: str | None = None, exclude: tuple[str, ...] = ()) -> None:
        """A file, or a folder's files and subfolders but those named in `exclude` (its top level)."""
        import mlflow

        p = Path(path)
        with guard(self.uri):
            if not p.is_dir():
                mlflow.log_artifact(str(p), artifact_path)
            elif not exclude:
                mlflow.log_artifacts(str(p), artifact_path)
            else:
                for child in sorted(c for c in p.iterdir() if c.name not in exclude):
                    if child.is_dir():
                        mlflow.log_artifacts(str(child), "/".join(filter(None, (artifact_path, child.name))))
                    else:
                        mlflow.log_artifact(str(child), artifact_path)


@contextmanager
def step_run(
    cfg: Config, step: str, dataset_sha: str, tags: dict[str, str] | None = None, required: bool | None = None
) -> Iterator[Tracker | None]:
    """A nested MLflow run for one step under the pipeline's parent run; None when tracking is
    off (or unreachable when not `required`, by default tracking.required) and on ranks other
    than 0. A failing step ends its run FAILED."""
    tc: TrackingConfig = cfg.tracking
    if not tc.enabled or not dist_info().main:  # under torchrun only rank 0 tracks
        yield None
        return
    uri = tracking_uri()
    hint = "; set tracking.required=false to train without it" if required is None and tc.required else ""
    required = tc.required if required is None else required
    try:
        check_server(uri, tc.timeout_s, hint)
    except DsehError as exc:
        if required:
            raise
        log.warning("%s; continuing without tracking", exc)
        yield None
        return
    stack = ExitStack()
    with guard(uri):
        try:
            run = _open_step_run(cfg, step, dataset_sha, tags, uri, stack)
        except BaseException:
            stack.close()
            raise
    try:
        yield Tracker(run.info.run_id, uri)
    except BaseException as exc:
        try:  # the runs end FAILED; a server that cannot hear it must not hide the step's own error
            stack.__exit__(type(exc), exc, exc.__traceback__)
        except Exception as end_exc:  # noqa: BLE001
            log.warning("could not mark the MLflow run of %s failed on %s: %s", step, uri, end_exc)
        raise
    with guard(uri):
        stack.close()


def _open_step_run(cfg: Config, step: str, dataset_sha: str, tags: dict[str, str] | None, uri: str, stack: ExitStack):
    """Start the step's nested run under the pipeline's parent run (created on first use)."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    exp = mlflow.set_experiment(cfg.tracking.experiment)
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
    stack.enter_context(mlflow.start_run(run_id=parent_id))
    run = stack.enter_context(
        mlflow.start_run(run_name=step, nested=True, tags={**common, TAG_STEP: step, **(tags or {})})
    )
    mlflow.log_params(_flatten(to_dict(cfg)))
    return run


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
            from dseh.codes import sign
            from dseh.encoder import encode_images

            if isinstance(model_input, dict):  # a named-tensor request: the one tensor is the images
                (model_input,) = model_input.values()
            x = np.asarray(model_input, dtype=np.uint8)
            if not len(x):
                return np.zeros((0, 0), np.int8)
            _, u = encode_images(self.model, x, None, self.batch)
            return sign(u)

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


# --------------------------------------------------------------------------- the retrieval model

RETRIEVAL_CODE = '''"""dseh's retrieval model, logged as code (MLflow models from code): no pickled object."""
import mlflow

from dseh.tracking import retrieval_model_class

mlflow.models.set_model(retrieval_model_class()())
'''


def retrieval_model_class():
    """The retrieval pyfunc class: `image` (uint8 (H, W, 3), flat) or `labels` (class names) rows in,
    the top-k database items with Hamming distances out (dseh.retrieval.Retriever.answer); params
    `k`. Every file it loads is weights-only torch, npy without pickles, or JSON. A bad request
    raises MlflowException INVALID_PARAMETER_VALUE, which the scoring server answers with a 400."""
    import mlflow.pyfunc

    class Retrieval(mlflow.pyfunc.PythonModel):
        def load_context(self, context):
            from dseh.artifacts import load_database
            from dseh.models.factory import load_imgnet, load_labnet
            from dseh.retrieval import Retriever

            a = context.artifacts
            imgnet, state = load_imgnet(a["imgnet"], a.get("backbone_weights", ""))
            labnet = load_labnet(a["labnet"])[0].eval() if "labnet" in a else None
            db = load_database(a["database"])
            self.retriever = Retriever(imgnet, labnet, db, state.image_size, state.config.imgnet.encode_batch_size)

        def predict(self, context, model_input, params=None):
            from mlflow.exceptions import MlflowException
            from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

            try:
                return self.retriever.answer(model_input, (params or {}).get("k", RETRIEVAL_K))
            except DsehError as exc:
                raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None

    return Retrieval


RETRIEVAL_K = 10  # the default number of neighbours a request gets


def log_retrieval_model(imgnet_dir: str | Path, labnet_dir: str | Path | None, db, example, name: str = "retrieval"):
    """Log the retrieval model in the active run: the ImgNet (and LabNet) weights of the step
    outputs, the Database `db` (dseh.artifacts), a signature (optional `image` and `labels`
    columns, param `k`) and `example` (a DataFrame of one image and one label query); returns
    ModelInfo. CNN-F's .mat travels with it (its layer shapes come from the file)."""
    import mlflow
    import torch
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, ParamSchema, ParamSpec, Schema

    import dseh
    from dseh.artifacts import load_step_model, save_database, save_weights
    from dseh.models.backbones import NEEDS_FILE
    from dseh.storage import local_copy

    sig = ModelSignature(
        inputs=Schema([
            ColSpec(Array(DataType.long), "image", required=False),  # H * W * 3 values: nested lists cost 70 ms
            ColSpec(Array(DataType.string), "labels", required=False),
        ]),
        outputs=Schema([ColSpec(DataType.long, c) for c in ("query", "rank", "id", "distance")]
                       + [ColSpec(Array(DataType.string), "labels")]),
        params=ParamSchema([ParamSpec("k", DataType.long, RETRIEVAL_K)]),
    )  # fmt: skip
    img = load_step_model(imgnet_dir, "imgnet")
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        t = Path(tmp)
        save_weights(t / "imgnet", img)
        save_database(t / "database", db)
        (t / "retrieval_model.py").write_text(RETRIEVAL_CODE)
        artifacts = {"imgnet": str(t / "imgnet"), "database": str(t / "database")}
        if labnet_dir is not None:
            save_weights(t / "labnet", load_step_model(labnet_dir, "labnet"))
            artifacts["labnet"] = str(t / "labnet")
        if img.config.imgnet.backbone in NEEDS_FILE:
            data = img.config.data
            weights = stack.enter_context(local_copy(img.config.imgnet.weights, data.s3_timeout_s, data.s3_retries))
            artifacts["backbone_weights"] = str(weights)
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(t / "retrieval_model.py"),
            artifacts=artifacts,
            code_paths=[str(Path(dseh.__file__).parent)],
            signature=sig,
            input_example=(example, {"k": RETRIEVAL_K}),
            pip_requirements=[
                f"torch=={torch.__version__.split('+')[0]}",
                f"numpy=={np.__version__}",
                f"mlflow=={mlflow.__version__}",
            ],
        )
