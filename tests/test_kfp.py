"""Kubeflow: the compiled IR YAML parsed back, a whole local run under kfp.local, and submit/schedule
through a real kfp.Client against a local HTTP server that records the REST calls."""

import json
import socket
import threading
from pathlib import Path

import pytest
import yaml

from dseh import kfp_cli
from dseh.cli import main
from dseh.config import load_config, to_dict
from dseh.errors import DsehError
from dseh.pipeline_params import PARAMS, POD, TYPED
from tests.helpers import REPO, tiny_raw
from tests.kfp_fake import FakeKfp
from tests.servers import free_port

TRAINING = ("train-labnet", "train-imgnet", "evaluate", "map-table")
REGISTRY_IMAGE = "registry.example/dseh:0.1.0"


def _compile(tmp_path, monkeypatch, *extra) -> dict:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-never-in-yaml")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "another-s3cr3t")
    monkeypatch.setenv("DSEH_IMAGE", REGISTRY_IMAGE)  # compile refuses the components' placeholder image
    out = tmp_path / "p.yaml"
    assert main(["pipeline", "compile", "--params", str(REPO / "params.yaml"), "-o", str(out), *extra]) == 0
    text = out.read_text()
    assert "s3cr3t" not in text
    for local in (str(REPO), str(tmp_path), "/home/", "/root/"):
        assert local not in text, local
    docs = list(yaml.safe_load_all(text))
    return {"text": text, "spec": docs[0], "platform": docs[1] if len(docs) > 1 else {}}


def test_compiled_pipeline_requests_gpus_retries_secrets_and_shm(tmp_path, monkeypatch):
    c = _compile(tmp_path, monkeypatch, "--rounds", "2", "--gpus", "2", "--pvc", "nus-wide-images")
    spec, platform = c["spec"], c["platform"]
    tasks = spec["root"]["dag"]["tasks"]
    names = set(tasks)
    assert {
        "train-labnet",
        "train-labnet-2",
        "train-imgnet",
        "train-imgnet-2",
        "evaluate",
        "promote",
        "map-table",
        "prepare",
        "resolve-config",
    } <= names
    # round 1 consumes round 0's artifacts
    lab1 = tasks["train-labnet-2"]["inputs"]["artifacts"]
    assert lab1["prev_imgnet"]["taskOutputArtifact"]["producerTask"] == "train-imgnet"
    executors = spec["deploymentSpec"]["executors"]
    for task, body in tasks.items():
        res = executors[body["componentRef"]["name"].replace("comp-", "exec-")]["container"].get("resources", {})
        if task.rsplit("-", 1)[0] in TRAINING or task in TRAINING:
            assert (
                res["accelerator"]["resourceType"] == "nvidia.com/gpu" and res["accelerator"]["resourceCount"] == "2"
            ), task
            assert res["resourceCpuLimit"] == POD.cpu and res["resourceMemoryLimit"] == POD.memory == "32Gi"
            assert body["retryPolicy"]["maxRetryCount"] == 2
        assert executors[body["componentRef"]["name"].replace("comp-", "exec-")]["container"]["image"].endswith(
            "dseh:0.1.0"
        )
    kube = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    lab = kube["exec-train-labnet"]
    assert {e["secretNameParameter"]["componentInputParameter"] for e in lab["secretAsEnv"]} == {
        "s3_secret",
        "mlflow_secret",
    }
    keys = {k["envVar"] for e in lab["secretAsEnv"] for k in e["keyToEnv"]}
    assert {"AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_URI"} <= keys
    # the tracking URI alone is required (no fallback store in a pod); credentials stay optional
    required = [k["envVar"] for e in lab["secretAsEnv"] if not e.get("optional") for k in e["keyToEnv"]]
    assert required == ["MLFLOW_TRACKING_URI"]
    assert lab["emptyDirMounts"][0]["mountPath"] == "/dev/shm" and lab["emptyDirMounts"][0]["medium"] == "Memory"
    assert lab["emptyDirMounts"][0]["sizeLimit"] == POD.shm_size
    assert lab["pvcMount"][0]["mountPath"] == "/data"
    # with a claim the training steps keep their resume checkpoints on it: a retried pod resumes
    for task in ("train-labnet", "train-imgnet-2"):
        ckpt = tasks[task]["inputs"]["parameters"]["checkpoint_dir"]["runtimeValue"]["constant"]
        assert ckpt == "/data/dseh-checkpoints", task
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert {"bits", "data_version", "overrides", "weights", "backbone", "registered_model", "source"} <= set(params)
    baked = json.loads(params["params"]["defaultValue"])
    assert baked["bits"] == 32 and baked["labnet"]["batch_size"] == 32
    # caching is off unless asked for; then it is keyed by data_version and the config inputs
    assert tasks["train-labnet"]["cachingOptions"] == {} or not tasks["train-labnet"]["cachingOptions"].get(
        "enableCache"
    )


