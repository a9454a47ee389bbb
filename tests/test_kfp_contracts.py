"""The Kubeflow side against the real APIs: the run id reaches every step as a task input (the only
place the KFP backend resolves placeholders), `submit --wait` fails with the run, runs are named
uniquely, schedules run the uploaded version, caching spares resolve-config and promote, the
placeholder image is refused, a login page is not a healthy API, and the GPU pods are placed as
asked. Submissions go through the real kfp.Client to tests.kfp_fake, which reads every body with
the kfp_server_api models."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from dseh import kfp_cli, kube
from dseh.cli import main
from dseh.errors import DsehError
from dseh.pipeline_params import POD_NAME_ENV, POD_NAMESPACE_ENV, POD_UID_ENV, Placement, toleration
from dseh.tracking import PIPELINE_ENV
from tests.k8s_fake import FakeKubernetes
from tests.kfp_fake import FakeKfp, parse_body

REPO = Path(__file__).resolve().parents[1]
PARAMS = str(REPO / "params.yaml")
IMAGE = "registry.example/dseh:1.4"
RUN_ID = "{{$.pipeline_job_uuid}}"
GPU_STEPS = ("prepare", "train-labnet", "train-imgnet", "evaluate", "map-table")


@pytest.fixture(autouse=True)
def pipeline_run_restored(monkeypatch):
    """The components set DSEH_PIPELINE_RUN in os.environ themselves: it is put back as it was after each test."""
    monkeypatch.setenv(PIPELINE_ENV, "before the test")
    monkeypatch.delenv(PIPELINE_ENV)


def compile_ir(tmp_path, *extra) -> dict:
    out = tmp_path / "p.yaml"
    assert main(["pipeline", "compile", "--params", PARAMS, "-o", str(out), "--image", IMAGE, *extra]) == 0
    docs = list(yaml.safe_load_all(out.read_text()))
    spec = docs[0]
    return {
        "spec": spec,
        "tasks": spec["root"]["dag"]["tasks"],
        "executors": spec["deploymentSpec"]["executors"],
        "kube": docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if len(docs) > 1 else {},
    }


def executor(ir: dict, task: str) -> str:
    return ir["tasks"][task]["componentRef"]["name"].replace("comp-", "exec-")


def gpus(ir: dict, task: str) -> tuple[str, str] | None:
    """(resource type, count) the task's container asks for, or None."""
    acc = ir["executors"][executor(ir, task)]["container"].get("resources", {}).get("accelerator")
    return (acc["resourceType"], acc["resourceCount"]) if acc else None


def submit_args(kfp, *extra) -> list[str]:
    return ["pipeline", "submit", "--host", kfp.url, "--params", PARAMS, "--image", IMAGE, *extra]


# --------------------------------------------------------------------------- 1. run identity


@pytest.mark.parametrize("extra", [(), ("--nodes", "2", "--pvc", "nus")])
def test_the_run_id_is_a_task_input_of_every_step_and_in_no_env(tmp_path, extra):
    ir = compile_ir(tmp_path, "--rounds", "2", *extra)
    for name, body in ir["executors"].items():
        env = body["container"].get("env", [])
        assert not [e for e in env if "{{$." in json.dumps(e)], name  # the backend would pass it on literally
    assert "{{$." not in json.dumps(ir["kube"])  # nor in the pods' platform settings (secrets, field paths)
    steps = [t for t in ir["tasks"] if t != "resolve-config"]
    assert len(steps) == 2 * 2 + 4
    for task in steps:
        assert ir["tasks"][task]["inputs"]["parameters"]["run_id"] == {"runtimeValue": {"constant": RUN_ID}}, task
        comp = ir["spec"]["components"][ir["tasks"][task]["componentRef"]["name"]]
        assert comp["inputDefinitions"]["parameters"]["run_id"]["parameterType"] == "STRING"
    if extra:  # the Trainer job's launcher knows its pod, one per attempt
        fields = ir["kube"][executor(ir, "train-imgnet-job")]["fieldPathAsEnv"]
        # the attempt's pod: its name names the job, with its uid and namespace it owns the job
        assert fields == [
            {"name": POD_NAME_ENV, "fieldPath": "metadata.name"},
            {"name": POD_UID_ENV, "fieldPath": "metadata.uid"},
            {"name": POD_NAMESPACE_ENV, "fieldPath": "metadata.namespace"},
        ]


def _stub_inputs(**kw) -> dict:
    art = SimpleNamespace(path="/nonexistent", metadata={})
    return {k: (art if v is None else v) for k, v in kw.items()}


