"""Training on more than one GPU: a step run under torchrun in this pod (one node, N GPUs), or as a
Kubeflow Trainer job over several nodes (TrainJob, trainer.kubeflow.org/v1alpha1, checked against the
models of kubeflow-trainer-api), with the manifest generated from the options here and the job run
through the Kubernetes API by dseh.kube_jobs.

Every node runs the project image with the same command, `torchrun ... -m dseh <step> ...`, on a
shared volume (a PersistentVolumeClaim) that holds the resolved params, the inputs and the output.
Credentials reach the pods only as references to Kubernetes Secrets.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from dseh import artifacts
from dseh.errors import DsehError
from dseh.kube_jobs import DEADLINE_S, TRAINJOB, owner_reference, submit_and_wait
from dseh.pipeline_params import CHECKPOINTS, POD, POD_NAME_ENV, Placement
from dseh.tracking import PIPELINE_ENV

log = logging.getLogger(__name__)

SECRET_KEYS = {
    "s3": ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION"),
    "mlflow": ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"),
}
PLACEHOLDER = "{{$."  # a KFP placeholder the backend left unresolved
PATCH_MANAGER = "dseh"  # the owner of the TrainJob's runtime patch (TrainerV1alpha1RuntimePatch.manager)


def torchrun_args(nodes: int, nproc_per_node: int) -> list[str]:
    """torchrun's arguments for `nodes` x `nproc_per_node` processes. On one node the rendezvous is
    local (--standalone); across nodes the node rank and the master's address come from the
    PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT variables that the Kubeflow operators set,
    which torchrun reads itself."""
    if nodes < 1 or nproc_per_node < 1:
        raise DsehError(f"need at least 1 node and 1 process per node, got {nodes} x {nproc_per_node}")
    base = ["torchrun", f"--nnodes={nodes}", f"--nproc-per-node={nproc_per_node}"]
    return base + (["--standalone"] if nodes == 1 else ["--max-restarts=0"])


def run_local(step_args: list[str], nproc: int, cwd: str | Path | None = None) -> None:
    """Run `dseh <step_args>` in this pod: directly for one process, else under torchrun over
    `nproc` local processes (one per GPU). Fails with the step's own error message."""
    if nproc <= 1:
        cmd = [sys.executable, "-m", "dseh", *step_args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", *torchrun_args(1, nproc)[1:], "-m", "dseh", *step_args]
    log.info("running %s", " ".join(cmd))
    res = subprocess.run(cmd, cwd=cwd, stderr=subprocess.PIPE, text=True)
    if res.returncode != 0:
        errors = [ln for ln in res.stderr.splitlines() if ln.startswith("dseh: error:")]
        detail = errors[-1] if errors else res.stderr.strip()[-2000:]
        raise DsehError(f"`dseh {step_args[0]}` on {nproc} process(es) failed: {detail}")


@dataclass(frozen=True)
class JobOptions:
    """What a multi-node training job asks of the cluster."""

    name: str
    image: str
    nodes: int = 2
    gpus_per_node: int = 1
    namespace: str = "kubeflow"
    runtime: str = "torch-distributed"  # the ClusterTrainingRuntime a TrainJob refers to
    pvc_name: str = ""  # the shared volume every node mounts at `mount_path`
    mount_path: str = "/data"
    gpu_resource: str = POD.accelerator
    placement: Placement = Placement()  # tolerations and node selector of every node's pod
    cpu: str = POD.cpu
    memory: str = POD.memory
    shm_size: str = POD.shm_size
    s3_secret: str = "dseh-s3"
    mlflow_secret: str = "dseh-mlflow"
    labels: tuple[tuple[str, str], ...] = ()  # more labels of the job (its pipeline run and round)
    active_deadline_s: int = DEADLINE_S  # the cluster fails the job after this long (activeDeadlineSeconds)
    owner: dict | None = None  # an ownerReference (the launching pod): the job is deleted with its owner


def _env(opts: JobOptions) -> list[dict]:
    env = [{"name": "PYTHONUNBUFFERED", "value": "1"}]
    if os.environ.get(PIPELINE_ENV):  # the job's MLflow runs nest under the pipeline run's
        env.append({"name": PIPELINE_ENV, "value": os.environ[PIPELINE_ENV]})
    for kind, secret in (("s3", opts.s3_secret), ("mlflow", opts.mlflow_secret)):
        for key in SECRET_KEYS[kind]:
            # as in the pipeline's steps: the tracking URI is required (no throw-away store in a pod)
            ref = {"name": secret, "key": key, "optional": key != "MLFLOW_TRACKING_URI"}
            env.append({"name": key, "valueFrom": {"secretKeyRef": ref}})
    return env


def _volumes(opts: JobOptions) -> tuple[list[dict], list[dict]]:
    volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": opts.shm_size}}]
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]
    if opts.pvc_name:
        volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": opts.pvc_name}})
        mounts.append({"name": "data", "mountPath": opts.mount_path})
    return volumes, mounts