KFP_TYPES = {str: "STRING", int: "NUMBER_INTEGER"}
# a value params.yaml accepts for each typed parameter ("[2, 4]": one value, spaces and all)
SAMPLES = {
    "source": "list-files",
    "image_root": "/data/images",
    "list_dir": "/data/lists",
    "img_h5": "/data/img.h5",
    "lab_h5": "/data/lab.h5",
    "bits": 64,
    "labnet_epochs": "[3]",
    "imgnet_epochs": "[2, 4]",
    "backbone": "vgg16",
    "weights": "/data/vgg16.pth",
    "registered_model": "nus-imgnet",
}


def test_without_a_claim_the_checkpoints_go_to_the_s3_root_given(tmp_path, monkeypatch, capsys):
    c = _compile(tmp_path, monkeypatch, "--rounds", "2", "--checkpoint-root", "s3://mlpipeline/dseh-checkpoints")
    tasks = c["spec"]["root"]["dag"]["tasks"]
    for task in ("train-labnet", "train-imgnet", "train-labnet-2", "train-imgnet-2"):
        ckpt = tasks[task]["inputs"]["parameters"]["checkpoint_dir"]["runtimeValue"]["constant"]
        assert ckpt == "s3://mlpipeline/dseh-checkpoints", task
    plain = _compile(tmp_path, monkeypatch)  # neither: a retry starts over
    assert "checkpoint_dir" not in plain["spec"]["root"]["dag"]["tasks"]["train-labnet"]["inputs"]["parameters"]
    out = tmp_path / "bad.yaml"
    args = ["pipeline", "compile", "--params", str(REPO / "params.yaml"), "-o", str(out), "--checkpoint-root", "/tmp/x"]
    assert main(args) == 2 and not out.exists()
    assert "give an s3://bucket/prefix" in capsys.readouterr().err


def test_pipeline_parameters_are_the_table(tmp_path, monkeypatch):
    spec = _compile(tmp_path, monkeypatch)["spec"]
    root = spec["root"]["inputDefinitions"]["parameters"]
    assert json.loads(root["params"].pop("defaultValue")) == yaml.safe_load((REPO / "params.yaml").read_text())
    expected = {
        p.name: {"parameterType": KFP_TYPES[p.type], "defaultValue": p.default, "isOptional": True} for p in PARAMS
    }
    del expected["params"]["defaultValue"]  # the baked params.yaml, above
    assert root == expected
    # resolve_config takes each typed parameter, with the same type and default, straight from the run's
    step = spec["components"]["comp-resolve-config"]["inputDefinitions"]["parameters"]
    assert set(step) == {"params", "overrides", "data_version", "rounds"} | {p.name for p in TYPED}
    assert all(step[p.name] == expected[p.name] for p in TYPED)
    wiring = spec["root"]["dag"]["tasks"]["resolve-config"]["inputs"]["parameters"]
    assert all(wiring[p.name] == {"componentInputParameter": p.name} for p in TYPED)


def test_set_gives_the_pipeline_parameters_as_their_types():
    for p in PARAMS:
        if p.name in ("params", "overrides"):  # --params gives the one; the other is made of the other keys
            assert kfp_cli.run_arguments([f"{p.name}=7"]) == {"overrides": f"{p.name}=7"}
        else:
            value = kfp_cli.run_arguments([f"{p.name}=7"])[p.name]
            assert value == p.type("7") and type(value) is p.type, p.name
    args = kfp_cli.run_arguments(["bits=64", "labnet.beta=0.02", "image_root=/a b", "imgnet.lr_exp=4"])
    assert args == {"bits": 64, "image_root": "/a b", "overrides": "labnet.beta=0.02 imgnet.lr_exp=4"}
    with pytest.raises(DsehError, match="--set bits=sixty: bits takes an integer"):
        kfp_cli.run_arguments(["bits=sixty"])


