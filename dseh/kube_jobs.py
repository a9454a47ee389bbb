"""A Kubeflow Trainer job's life on the Kubernetes API, as the pipeline step that starts it sees it:
created (owned by the step's pod), a Failed job of the same name replaced, watched with its first
node's log copied into the step's log, deleted when the step gives up or is terminated. CALLS is
every API call made here: the Role in deploy/trainer-rbac.yaml grants exactly these verbs."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

from dseh.errors import DsehError
from dseh.pipeline_params import POD_NAME_ENV, POD_NAMESPACE_ENV, POD_UID_ENV

log = logging.getLogger(__name__)

TRAINJOB = ("trainer.kubeflow.org", "v1alpha1", "trainjobs")
# (API group, resource) -> the verbs this module uses on it: what the Role must grant, no more
CALLS = {
    ("trainer.kubeflow.org", "trainjobs"): ("create", "delete", "get"),
    ("", "pods"): ("list",),
    ("", "pods/log"): ("get",),
}
DEADLINE_S = 24 * 3600  # a job's activeDeadlineSeconds, and how long its step waits for it
REQUEST_S = 30.0  # each call to the API server
GONE_S = 120.0  # how long a Failed job being replaced may take to disappear
# the pod of a TrainJob's first node: the Trainer runs a JobSet of the job's name, its `node` job indexed
NODE_POD = (
    "jobset.sigs.k8s.io/jobset-name={name},jobset.sigs.k8s.io/replicatedjob-name=node,"
    "batch.kubernetes.io/job-completion-index=0"
)
NODE_CONTAINER = "node"


def owner_reference() -> tuple[dict, str] | None:
    """(the ownerReference to this step's pod, the pod's namespace), from the downward API variables
    the pipeline sets (name, uid, namespace); None outside a pipeline pod. The garbage collector
    deletes an owned job with its pod."""
    name, uid = os.environ.get(POD_NAME_ENV, ""), os.environ.get(POD_UID_ENV, "")
    if not (name and uid):
        return None
    return {"apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid}, os.environ.get(POD_NAMESPACE_ENV, "")


def job_state(status: dict | None) -> str:
    """'succeeded', 'failed' or 'running' from a TrainJob's status conditions."""
    for cond in (status or {}).get("conditions", []):
        if cond.get("status") != "True":
            continue
        if cond.get("type") == "Complete":
            return "succeeded"
        if cond.get("type") == "Failed":
            return "failed"
    return "running"


def _failure(status: dict | None) -> str:
    msgs = [c.get("message", "") for c in (status or {}).get("conditions", []) if c.get("type") == "Failed"]
    return "; ".join(m for m in msgs if m) or "no message"


def _apis(host: str | None = None):
    """(CustomObjectsApi, CoreV1Api): in-cluster credentials in a pod, else the local kubeconfig;
    `host` for a given API server (tests use a loopback one)."""
    from kubernetes import client, config

    if host:
        cfg = client.Configuration()
        cfg.host = host
        api = client.ApiClient(cfg)
        return client.CustomObjectsApi(api), client.CoreV1Api(api)
    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except (config.ConfigException, FileNotFoundError) as exc:
            raise DsehError(f"no Kubernetes credentials: not in a pod and no kubeconfig ({exc})") from exc
    return client.CustomObjectsApi(), client.CoreV1Api()


def _ts_key(stamp: str) -> tuple[str, str]:
    """An RFC 3339 timestamp (the API trims the fraction's trailing zeros) as a key that sorts by time."""
    whole, _, frac = stamp.rstrip("Z").partition(".")
    return whole, frac.ljust(9, "0")


class NodeLog:
    """Copies the new lines of the first node's log to `out`, each time `copy` is called. Reading the
    log is best effort: a pod not yet there or not yet started is tried again at the next call."""

    def __init__(self, core, namespace: str, job: str, out: TextIO):
        self.core, self.ns, self.job, self.out = core, namespace, job, out
        self.last: tuple[str, str] = ("", "")
        self.at_last: set[str] = set()  # the lines of the last timestamp already copied
        self.read_at = 0.0

    def copy(self) -> int:
        """Copy the lines written since the last call; how many."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            pods = self.core.list_namespaced_pod(
                self.ns, label_selector=NODE_POD.format(name=self.job), _request_timeout=REQUEST_S
            ).items
            if not pods:
                return 0
            pod = max(pods, key=lambda p: str(p.metadata.creation_timestamp or "")).metadata.name
            since = {"since_seconds": int(time.time() - self.read_at) + 10} if self.read_at else {}
            now = time.time()
            resp = self.core.read_namespaced_pod_log(
                pod, self.ns, container=NODE_CONTAINER, timestamps=True, _preload_content=False,
                _request_timeout=REQUEST_S, **since,
            )  # fmt: skip
            text = resp.data.decode(errors="replace")
        except (ApiException, HTTPError, OSError) as exc:
            log.debug("the log of %s is not readable yet: %s", self.job, exc)
            return 0
        self.read_at = now
        return self._write(pod, text)

    def _write(self, pod: str, text: str) -> int:
        copied = 0
        for line in text.splitlines():
            stamp, _, msg = line.partition(" ")
            key = _ts_key(stamp)
            if key < self.last or (key == self.last and line in self.at_last):
                continue
            if key > self.last:
                self.last, self.at_last = key, set()
            self.at_last.add(line)
            self.out.write(f"[{pod}] {msg}\n")
            copied += 1
        self.out.flush()
        return copied


class Terminated(DsehError):
    """The step's pod was told to stop (SIGTERM: the pipeline run was terminated)."""


