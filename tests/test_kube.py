"""Multi-node training on Kubeflow: the TrainJob manifest generated from options (structure, torchrun
arguments, shared volume, secrets by reference only, owner), the job's life on the API (a Failed one
replaced, its log copied, deleted on timeout or SIGTERM, the RBAC verbs), and the ImgNet step run as
such a job against a local Kubernetes API that executes the job's command here."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import numpy as np
import pytest
import yaml

from dseh import kube, kube_jobs, storage
from dseh.cli import main
from dseh.errors import DsehError, MissingObject
from dseh.pipeline_params import POD
from tests.helpers import LEARNING, REPO, tiny_raw
from tests.k8s_fake import FakeKubernetes

STEP = ["train-imgnet", "--params", "/data/run/params.yaml", "--data", "/data/run/data", "--out", "/data/run/out"]


def opts(**kw) -> kube.JobOptions:
    base = {"name": "dseh-imgnet-r0-abc", "image": "registry.example/dseh:1.0", "nodes": 2, "gpus_per_node": 4}
    return kube.JobOptions(**{**base, "pvc_name": "nus-wide", **kw})


def test_trainjob_manifest_runs_the_step_under_torchrun_on_every_node(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-leak-me")
    m = kube.job_manifest(opts(), STEP)
    assert m["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and m["kind"] == "TrainJob"
    assert m["metadata"] == {
        "name": "dseh-imgnet-r0-abc",
        "namespace": "kubeflow",
        "labels": {"app.kubernetes.io/part-of": "dseh"},
    }
    spec = m["spec"]
    assert spec["runtimeRef"] == {
        "name": "torch-distributed",
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
    }
    t = spec["trainer"]
    assert t["image"] == "registry.example/dseh:1.0" and t["numNodes"] == 2 and t["numProcPerNode"] == 4
    assert t["command"] == ["torchrun", "--nnodes=2", "--nproc-per-node=4", "--max-restarts=0", "-m", "dseh", *STEP]
    assert t["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "4"
    # the same pod defaults as the pipeline's steps (dseh.pipeline_params.POD)
    assert t["resourcesPerNode"]["limits"]["memory"] == POD.memory and t["resourcesPerNode"]["limits"]["cpu"] == POD.cpu
    # credentials only as references to Secrets; no value from this environment is in the manifest
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in t["env"] if "valueFrom" in e}
    assert refs["AWS_SECRET_ACCESS_KEY"] == "dseh-s3" and refs["MLFLOW_TRACKING_URI"] == "dseh-mlflow"
    required = [e["name"] for e in t["env"] if "valueFrom" in e and not e["valueFrom"]["secretKeyRef"]["optional"]]
    assert required == ["MLFLOW_TRACKING_URI"]  # a missing Secret stops the node's pod, naming it
    assert "do-not-leak-me" not in json.dumps(m)
    # volumes, mounts and placement: one runtime patch of the runtime's `node` job and container
    assert "podTemplateOverrides" not in spec and spec["activeDeadlineSeconds"] == 24 * 3600
    (patch,) = spec["runtimePatches"]
    assert patch["manager"] == "dseh"
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert node["name"] == "node"
    pod = node["template"]["spec"]["template"]["spec"]
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["data"]["persistentVolumeClaim"]["claimName"] == "nus-wide"
    assert vols["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": POD.shm_size}
    (container,) = pod["containers"]
    assert container["name"] == "node" and {"name": "data", "mountPath": "/data"} in container["volumeMounts"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]


@pytest.mark.parametrize("nodes,pvc", [(1, ""), (2, "nus-wide"), (3, "nus-wide")])
def test_every_trainjob_manifest_round_trips_through_the_trainer_api_models(nodes, pvc):
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

    from dseh.pipeline_params import Placement

    placement = Placement.parse(["gpu:NoSchedule"], ["pool=a100"])
    o = opts(nodes=nodes, pvc_name=pvc, placement=placement, labels=kube.run_labels("run-1", 2), active_deadline_s=60)
    m = kube.job_manifest(o, STEP)
    # from_dict drops the fields the models lack: the round trip keeps every field of the manifest
    assert TrainerV1alpha1TrainJob.from_dict(m).to_dict() == m
    assert m["spec"]["activeDeadlineSeconds"] == 60


def test_a_trainjob_field_the_trainer_api_lacks_fails_with_its_path():
    m = kube.job_manifest(opts(), STEP)
    with pytest.raises(DsehError, match=r"does not keep: spec\.podTemplateOverrides$"):
        kube.check_trainjob({**m, "spec": {**m["spec"], "podTemplateOverrides": [{"targetJobs": [{"name": "node"}]}]}})
    patch = m["spec"]["runtimePatches"][0]
    bad = {**patch, "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [{"name": "node", "x": 1}]}}}}
    with pytest.raises(DsehError, match=r"spec\.runtimePatches\[0\]\..*replicatedJobs\[0\]\.x$"):
        kube.check_trainjob({**m, "spec": {**m["spec"], "runtimePatches": [bad]}})
    with pytest.raises(DsehError, match="does not fit the Trainer API: numNodes"):
        kube.check_trainjob({**m, "spec": {**m["spec"], "trainer": {**m["spec"]["trainer"], "numNodes": "2"}}})
    with pytest.raises(DsehError, match="deadline must be at least 1 s"):
        kube.job_manifest(opts(active_deadline_s=0), STEP)


def test_job_options_that_cannot_work_fail_with_one_clear_error():
    with pytest.raises(DsehError, match="needs a shared volume"):
        kube.job_manifest(opts(pvc_name=""), STEP)
    with pytest.raises(DsehError, match="at least 1 node"):
        kube.torchrun_args(0, 1)
    assert kube.torchrun_args(1, 4) == ["torchrun", "--nnodes=1", "--nproc-per-node=4", "--standalone"]
    assert len(kube.job_name("dseh-imgnet-r0", "x" * 300)) <= 63


def test_job_manifest_command_prints_yaml(capsys):
    assert main(["job-manifest", "--image", "img:1", "--nodes", "3", "--pvc", "p", "--", *STEP]) == 0
    m = yaml.safe_load(capsys.readouterr().out)
    assert m["kind"] == "TrainJob" and m["spec"]["trainer"]["numNodes"] == 3


def test_a_failed_job_is_reported_with_its_message_and_an_unreachable_api_is_one_error():
    with FakeKubernetes(run_jobs=False, finish_after=3, finish_as=("Failed", "node-1 OOMKilled")) as k8s:
        m = kube.job_manifest(opts(), STEP)
        k8s.jobs[m["metadata"]["name"]] = {**m, "status": {"conditions": []}}
        # a job of this name that has not failed (this very step, run again in its pod) is watched
        with pytest.raises(DsehError, match="TrainJob kubeflow/dseh-imgnet-r0-abc failed: node-1 OOMKilled"):
            kube_jobs.submit_and_wait(m, timeout_s=5, poll_s=0.05, host=k8s.url)
        assert "DELETE" not in [r["method"] for r in k8s.requests]
    with pytest.raises(DsehError, match="unreachable"):
        kube_jobs.submit_and_wait(m, timeout_s=1, poll_s=0.05, host=k8s.url)


def test_a_retried_step_replaces_the_failed_job_of_its_name_and_copies_the_new_ones_log(capsys):
    """Per-attempt names (the step's pod) keep a KFP retry off its failed job; a step run again under
    the same name (outside KFP, or a name given) deletes the Failed job and creates it anew."""
    lines = ("epoch 1/2 loss 0.91", "epoch 2/2 loss 0.52")
    with FakeKubernetes(run_jobs=False, finish_after=4, log_lines=lines) as k8s:
        m = kube.job_manifest(opts(), STEP)
        failed = {"conditions": [{"type": "Failed", "status": "True", "message": "node-1 OOMKilled"}]}
        k8s.jobs[m["metadata"]["name"]] = {**m, "status": failed}
        status = kube_jobs.submit_and_wait(m, timeout_s=10, poll_s=0.05, host=k8s.url)
        calls = [r["method"] for r in k8s.requests if "/trainjobs" in r["path"]]
    assert kube_jobs.job_state(status) == "succeeded"
    assert calls[:4] == ["POST", "GET", "DELETE", "GET"] and calls.count("POST") == 2
    out = capsys.readouterr().out
    pod = FakeKubernetes.node_pod(m["metadata"]["name"])
    # each line once, in order, though the log is read at every poll
    assert [ln for ln in out.splitlines() if ln.startswith(f"[{pod}]")] == [f"[{pod}] {ln}" for ln in lines]


def test_a_terminated_step_deletes_its_job():
    with FakeKubernetes(run_jobs=False) as k8s:
        m = kube.job_manifest(opts(), STEP)
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
        with pytest.raises(kube_jobs.Terminated, match="terminated .*dseh-imgnet-r0-abc deleted"):
            kube_jobs.submit_and_wait(m, timeout_s=30, poll_s=0.05, host=k8s.url)
        assert m["metadata"]["name"] not in k8s.jobs and k8s.requests[-1]["method"] == "DELETE"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the step's handler is put back


def test_the_job_is_owned_by_its_step_pod_in_the_same_namespace_only(monkeypatch, caplog):
    from dseh.pipeline_params import POD_NAME_ENV, POD_NAMESPACE_ENV, POD_UID_ENV

    assert kube.job_namespace("") == ("kubeflow", None)  # not in a pipeline pod
    monkeypatch.setenv(POD_NAME_ENV, "dseh-abc-system-container-impl-123")
    monkeypatch.setenv(POD_UID_ENV, "8d2f-uid")
    monkeypatch.setenv(POD_NAMESPACE_ENV, "team-a")
    ns, owner = kube.job_namespace("")
    assert ns == "team-a"
    assert owner == {"apiVersion": "v1", "kind": "Pod", "name": "dseh-abc-system-container-impl-123", "uid": "8d2f-uid"}
    m = kube.job_manifest(opts(namespace=ns, owner=owner), STEP)
    assert m["metadata"]["ownerReferences"] == [owner]  # and the Trainer API's models keep it (checked when built)
    # Kubernetes takes an owner in another namespace for absent (and deletes the job): none then
    assert kube.job_namespace("ml-jobs") == ("ml-jobs", None)
    assert "has no owner" in caplog.text


def test_job_state_reads_the_conditions():
    running = {"conditions": [{"type": "Created", "status": "True"}, {"type": "Running", "status": "True"}]}
    assert kube_jobs.job_state(running) == kube_jobs.job_state(None) == "running"
    assert kube_jobs.job_state({"conditions": [{"type": "Complete", "status": "True"}]}) == "succeeded"
    assert kube_jobs.job_state({"conditions": [{"type": "Failed", "status": "False"}]}) == "running"
    assert kube_jobs.job_state({"conditions": [{"type": "Failed", "status": "True"}]}) == "failed"


def _prepared_with_labnet(tmp_path) -> tuple[str, object]:
    """(resolved params text, the local layout's root) with prepare and LabNet round 0 run."""
    cfg = yaml.safe_dump(tiny_raw(**LEARNING))
    (tmp_path / "params.yaml").write_text(cfg)
    root = tmp_path / "local"
    args = ["--params", str(tmp_path / "params.yaml"), "--root", str(root), "-q"]
    for step in ("prepare", "train-labnet"):
        assert main([step, *args]) == 0
    return cfg, root


def test_imgnet_step_as_a_two_node_job_stages_inputs_and_returns_the_output(tmp_path, capsys):
    cfg, root = _prepared_with_labnet(tmp_path)
    shared = tmp_path / "pvc"
    o = opts(nodes=2, gpus_per_node=1, mount_path=str(shared))
    out = tmp_path / "kfp-output"
    with FakeKubernetes(env={"PYTHONPATH": str(REPO)}) as k8s:
        kube.train_imgnet_on_cluster(
            cfg, o, 0, str(root / "data"), str(root / "labnet/round0"), str(out), timeout_s=240, host=k8s.url
        )
        (post,) = [r for r in k8s.requests if r["method"] == "POST"]
    cmd = FakeKubernetes.command(post["body"])
    # the node's log (its training's log lines) is in the step's own
    node = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(f"[{FakeKubernetes.node_pod(o.name)}]")]
    assert any("imgnet round 0 epoch" in ln for ln in node), node[-5:]
    work = shared / "dseh-jobs" / o.name
    assert cmd[cmd.index("--data") + 1] == str(work / "inputs" / "data")
    assert cmd[cmd.index("--out") + 1] == str(work / "output")
    # the resume checkpoint is the pipeline run's, on the shared volume (a retry's job resumes from it)
    ckpt = cmd[cmd.index("--checkpoint") + 1]
    assert ckpt.startswith(str(shared / "dseh-checkpoints")) and not os.path.exists(ckpt)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == LEARNING["imgnet"]["epochs"][0]
    codes = np.load(out / "codes.npy")
    assert codes.shape[0] == len(np.load(root / "data/labels.npy"))
    assert not work.exists()  # the job's folder on the shared volume is removed afterwards
    assert os.listdir(tmp_path / "pvc" / "dseh-jobs") == []


def test_the_rbac_role_grants_exactly_the_calls_a_job_step_makes():
    """The Role equals CALLS, and CALLS equals the verbs used by a step that replaces a failed job,
    copies the log, overruns and deletes its job."""
    role, binding = yaml.safe_load_all((REPO / "deploy/trainer-rbac.yaml").read_text())
    granted = {
        (g, r): set(rule["verbs"]) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
    }
    assert granted == {k: set(v) for k, v in kube_jobs.CALLS.items()}
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    with FakeKubernetes(run_jobs=False, log_lines=("started",)) as k8s:
        m = kube.job_manifest(opts(), STEP)
        k8s.jobs[m["metadata"]["name"]] = {**m, "status": {"conditions": [{"type": "Failed", "status": "True"}]}}
        with pytest.raises(DsehError, match="did not finish within"):
            kube_jobs.submit_and_wait(m, timeout_s=0.3, poll_s=0.05, host=k8s.url)
    assert k8s.verbs() == granted


def test_a_retried_training_step_resumes_from_its_checkpoint_dir(tmp_path, monkeypatch, caplog):
    """A training step killed after its first epoch and run again (a new pod: a fresh output path)
    with the same checkpoint dir and pipeline run resumes there and ends with the codes of an
    uninterrupted run."""
    from dseh import artifacts, stages

    cfg, root = _prepared_with_labnet(tmp_path)
    monkeypatch.setenv("DSEH_PIPELINE_RUN", "run-7")
    ckpt_dir = tmp_path / "claim" / "dseh-checkpoints"
    ckpt = artifacts.durable_checkpoint(ckpt_dir, "run-7", "train-imgnet", 0)
    real = stages.run_phase

    def killed_after_epoch_one(phase, train_cfg, checkpoint, fp, progress=True, on_epoch=None):
        def hook(row):
            if row["epoch"] >= 1:
                raise DsehError("pod killed")

        return real(phase, train_cfg, checkpoint, fp, progress, hook)

    def step(out, checkpoint_dir):
        return kube.run_training_step(
            "train-imgnet", cfg, 0, 1, root / "data", out, labnet=root / "labnet/round0", checkpoint_dir=checkpoint_dir
        )

    with monkeypatch.context() as m:
        m.setattr(stages, "run_phase", killed_after_epoch_one)
        with pytest.raises(DsehError, match="pod killed"):
            step(tmp_path / "pod1/imgnet", ckpt_dir)
    assert ckpt.is_file() and not (tmp_path / "pod1/imgnet").exists()
    caplog.set_level("INFO")
    step(tmp_path / "pod2/imgnet", ckpt_dir)
    assert "resuming after epoch 1" in caplog.text
    assert not ckpt.exists()  # removed once the step's output is written
    step(tmp_path / "whole/imgnet", None)
    resumed, whole = (np.load(tmp_path / d / "imgnet/codes.npy") for d in ("pod2", "whole"))
    assert np.array_equal(resumed, whole)


def _wait_for_object(uri: str, timeout_s: float = 20.0) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return storage.etag(uri)
        except MissingObject:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_without_a_claim_a_retried_step_resumes_from_its_checkpoint_on_s3(tmp_path, monkeypatch, caplog, s3_env):
    """The checkpoint in pod scratch is mirrored to S3 while the step trains (a thread, every few
    seconds, and at the end); a retry in a new pod fetches it and resumes; success removes it."""
    from dseh import durable, stages

    cfg, root = _prepared_with_labnet(tmp_path)
    monkeypatch.setenv("DSEH_PIPELINE_RUN", "run-9")
    monkeypatch.setattr(durable, "MIRROR_S", 0.05)
    s3_env.client().create_bucket(Bucket="dseh-pipeline-root")
    prefix = "s3://dseh-pipeline-root/dseh-checkpoints"
    where = durable.checkpoint_location(prefix, "run-9", "train-imgnet", 0)
    assert where == f"{prefix}/run-9/train-imgnet-round0.ckpt.pt"
    real = stages.run_phase
    uploaded = []

    def killed_after_epoch_two(phase, train_cfg, checkpoint, fp, progress=True, on_epoch=None):
        def hook(row):
            if row["epoch"] == 1:  # the mirror sends the first epoch's checkpoint while training goes on
                uploaded.append(_wait_for_object(where))
            if row["epoch"] >= 2:
                raise DsehError("pod killed")

        return real(phase, train_cfg, checkpoint, fp, progress, hook)

    def step(out):
        return kube.run_training_step(
            "train-imgnet", cfg, 0, 1, root / "data", out, labnet=root / "labnet/round0", checkpoint_dir=prefix
        )

    with monkeypatch.context() as m:
        m.setattr(stages, "run_phase", killed_after_epoch_two)
        with pytest.raises(DsehError, match="pod killed"):
            step(tmp_path / "pod1/imgnet")
    assert uploaded and storage.etag(where) != uploaded[0]  # mirrored after epoch 1, and again at the end
    caplog.set_level("INFO")
    summary = step(tmp_path / "pod2/imgnet")
    assert "resuming after epoch 2" in caplog.text and summary["epochs"] == LEARNING["imgnet"]["epochs"][0]
    with pytest.raises(MissingObject):
        storage.etag(where)  # removed once the step's output is written
    # (that a resumed step ends with the codes of an uninterrupted one: the claim's test above)