def test_resolve_config_sets_the_params_key_of_each_typed_parameter():
    from components.dseh_components import resolve_config

    assert set(SAMPLES) == {p.name for p in TYPED}
    run = {"params": (REPO / "params.yaml").read_text(), "overrides": "labnet.beta=0.02", "data_version": "v1"}
    # unset (empty or 0, the defaults): params.yaml's values stay
    kept = yaml.safe_load(resolve_config.python_func(**run, rounds=2))
    assert kept == to_dict(load_config(REPO / "params.yaml", ["labnet.beta=0.02", "train.rounds=2"]))
    out = yaml.safe_load(resolve_config.python_func(**run, rounds=2, **SAMPLES))
    for p in TYPED:
        *path, leaf = p.key.split(".")
        section = out
        for part in path:
            section = section[part]
        assert section[leaf] == yaml.safe_load(str(SAMPLES[p.name])), p.name
    assert out["labnet"]["beta"] == 0.02 and out["train"]["rounds"] == 2


def test_multi_node_pipeline_runs_imgnet_as_a_trainer_job(tmp_path, monkeypatch):
    c = _compile(tmp_path, monkeypatch, "--nodes", "2", "--gpus", "4", "--pvc", "nus", "--job-namespace", "ml")
    spec, platform = c["spec"], c["platform"]
    tasks = spec["root"]["dag"]["tasks"]
    assert "train-imgnet-job" in tasks and "train-imgnet" not in tasks
    job = tasks["train-imgnet-job"]["inputs"]["parameters"]
    assert job["nodes"]["runtimeValue"]["constant"] == 2 and job["gpus"]["runtimeValue"]["constant"] == 4
    assert job["namespace"]["runtimeValue"]["constant"] == "ml" and job["pvc_name"]["runtimeValue"]["constant"] == "nus"
    assert job["image"]["runtimeValue"]["constant"].endswith("dseh:0.1.0")
    executors = spec["deploymentSpec"]["executors"]
    # the pod that launches and watches the job holds no GPU; LabNet's step gets 4 and runs under torchrun
    assert "accelerator" not in executors["exec-train-imgnet-job"]["container"].get("resources", {})
    lab = executors["exec-train-labnet"]["container"]["resources"]["accelerator"]
    assert lab["resourceCount"] == "4"
    assert tasks["train-labnet"]["inputs"]["parameters"]["gpus"]["runtimeValue"]["constant"] == 4
    kube = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train-imgnet-job"]
    assert kube["pvcMount"][0]["mountPath"] == "/data"
    out = tmp_path / "bad.yaml"
    assert main(["pipeline", "compile", "--params", str(REPO / "params.yaml"), "-o", str(out), "--nodes", "2"]) == 2
    assert not out.exists()


def test_bad_params_fail_before_any_gpu_step(tmp_path):
    from dseh.config import from_yaml_text

    with pytest.raises(DsehError, match="labnet.bta"):
        from_yaml_text(json.dumps({"labnet": {"bta": 1}}))