class Called(Exception):
    """Raised by a stub in place of the step: what the component had set up when it called it."""


def test_each_component_sets_the_pipeline_run_from_its_input_before_the_step(monkeypatch):
    from components import dseh_components as c
    from dseh import experiments, stages

    config = (REPO / "params.yaml").read_text()
    seen: list[str] = []

    def record(*args, **kw):
        seen.append(os.environ.get(PIPELINE_ENV, ""))
        raise Called

    for module, name in ((stages, "prepare"), (stages, "evaluate"), (stages, "promote"), (experiments, "sweep_bits")):
        monkeypatch.setattr(module, name, record)
    monkeypatch.setattr(kube, "run_training_step", record)
    common = {"config": config, "run_id": "6b1f0d1e-run"}
    calls = {
        c.prepare: _stub_inputs(data_version="v1", data=None),
        c.train_labnet: _stub_inputs(data_version="v1", round_index=0, data=None, labnet=None),
        c.train_imgnet: _stub_inputs(data_version="v1", round_index=0, data=None, labnet=None, imgnet=None),
        c.evaluate: _stub_inputs(data=None, labnet=None, imgnet=None, evaluation=None, metrics=None, report=None),
        c.promote: _stub_inputs(data=None, labnet=None, imgnet=None, evaluation=None, decision=None),
        c.map_table: _stub_inputs(data_version="v1", data=None, table=None, table_csv=None),
    }
    for comp, kw in calls.items():
        monkeypatch.delenv(PIPELINE_ENV, raising=False)
        with pytest.raises(Called):
            comp.python_func(**common, **kw)
    assert seen == ["6b1f0d1e-run"] * len(calls)
    assert {s.python_func.__name__ for s in c.STEPS} - {"resolve_config", "train_imgnet_job"} == {
        f.python_func.__name__ for f in calls
    }


def test_an_unresolved_placeholder_never_becomes_the_pipeline_run(monkeypatch, caplog):
    monkeypatch.setenv(PIPELINE_ENV, "from-the-shell")
    assert kube.enter_pipeline_run(RUN_ID) == "from-the-shell"
    assert "no pipeline run id" in caplog.text
    assert kube.enter_pipeline_run("0f9c-uuid") == os.environ[PIPELINE_ENV] == "0f9c-uuid"


def test_the_trainer_job_is_named_per_run_round_and_attempt(monkeypatch):
    from components import dseh_components as c

    jobs: list = []
    monkeypatch.setattr(kube, "train_imgnet_on_cluster", lambda cfg, opts, *a: jobs.append(opts) or {})
    kw = _stub_inputs(
        config="bits: 16", data_version="v1", data=None, labnet=None, imgnet=None, image=IMAGE, nodes=2, gpus=4,
        pvc_name="nus", namespace="ml", s3_secret="s3", mlflow_secret="mlflow",
        gpu_resource="amd.com/gpu", tolerations=[toleration("gpu:NoSchedule")], node_selector={"pool": "h100"},
    )  # fmt: skip
    for run, rnd, pod in (("run-a", 0, "pod-1"), ("run-a", 0, "pod-2"), ("run-a", 1, "pod-3"), ("run-b", 0, "pod-1")):
        monkeypatch.setenv(POD_NAME_ENV, pod)
        c.train_imgnet_job.python_func(**kw, round_index=rnd, run_id=run)
    monkeypatch.setenv(POD_NAME_ENV, "pod-1")
    c.train_imgnet_job.python_func(**kw, round_index=0, run_id="run-a")  # the same attempt again: the same job
    names = [o.name for o in jobs]
    assert len(set(names[:4])) == 4 and names[4] == names[0]
    assert all(len(n) <= 63 and re.fullmatch(r"dseh-imgnet-r[01]-[0-9a-f]{12}", n) for n in names)
    opts = jobs[2]
    assert dict(opts.labels) == {"dseh/pipeline-run": "run-a", "dseh/round": "1"}
    assert opts.gpu_resource == "amd.com/gpu" and opts.placement.node_selector == {"pool": "h100"}
    m = kube.job_manifest(opts, ["train-imgnet"])
    assert m["metadata"]["labels"]["dseh/pipeline-run"] == "run-a"


def test_a_job_that_overruns_is_deleted():
    opts = kube.JobOptions(name="dseh-imgnet-r0-abc", image=IMAGE, pvc_name="nus")
    with FakeKubernetes(run_jobs=False) as k8s:
        with pytest.raises(DsehError, match="did not finish within 0 s; the job deleted"):
            kube.submit_and_wait(kube.job_manifest(opts, ["train-imgnet"]), timeout_s=0.1, poll_s=0.05, host=k8s.url)
        assert k8s.requests[-1]["method"] == "DELETE" and not k8s.jobs


