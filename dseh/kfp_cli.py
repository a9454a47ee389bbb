"""`dseh pipeline ...`: compile the Kubeflow pipeline, submit or schedule it on a cluster through
kfp.Client, or run it whole on this machine under kfp.local (no cluster, no Docker)."""

from __future__ import annotations

import json
import os
import secrets
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from dseh.config import load_config
from dseh.errors import DsehError
from dseh.pipeline_params import PARAMS, TYPED, Placement, overrides_for

POLL_S = 15.0  # how often `submit --wait` asks for the run's state
WAIT_S = 7 * 24 * 3600.0  # how long it waits at most
FINAL = ("SUCCEEDED", "FAILED", "ERROR", "CANCELED", "SKIPPED")  # the run states that end a run
TOKEN_ENV = "DSEH_KFP_TOKEN"  # a bearer token for the KFP API (e.g. `kubectl create token ...`)
TOKEN_PATH_ENV = "KF_PIPELINES_SA_TOKEN_PATH"  # a file holding one (kfp's name: a projected SA token in a pod)
COOKIES_ENV = "DSEH_KFP_COOKIES"  # a Cookie header for the KFP API (e.g. authservice_session=... of a Dex login)


@dataclass(frozen=True)
class Endpoint:
    """Where a KFP API is and how long it may take to answer; `namespace` is the Kubeflow profile
    (multi-user Kubeflow) the experiment and runs belong to. Credentials come from the environment
    only (TOKEN_ENV, TOKEN_PATH_ENV, COOKIES_ENV), never from the command line, and are never logged."""

    host: str
    timeout_s: float = 10.0
    namespace: str | None = None

    def credentials(self) -> tuple[str | None, str | None]:
        """(bearer token, cookies) from the environment; a token file that cannot be read is an error."""
        token = os.environ.get(TOKEN_ENV) or None
        path = os.environ.get(TOKEN_PATH_ENV)
        if not token and path:
            try:
                token = Path(path).read_text().strip() or None
            except OSError as exc:
                raise DsehError(f"{TOKEN_PATH_ENV}={path}: the token file cannot be read ({exc.strerror})") from None
        return token, os.environ.get(COOKIES_ENV) or None

    def headers(self) -> dict[str, str]:
        """The credentials as HTTP headers, the way kfp.Client sends them."""
        token, cookies = self.credentials()
        return {**({"Authorization": f"Bearer {token}"} if token else {}), **({"Cookie": cookies} if cookies else {})}


def _options(params_path: str, rounds: int | None, image: str | None = None, placement=(), **kw):
    """PipelineOptions from the params file and the CLI's options; `placement` as (tolerations, node selector)
    texts; the image is --image, else DSEH_IMAGE, else the components' placeholder."""
    from components.dseh_components import DEFAULT_IMAGE
    from pipelines.dseh_pipeline import PipelineOptions

    cfg = load_config(params_path)
    raw = yaml.safe_load(Path(params_path).read_text()) if Path(params_path).is_file() else {}
    return PipelineOptions(
        # one line of JSON (valid YAML): the compiler's header comment breaks on multi-line defaults
        params_text=json.dumps(raw or {}, sort_keys=False),
        rounds=rounds or cfg.train.rounds,
        image=image or os.environ.get("DSEH_IMAGE") or DEFAULT_IMAGE,
        placement=Placement.parse(*placement) if placement else Placement(),
        **kw,
    )