def test_whole_pipeline_runs_locally(tmp_path, monkeypatch):
    full = yaml.safe_load((REPO / "params.yaml").read_text())
    raw = tiny_raw()
    raw["sweep"] = {"bits": [8]}
    for k, v in raw.items():
        full[k] = {**full[k], **v} if isinstance(v, dict) else v
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(full))
    monkeypatch.chdir(tmp_path)
    res = kfp_cli.run_local(
        str(tmp_path / "params.yaml"), ["bits=16", "evaluate.topk=50"], root=str(tmp_path / "local_outputs")
    )
    run = Path(res["run_dir"])
    assert {"prepare", "train-labnet", "train-imgnet", "evaluate", "promote", "map-table"} <= set(res["tasks"])
    metrics = json.loads((run / "evaluate/executor_output.json").read_text())
    art = metrics["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    assert art["bits"] == 16 and art["protocol_topk"] == 50 and 0 <= art["map_all"] <= 1
    assert art["collapsed"] in (0.0, 1.0)
    html = (run / "evaluate/report").read_text()
    assert 'id="map-table"' in html
    assert (run / "train-imgnet/imgnet/model.pt").is_file() and (run / "train-imgnet/imgnet/codes.npy").is_file()
    # kfp.local resolved the run id placeholder in the task inputs: the steps agree on one pipeline run
    outs = {
        t: json.loads((run / t / "executor_output.json").read_text())["artifacts"] for t in ("prepare", "train-imgnet")
    }
    (seen,) = {outs["prepare"]["data"]["artifacts"][0]["metadata"]["pipeline_run"]} | {
        outs["train-imgnet"]["imgnet"]["artifacts"][0]["metadata"]["pipeline_run"]
    }
    assert seen and "{{" not in seen and not seen.startswith("local-")
    assert "| bits |" in (run / "map-table/table").read_text()
    assert "skipped" in (run / "promote/decision").read_text()


def test_submit_and_schedule_send_the_expected_requests(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DSEH_IMAGE", REGISTRY_IMAGE)
    with FakeKfp() as kfp:
        args = [
            "pipeline",
            "submit",
            "--host",
            kfp.url,
            "--params",
            str(REPO / "params.yaml"),
            "--experiment",
            "nus",
            "-S",
            "bits=64",
            "-S",
            "data_version=abc123",
            "-S",
            "labnet.beta=0.02",
            "--wait",
        ]
        assert main(args) == 0
        printed = capsys.readouterr().out
        assert '"run_id": "run-123"' in printed and "/#/runs/details/run-123" in printed
        calls = [(r["method"], r["path"]) for r in kfp.requests]
        assert ("POST", "/apis/v2beta1/experiments") in calls
        assert ("POST", "/apis/v2beta1/pipelines/upload") in calls
        run = next(r for r in kfp.requests if r["path"] == "/apis/v2beta1/runs" and r["method"] == "POST")
        assert run["body"]["experiment_id"] == "exp-1"
        assert run["body"]["pipeline_version_reference"] == {"pipeline_id": "p-1", "pipeline_version_id": "v-2"}
        assert run["body"]["runtime_config"]["parameters"] == {
            "bits": 64,
            "data_version": "abc123",
            "overrides": "labnet.beta=0.02",
        }
        upload = next(r for r in kfp.requests if r["path"] == "/apis/v2beta1/pipelines/upload_version")
        assert b"pipelineInfo" in upload["body"] and b"nvidia.com/gpu" in upload["body"]
        assert ("GET", "/apis/v2beta1/runs/run-123") in calls  # --wait polled the run
        n = len(kfp.requests)
        assert (
            main(
                [
                    "pipeline",
                    "schedule",
                    "--host",
                    kfp.url,
                    "--params",
                    str(REPO / "params.yaml"),
                    "--experiment",
                    "nus",
                    "--cron",
                    "0 0 3 * * *",
                    "-S",
                    "data_version=nightly",
                ]
            )
            == 0
        )
        rec = next(r for r in kfp.requests[n:] if r["path"] == "/apis/v2beta1/recurringruns")
        assert rec["body"]["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * *"}}
        assert rec["body"]["experiment_id"] == "exp-1"  # the existing experiment is reused
        assert rec["body"]["runtime_config"]["parameters"] == {"data_version": "nightly"}
        assert sum(1 for r in kfp.requests if r["method"] == "POST" and r["path"] == "/apis/v2beta1/experiments") == 1


def test_refusing_or_silent_server_is_a_clear_error(capsys, monkeypatch):
    monkeypatch.setenv("DSEH_IMAGE", REGISTRY_IMAGE)
    port = free_port()
    assert (
        main(["pipeline", "submit", "--host", f"http://127.0.0.1:{port}", "--params", str(REPO / "params.yaml")]) == 2
    )
    assert f"Kubeflow Pipelines at http://127.0.0.1:{port} is unreachable" in capsys.readouterr().err
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    conns = []
    t = threading.Thread(target=lambda: conns.append(silent.accept()), daemon=True)
    t.start()
    host = f"http://127.0.0.1:{silent.getsockname()[1]}"
    try:
        assert (
            main(
                [
                    "pipeline",
                    "schedule",
                    "--host",
                    host,
                    "--cron",
                    "0 * * * * *",
                    "--timeout",
                    "1",
                    "--params",
                    str(REPO / "params.yaml"),
                ]
            )
            == 2
        )
        assert "unreachable" in capsys.readouterr().err
    finally:
        silent.close()