@contextmanager
def _terminable() -> Iterator[None]:
    """SIGTERM raises Terminated in the block (in the main thread; elsewhere nothing changes)."""

    def stop(signum, frame):
        raise Terminated("the step was terminated (SIGTERM)")

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _create(api, manifest: dict, where: str, poll_s: float) -> None:
    """Create the job. A job of its name already there is watched, unless it has Failed (a retried
    step run again under its name): that one is deleted, and the job created anew once it is gone."""
    from kubernetes.client.exceptions import ApiException

    group, version, plural = TRAINJOB
    ns, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
    try:
        api.create_namespaced_custom_object(group, version, ns, plural, manifest, _request_timeout=REQUEST_S)
        log.info("created %s", where)
        return
    except ApiException as exc:
        if exc.status != 409:
            raise DsehError(f"could not create {where}: {exc.status} {exc.reason}: {exc.body}") from exc
    old = api.get_namespaced_custom_object(group, version, ns, plural, name, _request_timeout=REQUEST_S)
    if job_state(old.get("status")) != "failed":
        log.info("%s exists already: watching it", where)
        return
    log.info("%s failed before (%s): deleting it and starting it again", where, _failure(old.get("status")))
    _delete(api, ns, name)
    gone = time.monotonic() + GONE_S
    while True:
        try:
            api.get_namespaced_custom_object(group, version, ns, plural, name, _request_timeout=REQUEST_S)
        except ApiException as exc:
            if exc.status == 404:
                break
            raise
        if time.monotonic() > gone:
            raise DsehError(f"the failed {where} was not gone {GONE_S:.0f} s after it was deleted")
        time.sleep(poll_s)
    api.create_namespaced_custom_object(group, version, ns, plural, manifest, _request_timeout=REQUEST_S)
    log.info("created %s again", where)


def _delete(api, ns: str, name: str) -> str:
    """Delete the job and its pods; what happened, in words."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    group, version, plural = TRAINJOB
    try:
        body = {"propagationPolicy": "Background"}
        api.delete_namespaced_custom_object(group, version, ns, plural, name, body=body, _request_timeout=REQUEST_S)
        return "deleted"
    except (ApiException, HTTPError) as exc:
        return f"could not be deleted ({exc})"


def submit_and_wait(
    manifest: dict,
    timeout_s: float = DEADLINE_S,
    poll_s: float = 15.0,
    host: str | None = None,
    out: TextIO | None = None,
) -> dict:
    """Create the TrainJob (see _create) and wait until it succeeds (returns its status) or fails
    (one error with its message), copying its first node's log to `out` (this step's stdout) as it
    goes. A job that has not finished within timeout_s, or whose step is terminated, is deleted, so
    that it holds no GPUs after its step has ended."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    group, version, plural = TRAINJOB
    ns, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
    where = f"{manifest['kind']} {ns}/{name}"
    api, core = _apis(host)
    node_log = NodeLog(core, ns, name, out or sys.stdout)
    deadline = time.monotonic() + timeout_s
    with _terminable():
        try:
            try:
                _create(api, manifest, where, poll_s)
            except (ApiException, HTTPError) as exc:
                raise DsehError(f"the Kubernetes API is unreachable or refused {where}: {exc}") from exc
            while True:
                try:
                    obj = api.get_namespaced_custom_object(group, version, ns, plural, name, _request_timeout=REQUEST_S)
                except (ApiException, HTTPError) as exc:
                    raise DsehError(f"could not read {where}: {exc}") from exc
                state = job_state(obj.get("status"))
                node_log.copy()
                if state == "succeeded":
                    return obj.get("status", {})
                if state == "failed":
                    raise DsehError(f"{where} failed: {_failure(obj.get('status'))}")
                if time.monotonic() > deadline:
                    raise DsehError(
                        f"{where} did not finish within {timeout_s:.0f} s; the job {_delete(api, ns, name)}"
                    )
                time.sleep(poll_s)
        except Terminated as exc:
            raise Terminated(f"{exc}; {where} {_delete(api, ns, name)}") from None