# --------------------------------------------------------------------------- 2. submit, schedule, caching, image


@pytest.mark.parametrize("final", ["FAILED", "CANCELED", "SKIPPED"])
def test_submit_wait_exits_non_zero_naming_the_state_and_the_run(final, capsys, monkeypatch):
    monkeypatch.setattr(kfp_cli, "POLL_S", 0.01)
    with FakeKfp(run_states=("PENDING", "RUNNING", "CANCELING" if final == "CANCELED" else "RUNNING", final)) as kfp:
        assert main(submit_args(kfp, "--wait")) == 2
        polls = [r for r in kfp.requests if r["method"] == "GET" and r["path"] == "/apis/v2beta1/runs/run-123"]
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"run run-123 ended {final}" in line and f"see {kfp.url}/#/runs/details/run-123" in line
    assert ("OOMKilled" in line) == (final == "FAILED")  # the backend's error, where it gives one
    assert len(polls) == 4


def test_runs_are_named_uniquely_unless_named(capsys):
    with FakeKfp() as kfp:
        for extra in ((), (), ("--run-name", "nightly-v3")):
            assert main(submit_args(kfp, *extra)) == 0
        runs = [r["body"] for r in kfp.requests if r["method"] == "POST" and r["path"] == "/apis/v2beta1/runs"]
        versions = [r for r in kfp.requests if r["path"] == "/apis/v2beta1/pipelines/upload_version"]
    names = [r["display_name"] for r in runs]
    assert all(re.fullmatch(r"dseh-\d{8}-\d{6}-[0-9a-f]{6}", n) for n in names[:2]) and names[0] != names[1]
    assert names[2] == "nightly-v3"
    assert len(versions) == 1  # the same package: one pipeline version, run three times
    for body in runs:  # a run of the uploaded version; no inline spec, whose caching kfp would override
        assert "pipeline_spec" not in body and body["pipeline_version_reference"]["pipeline_version_id"] == "v-2"


@pytest.mark.parametrize("how", ["token", "token-file", "cookies"])
def test_multi_user_kubeflow_gets_the_namespace_and_the_credentials_never_logged(
    how, tmp_path, capsys, caplog, monkeypatch
):
    """The real kfp.Client against the fake: every request (the health check too) carries the
    credentials, the experiment is created in the profile's namespace, and no output holds the token."""
    secret = "eyJhbGciOiJSUzI1NiJ9.do-not-log-me"
    for env in (kfp_cli.TOKEN_ENV, kfp_cli.TOKEN_PATH_ENV, kfp_cli.COOKIES_ENV):
        monkeypatch.delenv(env, raising=False)
    if how == "token":
        monkeypatch.setenv(kfp_cli.TOKEN_ENV, secret)
    elif how == "token-file":
        (tmp_path / "token").write_text(secret + "\n")
        monkeypatch.setenv(kfp_cli.TOKEN_PATH_ENV, str(tmp_path / "token"))
    else:
        monkeypatch.setenv(kfp_cli.COOKIES_ENV, f"authservice_session={secret}")
    caplog.set_level("DEBUG")
    with FakeKfp() as kfp:
        assert main(submit_args(kfp, "--namespace", "team-a", "--wait")) == 0
        requests = list(kfp.requests)
    want = ("cookie", f"authservice_session={secret}") if how == "cookies" else ("authorization", f"Bearer {secret}")
    assert requests and all(r["headers"].get(want[0]) == want[1] for r in requests), [r["path"] for r in requests]
    (exp,) = [r["body"] for r in requests if r["method"] == "POST" and r["path"] == "/apis/v2beta1/experiments"]
    assert exp["namespace"] == "team-a"
    out = capsys.readouterr()
    assert secret not in out.out + out.err + caplog.text