def _scheduling(opts: JobOptions) -> dict:
    """The pod spec fields that place every node's pod on a GPU node."""
    spec: dict = {}
    if opts.placement.tolerations:
        spec["tolerations"] = [dict(t) for t in opts.placement.tolerations]
    if opts.placement.node_selector:
        spec["nodeSelector"] = dict(opts.placement.node_selector)
    return spec


def _trainjob_spec(opts: JobOptions, command: list[str], resources: dict, volumes: list, mounts: list) -> dict:
    """A TrainJob's spec in the API of kubeflow-trainer-api 2.3.0: the trainer's container through
    `trainer`; the volumes, their mounts and the placement of every node's pod as one runtime patch
    (TrainerV1alpha1RuntimePatch) of the runtime's `node` job and container; and a deadline after
    which the Trainer fails the job, so that no job outlives its step."""
    group, _, _ = TRAINJOB
    pod = {"containers": [{"name": "node", "volumeMounts": mounts}], **_scheduling(opts), "volumes": volumes}
    node = {"name": "node", "template": {"spec": {"template": {"spec": pod}}}}
    return {
        "activeDeadlineSeconds": opts.active_deadline_s,
        "runtimePatches": [
            {"manager": PATCH_MANAGER, "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [node]}}}}
        ],
        "runtimeRef": {"name": opts.runtime, "apiGroup": group, "kind": "ClusterTrainingRuntime"},
        "trainer": {
            "image": opts.image,
            "command": command,
            "numNodes": opts.nodes,
            "numProcPerNode": opts.gpus_per_node,
            "resourcesPerNode": resources,
            "env": _env(opts),
        },
    }


def _first_difference(sent, kept, path: str = "") -> str | None:
    """The dotted path of the first field where `kept` differs from `sent` (None if they are equal)."""
    if isinstance(sent, dict) and isinstance(kept, dict):
        for key in sorted(sent.keys() | kept.keys()):
            where = f"{path}.{key}" if path else key
            if key not in sent or key not in kept:
                return where
            if (found := _first_difference(sent[key], kept[key], where)) is not None:
                return found
        return None
    if isinstance(sent, list) and isinstance(kept, list) and len(sent) == len(kept):
        for i, (a, b) in enumerate(zip(sent, kept)):
            if (found := _first_difference(a, b, f"{path}[{i}]")) is not None:
                return found
        return None
    return None if sent == kept else path or "(the manifest)"


def check_trainjob(manifest: dict) -> dict:
    """The manifest, if the TrainJob models of kubeflow-trainer-api (the CRD's schema) keep every
    field of it: a field the API does not have would be pruned by the API server, so it fails here,
    with its path, when the job is built."""
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob
    from pydantic import ValidationError

    try:
        kept = TrainerV1alpha1TrainJob.from_dict(manifest).to_dict()
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        raise DsehError(f"the TrainJob does not fit the Trainer API: {field}: {err['msg']}") from exc
    if (field := _first_difference(manifest, kept)) is not None:
        raise DsehError(f"the TrainJob has a field the Trainer API does not keep: {field}")
    return manifest


def job_manifest(opts: JobOptions, step_args: list[str]) -> dict:
    """The TrainJob that runs `torchrun ... -m dseh <step_args>` on every node, owned by opts.owner."""
    if opts.nodes > 1 and not opts.pvc_name:
        raise DsehError("a training job over several nodes needs a shared volume: give a PersistentVolumeClaim")
    if opts.active_deadline_s < 1:
        raise DsehError(f"the job's deadline must be at least 1 s, got {opts.active_deadline_s}")
    command = [*torchrun_args(opts.nodes, opts.gpus_per_node), "-m", "dseh", *step_args]
    resources = {
        "limits": {opts.gpu_resource: str(opts.gpus_per_node), "cpu": opts.cpu, "memory": opts.memory},
        "requests": {opts.gpu_resource: str(opts.gpus_per_node), "cpu": opts.cpu, "memory": opts.memory},
    }
    volumes, mounts = _volumes(opts)
    labels = {"app.kubernetes.io/part-of": "dseh", **dict(opts.labels)}
    meta = {"name": opts.name, "namespace": opts.namespace, "labels": labels}
    if opts.owner:
        meta["ownerReferences"] = [dict(opts.owner)]
    group, version, _ = TRAINJOB
    return check_trainjob(
        {
            "apiVersion": f"{group}/{version}",
            "kind": "TrainJob",
            "metadata": meta,
            "spec": _trainjob_spec(opts, command, resources, volumes, mounts),
        }
    )


def job_namespace(namespace: str) -> tuple[str, dict | None]:
    """(the namespace of a step's Trainer job, its ownerReference): `namespace`, else the step pod's own
    (a multi-user profile's namespace), else kubeflow. The job is owned by the step's pod when both
    are in one namespace: Kubernetes allows no owner in another namespace (it would take the owner
    for absent and delete the job at once); elsewhere only the deadline and the step end it."""
    owner = owner_reference()
    pod_ns = owner[1] if owner else ""
    ns = namespace or pod_ns or "kubeflow"
    if owner and pod_ns == ns:
        return ns, owner[0]
    if owner:
        log.warning("the Trainer job runs in %s, not in its step's namespace %s: it has no owner", ns, pod_ns)
    return ns, None


def job_name(prefix: str, *parts: str) -> str:
    """A DNS-1123 name (at most 63 characters) for a step of a pipeline run: the prefix and a hash
    of the parts (the run id, the attempt)."""
    import hashlib

    safe = "".join(ch if ch.isalnum() else "-" for ch in prefix.lower()).strip("-")[:40]
    return f"{safe}-{hashlib.sha256('/'.join(parts).encode()).hexdigest()[:12]}"


def enter_pipeline_run(run_id: str) -> str:
    """A Kubeflow step joins its pipeline run: DSEH_PIPELINE_RUN set to the run's id (the component's
    `run_id` input, from dsl.PIPELINE_JOB_ID_PLACEHOLDER), so every step's MLflow run nests under
    the run's one parent run, and the Trainer jobs it starts carry it on. An empty or unresolved id
    leaves the variable as it is (tracking then keys the parent run by dataset and config)."""
    if run_id and PLACEHOLDER not in run_id:
        os.environ[PIPELINE_ENV] = run_id
    else:
        log.warning("no pipeline run id (got %r): the MLflow parent run is keyed by dataset and config", run_id)
    return env_pipeline_run()


def env_pipeline_run() -> str:
    return os.environ.get(PIPELINE_ENV, "") or f"local-{os.getpid()}-{int(time.time())}"


def run_labels(run_id: str, round_index: int) -> tuple[tuple[str, str], ...]:
    """The labels that find a pipeline run's Trainer jobs (kubectl get trainjobs -l dseh/pipeline-run=ID)."""
    value = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in run_id)[:63].strip("-_.")
    return (("dseh/pipeline-run", value), ("dseh/round", str(round_index)))


