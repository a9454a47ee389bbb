"""`dseh pipeline ...`: compile the Kubeflow pipeline, submit or schedule it on a cluster through
kfp.Client, or run it whole on this machine under kfp.local (no cluster, no Docker)."""

from __future__ import annotations

import json
import tempfile
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import yaml

from dseh.config import load_config
from dseh.errors import DsehError
from dseh.pipeline_params import PARAMS


def _options(params_path: str, rounds: int | None, **kw):
    from pipelines.dseh_pipeline import PipelineOptions

    cfg = load_config(params_path)
    raw = yaml.safe_load(Path(params_path).read_text()) if Path(params_path).is_file() else {}
    # one line of JSON (valid YAML): the compiler's header comment breaks on multi-line defaults
    return PipelineOptions(params_text=json.dumps(raw or {}, sort_keys=False), rounds=rounds or cfg.train.rounds, **kw)


def compile_pipeline(params_path: str, output: str, rounds: int | None = None, **kw) -> Path:
    from kfp import compiler

    from pipelines.dseh_pipeline import build_pipeline

    opts = _options(params_path, rounds, **kw)
    compiler.Compiler().compile(build_pipeline(opts), package_path=output)
    return Path(output)


def check_host(host: str, timeout_s: float) -> None:
    """The KFP API must answer its health check within timeout_s (kfp.Client itself retries for ~25 s)."""
    url = host.rstrip("/") + "/apis/v2beta1/healthz"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            if resp.status >= 400:
                raise DsehError(f"Kubeflow Pipelines at {host} answered HTTP {resp.status} on {url}")
    except urllib.error.HTTPError as exc:
        raise DsehError(f"Kubeflow Pipelines at {host} answered HTTP {exc.code} on {url}") from exc
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise DsehError(f"Kubeflow Pipelines at {host} is unreachable ({exc})") from exc


# the pipeline parameters `--set name=value` gives by name: all but `params` (--params, baked in at
# compile time) and `overrides` (made of the other --set keys)
SETTABLE = {p.name: p for p in PARAMS if p.name not in ("params", "overrides")}


def run_arguments(sets: list[str]) -> dict:
    """`--set` for a run: pipeline parameters by name (bits=64, data_version=v3), as their types; any
    other key.sub=value becomes part of the `overrides` parameter, validated by the pipeline's first step."""
    params: dict = {}
    overrides: list[str] = []
    for s in sets:
        if "=" not in s:
            raise DsehError(f"--set '{s}' is not of the form key=value")
        key, value = s.split("=", 1)
        if key in SETTABLE:
            params[key] = SETTABLE[key].parse(value)
        else:
            overrides.append(s)
    if overrides:
        params["overrides"] = " ".join(overrides)
    return params


def _client(host: str, timeout_s: float):
    import kfp

    check_host(host, timeout_s)
    return kfp.Client(host=host)


def _upload(client, package: Path, name: str) -> tuple[str, str]:
    """(pipeline id, version id): the pipeline is uploaded once, then versioned by content hash,
    so resubmitting the same package reuses its version."""
    import hashlib

    version = f"{name}-{hashlib.sha256(package.read_bytes()).hexdigest()[:12]}"
    pid = client.get_pipeline_id(name)
    if pid is None:
        pid = client.upload_pipeline(str(package), pipeline_name=name).pipeline_id
    existing = client.list_pipeline_versions(pid, page_size=100).pipeline_versions or []
    for v in existing:
        if v.display_name == version:
            return pid, v.pipeline_version_id
    v = client.upload_pipeline_version(str(package), pipeline_version_name=version, pipeline_id=pid)
    return pid, v.pipeline_version_id


@contextmanager
def _compiled(host: str, timeout_s: float, experiment: str, params_path: str, kw: dict):
    """(kfp.Client, the experiment, the compiled package's path) for a submission."""
    client = _client(host, timeout_s)
    exp = client.create_experiment(experiment)
    with tempfile.TemporaryDirectory() as tmp:
        yield client, exp, compile_pipeline(params_path, str(Path(tmp) / "dseh_pipeline.yaml"), **kw)


def submit(
    host: str,
    params_path: str,
    experiment: str,
    sets: list[str],
    wait: bool,
    timeout_s: float,
    run_name: str | None = None,
    pipeline_name: str = "dseh",
    **kw,
) -> dict:
    """Create the experiment if needed, upload or version the pipeline, create the run."""
    with _compiled(host, timeout_s, experiment, params_path, kw) as (client, exp, package):
        pid, vid = _upload(client, package, pipeline_name)
    run = client.run_pipeline(
        experiment_id=exp.experiment_id,
        job_name=run_name or f"{pipeline_name}-run",
        params=run_arguments(sets),
        pipeline_id=pid,
        version_id=vid,
        enable_caching=kw.get("enable_caching", False),
    )
    info = {
        "run_id": run.run_id,
        "url": f"{host.rstrip('/')}/#/runs/details/{run.run_id}",
        "experiment": experiment,
        "pipeline_id": pid,
        "pipeline_version_id": vid,
    }
    if wait:
        done = client.wait_for_run_completion(run.run_id, timeout=24 * 3600)
        info["state"] = str(getattr(done, "state", ""))
    return info


def schedule(
    host: str,
    params_path: str,
    experiment: str,
    cron: str,
    sets: list[str],
    timeout_s: float,
    name: str = "dseh-scheduled",
    **kw,
) -> dict:
    with _compiled(host, timeout_s, experiment, params_path, kw) as (client, exp, package):
        job = client.create_recurring_run(
            experiment_id=exp.experiment_id,
            job_name=name,
            cron_expression=cron,
            pipeline_package_path=str(package),
            params=run_arguments(sets),
            enable_caching=kw.get("enable_caching", False),
        )
    return {"recurring_run_id": job.recurring_run_id, "cron": cron, "experiment": experiment}


def run_local(params_path: str, sets: list[str], root: str = "local_outputs", **kw) -> dict:
    """The whole pipeline under kfp.local's SubprocessRunner, in this environment."""
    from kfp import local

    from pipelines.dseh_pipeline import build_pipeline

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=root, raise_on_error=True)
    before = set(Path(root).glob("dseh-*"))
    pipeline = build_pipeline(_options(params_path, kw.pop("rounds", None), **kw))
    pipeline(**run_arguments(sets))
    (run_dir,) = set(Path(root).glob("dseh-*")) - before
    return {"run_dir": str(run_dir), "tasks": sorted(p.name for p in run_dir.iterdir() if p.is_dir())}