def test_credentials_that_cannot_be_read_or_are_refused_are_one_error(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(kfp_cli.TOKEN_ENV, raising=False)
    monkeypatch.setenv(kfp_cli.TOKEN_PATH_ENV, str(tmp_path / "missing-token"))
    with FakeKfp() as kfp:
        assert main(submit_args(kfp)) == 2
    assert "KF_PIPELINES_SA_TOKEN_PATH=" in capsys.readouterr().err
    monkeypatch.setenv(kfp_cli.TOKEN_ENV, "expired")
    with FakeKfp(auth="unauthorized") as kfp:
        assert main(submit_args(kfp)) == 2
    err = capsys.readouterr().err
    assert "authentication required" in err and "were not accepted" in err and "expired" not in err


@pytest.mark.parametrize("catchup", [False, True])
def test_schedule_runs_the_uploaded_version_without_catching_up(catchup, capsys):
    with FakeKfp() as kfp:
        args = [
            "pipeline",
            "schedule",
            "--host",
            kfp.url,
            "--params",
            PARAMS,
            "--image",
            IMAGE,
            "--cron",
            "0 0 3 * * *",
        ]
        assert main(args + (["--catchup"] if catchup else [])) == 0
        (rec,) = [r["body"] for r in kfp.requests if r["path"] == "/apis/v2beta1/recurringruns"]
    assert rec["pipeline_version_reference"] == {"pipeline_id": "p-1", "pipeline_version_id": "v-2"}
    assert "pipeline_spec" not in rec and rec["no_catchup"] is (not catchup)
    assert rec["mode"] == "ENABLE" and rec["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * *"}}
    out = capsys.readouterr().out  # kfp.Client prints its links first
    assert json.loads(out[out.index("{\n") :])["pipeline_version_id"] == "v-2"


@pytest.mark.parametrize("caching", [False, True])
def test_caching_never_applies_to_resolve_config_or_promote(tmp_path, caching):
    ir = compile_ir(tmp_path, *(["--enable-caching"] if caching else []))
    for task, body in ir["tasks"].items():
        cached = body.get("cachingOptions", {}).get("enableCache", False)
        assert cached is (caching and task not in ("resolve-config", "promote")), task