def attempt_id() -> str:
    """This attempt of a step: its pod's name (DSEH_POD_NAME; each retry of a KFP step is a new pod),
    else this host and process."""
    return os.environ.get(POD_NAME_ENV, "") or f"{socket.gethostname()}-{os.getpid()}"


def train_imgnet_on_cluster(
    config_text: str,
    opts: JobOptions,
    round_index: int,
    data_dir: str,
    labnet_dir: str | None,
    out_dir: str,
    prev_imgnet: str | None = None,
    timeout_s: float = DEADLINE_S,
    host: str | None = None,
) -> dict:
    """The ImgNet step as a multi-node job: stage the resolved params and the inputs on the shared
    volume (mounted here at opts.mount_path), run the job, copy its output to `out_dir`, and remove
    the job's folder, whether the job succeeded or not; returns the step's summary. The job's name
    is the attempt's (a retried step runs a job and a folder of its own); its resume checkpoint is
    the pipeline run's, on the shared volume under CHECKPOINTS, so the retry's job resumes."""
    import shutil

    from dseh.storage import copy_dir

    work = Path(opts.mount_path) / "dseh-jobs" / opts.name
    args = ["train-imgnet", "--params", str(work / "params.yaml"), "--round", str(round_index), "-q"]
    ckpt = artifacts.durable_checkpoint(
        Path(opts.mount_path) / CHECKPOINTS, env_pipeline_run(), "train-imgnet", round_index
    )
    args += ["--checkpoint", str(ckpt)]
    try:
        (work / "inputs").mkdir(parents=True, exist_ok=True)
        (work / "params.yaml").write_text(config_text)
        for flag, src in (("--data", data_dir), ("--labnet", labnet_dir), ("--prev-imgnet", prev_imgnet)):
            if src:
                copy_dir(src, work / "inputs" / flag.strip("-"))
                args += [flag, str(work / "inputs" / flag.strip("-"))]
        args += ["--out", str(work / "output")]
        submit_and_wait(job_manifest(opts, args), timeout_s=timeout_s, host=host)
        copy_dir(work / "output", out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return artifacts.read_json(Path(out_dir) / artifacts.SUMMARY)


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
    checkpoint_dir: str | Path | None = None,
) -> dict:
    """A training step (train-labnet or train-imgnet) from resolved params text, as a Kubeflow
    component runs it: in this process for one GPU, else data-parallel under torchrun with one
    process per GPU (rank 0 writes the output). Returns the step's summary. With `checkpoint_dir`
    (a folder on the claim, or an s3:// prefix, that outlives the pod) the resume checkpoint lives
    there, keyed by the pipeline run, step and round (dseh.durable): a retried step resumes."""
    import tempfile
    from contextlib import nullcontext

    from dseh import durable, stages
    from dseh.config import from_yaml_text

    cfg = from_yaml_text(config_text)
    durable_ckpt = nullcontext(None)
    if checkpoint_dir:
        where = durable.checkpoint_location(checkpoint_dir, env_pipeline_run(), step, round_index)
        log.info("%s round %d: resume checkpoint at %s", step, round_index, where)
        durable_ckpt = durable.local_checkpoint(where)
    with durable_ckpt as ckpt:
        if gpus <= 1:
            if step == "train-labnet":
                return stages.train_labnet(
                    cfg, data_dir, round_index, out_dir, prev_labnet, prev_imgnet, progress=False, checkpoint=ckpt
                )
            return stages.train_imgnet(
                cfg, data_dir, round_index, labnet, out_dir, prev_imgnet, progress=False, checkpoint=ckpt
            )
        with tempfile.TemporaryDirectory() as tmp:
            params = Path(tmp) / "params.yaml"
            params.write_text(config_text)
            args = [step, "--params", str(params), "--round", str(round_index), "--data", str(data_dir), "-q"]
            pairs = (("--labnet", labnet), ("--prev-labnet", prev_labnet), ("--prev-imgnet", prev_imgnet))
            for flag, path in (*pairs, ("--checkpoint", ckpt)):
                if path:
                    args += [flag, str(path)]
            run_local([*args, "--out", str(out_dir)], gpus, cwd=tmp)
    return artifacts.read_json(Path(out_dir) / artifacts.SUMMARY)