def compile_pipeline(params_path: str, output: str, rounds: int | None = None, **kw) -> Path:
    """Compile the pipeline for a cluster: it must name a real image, not the components' placeholder."""
    from kfp import compiler

    from components.dseh_components import DEFAULT_IMAGE
    from pipelines.dseh_pipeline import build_pipeline

    opts = _options(params_path, rounds, **kw)
    if opts.image == DEFAULT_IMAGE:
        raise DsehError(
            f"{DEFAULT_IMAGE} is a placeholder: build and push the project image (scripts/build_image.sh) and "
            "name it with --image or DSEH_IMAGE"
        )
    compiler.Compiler().compile(build_pipeline(opts), package_path=output)
    return Path(output)


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects, remembering where they led (to a login page, usually)."""

    last = ""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.last = newurl
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def check_host(where: Endpoint) -> None:
    """The KFP API must answer its health check within the endpoint's timeout (kfp.Client itself
    retries for ~25 s), with JSON: a redirect to a login page (or a page of HTML) means the endpoint
    wants credentials, or other ones than those given."""
    host, timeout_s = where.host, where.timeout_s
    url = host.rstrip("/") + "/apis/v2beta1/healthz"
    auth = f"Kubeflow Pipelines at {host}: authentication required"
    if where.headers():
        auth += f" (the credentials given in {TOKEN_ENV}, {TOKEN_PATH_ENV} or {COOKIES_ENV} were not accepted)"
    redirects = _Redirects()
    try:
        request = urllib.request.Request(url, headers=where.headers())
        with urllib.request.build_opener(redirects).open(request, timeout=timeout_s) as resp:
            kind, body = resp.headers.get_content_type(), resp.read(65536)
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403) or 300 <= exc.code < 400:
            where = exc.headers.get("Location")
            raise DsehError(f"{auth} (HTTP {exc.code} on {url}{f', to {where}' if where else ''})") from exc
        raise DsehError(f"Kubeflow Pipelines at {host} answered HTTP {exc.code} on {url}") from exc
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise DsehError(f"Kubeflow Pipelines at {host} is unreachable ({exc})") from exc
    via = f"was redirected to {redirects.last}" if redirects.last else "answered"
    if kind == "text/html":  # a login page (Dex, oauth2-proxy, a cloud identity proxy)
        raise DsehError(f"{auth} ({url} {via} with an HTML page, not the KFP API)")
    try:
        json.loads(body)
    except ValueError:
        raise DsehError(f"Kubeflow Pipelines at {host}: {url} {via} with {kind}, not the KFP API's JSON") from None


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


def with_data_version(params_path: str, arguments: dict, root: str | Path = ".") -> dict:
    """The run's arguments with `data_version` computed (dseh.data_version) from the data the run will
    read (params.yaml with the run's parameters and overrides) when it was not given."""
    from dseh.data_version import data_version

    if arguments.get("data_version"):
        return arguments
    typed = {p.name: arguments.get(p.name, p.default) for p in TYPED}
    cfg = load_config(params_path, overrides_for(typed) + arguments.get("overrides", "").split())
    return {**arguments, "data_version": data_version(cfg.data, root)}


def _client(where: Endpoint):
    import kfp

    check_host(where)
    token, cookies = where.credentials()
    return kfp.Client(host=where.host, namespace=where.namespace or "kubeflow", existing_token=token, cookies=cookies)


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
def _published(where: Endpoint, experiment: str, params_path: str, pipeline_name: str, kw: dict):
    """(kfp.Client, the experiment, (pipeline id, version id)): the pipeline compiled here (options
    and image checked before the cluster is asked anything), then uploaded or versioned on it (a
    shared pipeline); the experiment in the endpoint's namespace. What the KFP API refuses, here or
    in the block, is one error with its answer."""
    from kfp_server_api.exceptions import ApiException

    host = where.host
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(params_path, str(Path(tmp) / "dseh_pipeline.yaml"), **kw)
        client = _client(where)
        try:
            exp = client.create_experiment(experiment, namespace=where.namespace)
            yield client, exp, _upload(client, package, pipeline_name)
        except ApiException as exc:
            body = exc.body.decode(errors="replace") if isinstance(exc.body, bytes) else exc.body
            raise DsehError(f"Kubeflow Pipelines at {host} answered HTTP {exc.status} {exc.reason}: {body}") from exc


def unique_run_name(pipeline_name: str = "dseh") -> str:
    """A run name of its own for each submission: the pipeline's name, the time and a random tag."""
    return f"{pipeline_name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def wait_for_run(client, run_id: str, url: str, timeout_s: float = WAIT_S) -> str:
    """Poll the run until it ends; its state when SUCCEEDED, else one error naming the state and the
    run's page. (kfp.Client.wait_for_run_completion would wait on past a CANCELED run.)"""
    deadline = time.monotonic() + timeout_s
    while True:
        run = client.get_run(run_id)
        state = str(run.state or "RUNTIME_STATE_UNSPECIFIED").upper()
        if state == "SUCCEEDED":
            return state
        if state in FINAL:
            why = f": {run.error.message}" if run.error is not None and run.error.message else ""
            raise DsehError(f"Kubeflow Pipelines run {run_id} ended {state}{why}; see {url}")
        if time.monotonic() > deadline:
            raise DsehError(f"Kubeflow Pipelines run {run_id} is still {state} after {timeout_s:.0f} s; see {url}")
        time.sleep(POLL_S)


def submit(
    where: Endpoint,
    params_path: str,
    experiment: str,
    sets: list[str],
    wait: bool,
    run_name: str | None = None,
    pipeline_name: str = "dseh",
    **kw,
) -> dict:
    """Create the experiment if needed, upload or version the pipeline, create a run of that version.
    Caching is the compiled pipeline's, task by task (--enable-caching: the data steps only); kfp's
    run-level enable_caching would override every task, resolve-config and promote included. The
    run's data_version is computed from its data unless given (with_data_version)."""
    arguments = with_data_version(params_path, run_arguments(sets), Path(params_path).parent)
    with _published(where, experiment, params_path, pipeline_name, kw) as (client, exp, (pid, vid)):
        run = client.run_pipeline(
            experiment_id=exp.experiment_id,
            job_name=run_name or unique_run_name(pipeline_name),
            params=arguments,
            pipeline_id=pid,
            version_id=vid,
        )
        url = f"{where.host.rstrip('/')}/#/runs/details/{run.run_id}"
        info = {
            "run_id": run.run_id,
            "run_name": run.display_name,
            "url": url,
            "experiment": experiment,
            "pipeline_id": pid,
            "pipeline_version_id": vid,
            "data_version": arguments["data_version"],
        }
        if wait:
            info["state"] = wait_for_run(client, run.run_id, url)
    return info


def schedule(
    where: Endpoint,
    params_path: str,
    experiment: str,
    cron: str,
    sets: list[str],
    name: str = "dseh-scheduled",
    catchup: bool = False,
    pipeline_name: str = "dseh",
    **kw,
) -> dict:
    """A recurring run of the uploaded, versioned pipeline (the version this package is); missed
    intervals are not run afterwards unless `catchup`. Its runs read data that changes between them,
    so no data_version is computed once here: with caching on, one must be given."""
    if kw.get("enable_caching") and not run_arguments(sets).get("data_version"):
        raise DsehError(
            "a schedule with --enable-caching needs -S data_version=...: its runs would otherwise share the "
            "one computed now and reuse the steps of data that has since changed"
        )
    with _published(where, experiment, params_path, pipeline_name, kw) as (client, exp, (pid, vid)):
        job = client.create_recurring_run(
            experiment_id=exp.experiment_id,
            job_name=name,
            cron_expression=cron,
            pipeline_id=pid,
            version_id=vid,
            params=run_arguments(sets),
            no_catchup=not catchup,
        )
    return {
        "recurring_run_id": job.recurring_run_id,
        "cron": cron,
        "experiment": experiment,
        "pipeline_id": pid,
        "pipeline_version_id": vid,
        "catchup": catchup,
    }


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