def test_the_placeholder_image_is_refused_unless_a_real_one_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DSEH_IMAGE", raising=False)
    out = tmp_path / "p.yaml"
    with FakeKfp() as kfp:
        for args in (
            ["compile", "-o", str(out)],
            ["submit", "--host", kfp.url],
            ["schedule", "--host", kfp.url, "--cron", "0 0 3 * * *"],
        ):
            assert main(["pipeline", *args, "--params", PARAMS]) == 2
            assert "ghcr.io/your-org/dseh:0.1.0 is a placeholder" in capsys.readouterr().err
        assert kfp.requests == [] and not out.exists()  # refused before the cluster is asked anything
    monkeypatch.setenv("DSEH_IMAGE", "registry.example/dseh:env")
    assert main(["pipeline", "compile", "-o", str(out), "--params", PARAMS]) == 0
    executors = next(yaml.safe_load_all(out.read_text()))["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {"registry.example/dseh:env"}
    ir = compile_ir(tmp_path, "--nodes", "2", "--pvc", "nus")  # --image wins; the Trainer job runs it too
    assert {e["container"]["image"] for e in ir["executors"].values()} == {IMAGE}
    assert ir["tasks"]["train-imgnet-job"]["inputs"]["parameters"]["image"] == {"runtimeValue": {"constant": IMAGE}}


@pytest.mark.parametrize("auth", ["redirect", "login-page", "unauthorized"])
def test_a_login_page_on_the_health_check_is_authentication_required(auth, capsys):
    with FakeKfp(auth=auth) as kfp:
        assert main(submit_args(kfp)) == 2
        assert not [r for r in kfp.requests if r["method"] == "POST"]
    err = capsys.readouterr().err
    assert f"Kubeflow Pipelines at {kfp.url}: authentication required" in err
    if auth == "redirect":
        assert "/dex/auth" in err


def test_a_redirect_to_the_api_itself_is_healthy(capsys):
    with FakeKfp(auth="moved") as kfp:
        assert main(submit_args(kfp)) == 0


def test_the_fake_server_refuses_what_the_models_do_not_hold():
    from kfp_server_api import ApiClient

    api = ApiClient()
    ref = {"pipeline_version_reference": {"pipeline_id": "p", "pipeline_version_id": "v"}}
    good = {"display_name": "r", "experiment_id": "e", **ref, "runtime_config": {"parameters": {"bits": 64}}}
    assert parse_body(api, json.dumps(good).encode(), "V2beta1Run").runtime_config.parameters == {"bits": 64}
    for bad, why in (
        ({**good, "pipeline_version_id_typo": "v"}, "not a field of the model"),
        ({**good, "display_name": {"text": "r"}}, "is read as"),
        ({**good, "storage_state": "GONE"}, "is not one of"),
        ({k: v for k, v in good.items() if k != "display_name"}, "display_name: required"),
        ({**good, "pipeline_spec": {"root": {}}}, "one of them"),
        ({**good, "pipeline_version_reference": {"pipeline_id": "p"}}, "pipeline_version_id required"),
    ):
        with pytest.raises(ValueError, match=why):
            parse_body(api, json.dumps(bad).encode(), "V2beta1Run")
    with pytest.raises(ValueError, match="mode: 'ON' is not one of"):
        rec = {
            "display_name": "s",
            "experiment_id": "e",
            **ref,
            "mode": "ON",
            "trigger": {"cron_schedule": {"cron": "0"}},
        }
        parse_body(api, json.dumps(rec).encode(), "V2beta1RecurringRun")


# --------------------------------------------------------------------------- 4. GPU placement


def test_gpu_steps_are_placed_as_asked_and_the_others_are_not(tmp_path):
    flags = [
        "--gpus", "2", "--accelerator-type", "amd.com/gpu", "--toleration", "nvidia.com/gpu=present:NoSchedule",
        "--toleration", "dedicated:NoExecute", "--toleration", "spot", "--node-selector", "pool=h100",
        "--node-selector", "cloud.google.com/gke-accelerator=nvidia-h100-80gb",
    ]  # fmt: skip
    ir = compile_ir(tmp_path, *flags)
    tolerations = [
        {"key": "nvidia.com/gpu", "operator": "Equal", "value": "present", "effect": "NoSchedule"},
        {"key": "dedicated", "operator": "Exists", "effect": "NoExecute"},
        {"key": "spot", "operator": "Exists"},
    ]
    selector = {"pool": "h100", "cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    for task in ir["tasks"]:
        pod = ir["kube"].get(executor(ir, task), {})
        if task in GPU_STEPS:
            assert gpus(ir, task) == ("amd.com/gpu", "1" if task == "prepare" else "2"), task  # prepare: one process
            assert pod["tolerations"] == tolerations and pod["nodeSelector"] == {"labels": selector}, task
        else:  # resolve-config, promote: no GPU, so no GPU node either
            assert gpus(ir, task) is None and "tolerations" not in pod and "nodeSelector" not in pod, task


def test_prepare_asks_for_a_gpu_unless_told_not_to(tmp_path):
    assert gpus(compile_ir(tmp_path), "prepare") == ("nvidia.com/gpu", "1")
    off = compile_ir(tmp_path, "--no-gpu-prepare", "--toleration", "gpu:NoSchedule")
    assert gpus(off, "prepare") is None and gpus(off, "evaluate") == ("nvidia.com/gpu", "1")
    assert "tolerations" not in off["kube"]["exec-prepare"] and "tolerations" in off["kube"]["exec-evaluate"]


def test_the_trainer_job_nodes_are_placed_like_the_gpu_steps(tmp_path):
    ir = compile_ir(
        tmp_path, "--nodes", "2", "--pvc", "nus", "--toleration", "gpu:NoSchedule", "--node-selector", "a=b"
    )
    params = ir["tasks"]["train-imgnet-job"]["inputs"]["parameters"]
    assert params["tolerations"]["runtimeValue"]["constant"] == [toleration("gpu:NoSchedule")]
    assert params["node_selector"]["runtimeValue"]["constant"] == {"a": "b"}
    assert params["gpu_resource"]["runtimeValue"]["constant"] == "nvidia.com/gpu"
    assert "tolerations" not in ir["kube"]["exec-train-imgnet-job"]  # the launcher holds no GPU
    placement = Placement.parse(["gpu:NoSchedule"], ["a=b"])
    m = kube.job_manifest(kube.JobOptions(name="j", image=IMAGE, pvc_name="nus", placement=placement), ["x"])
    for p in m["spec"]["runtimePatches"]:
        for j in p["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
            pod = j["template"]["spec"]["template"]["spec"]
            assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
            assert pod["nodeSelector"] == {"a": "b"}


@pytest.mark.parametrize(
    "flag",
    [
        ("--toleration", "gpu:Sometimes"),
        ("--toleration", "gpu:"),
        ("--toleration", "gpu=:NoSchedule"),
        ("--node-selector", "pool"),
    ],
)
def test_placement_that_cannot_work_is_one_clear_error(tmp_path, flag, capsys):
    out = tmp_path / "p.yaml"
    assert main(["pipeline", "compile", "--params", PARAMS, "-o", str(out), "--image", IMAGE, *flag]) == 2
    assert f"{flag[0]} '{flag[1]}' is not of the form" in capsys.readouterr().err and not out.exists()
