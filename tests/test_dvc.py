"""DVC end to end in a scratch project: a user's own image folder versioned with `dvc add`, the
generated dvc.yaml run by `dvc repro`, exact reruns after a params change, `dvc push`/`dvc pull`
to an S3 remote on a real SeaweedFS, and `dvc import-url` of an S3 prefix."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import LEARNING, REPO, make_list_collection, tiny_raw, write_image

pytestmark = pytest.mark.integration


def sh(cmd: list[str], cwd: Path, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


@pytest.fixture
def project(tmp_path, s3_server):
    """A git + DVC project with the dseh library linked in and a list-files collection in raw/."""
    root = tmp_path / "proj"
    root.mkdir()
    (root / "dseh").symlink_to(REPO / "dseh")
    shutil.copy(REPO / ".gitignore", root / ".gitignore")  # what this repository keeps out of git
    make_list_collection(root / "raw", n=40)
    raw = tiny_raw(**LEARNING)
    raw["labnet"]["epochs"] = [2]
    raw["imgnet"]["epochs"] = [1]
    raw["data"].update(source="list-files", list_dir="raw", image_root="raw/images", image_size=16)
    raw["sweep"] = {"bits": [16, 32]}  # 32: the main length, read from the main pipeline's evaluation
    full = yaml.safe_load((REPO / "params.yaml").read_text())  # DVC needs every declared section
    for key, value in raw.items():
        full[key] = {**full[key], **value} if isinstance(value, dict) else value
    (root / "params.yaml").write_text(yaml.safe_dump(full))
    bindir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        **s3_server.env(),
        "PATH": bindir + os.pathsep + os.environ["PATH"],
        "PYTHONPATH": str(REPO),
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    dvc = [str(Path(bindir) / "dvc")]
    sh(["git", "init", "-q"], root, env)
    sh(dvc + ["init", "-q"], root, env)
    sh(dvc + ["config", "core.analytics", "false"], root, env)
    sh([sys.executable, "-m", "dseh", "dvc-yaml"], root, env)
    sh(dvc + ["add", "-q", "raw"], root, env)
    return root, env, dvc


def test_repro_reruns_exactly_what_changed_and_push_pull_round_trip(project, s3_server):
    root, env, dvc = project
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    assert "raw/images" in stages["prepare"]["deps"] and "raw/train.txt" in stages["prepare"]["deps"]
    sh(dvc + ["repro"], root, env)
    assert (root / "outputs/eval/metrics.json").is_file() and not (root / "outputs/sweep").exists()
    out = sh(dvc + ["repro", "sweep/dvc.yaml"], root, env).stdout  # the opt-in code-length table
    assert "Running stage 'sweep/dvc.yaml:sweep@16'" in out and "sweep@32" not in out
    assert "Running stage 'train_imgnet_r0'" not in out  # the main model is reused, not trained again
    table = (root / "outputs/table/map_table.md").read_text()
    main = json.loads((root / "outputs/eval/metrics.json").read_text())["map_all"]
    assert f"| 32 | {main:.4f} |" in table and "| 16 |" in table
    assert json.loads((root / "outputs/promote/decision.json").read_text())["decision"] == "skipped"
    assert json.loads(sh(dvc + ["status", "--json"], root, env).stdout) == {}

    def stale_after(key: str, value) -> set[str]:
        params = yaml.safe_load((root / "params.yaml").read_text())
        section, name = key.split(".")
        old = params[section][name]
        params[section][name] = value
        (root / "params.yaml").write_text(yaml.safe_dump(params))
        status = json.loads(sh(dvc + ["status", "--json"], root, env).stdout)
        params[section][name] = old
        (root / "params.yaml").write_text(yaml.safe_dump(params))
        return set(status)

    assert stale_after("evaluate.topk", 50) == {"evaluate", "sweep/dvc.yaml:sweep@16"}
    assert stale_after("labnet.beta", 0.02) == {"train_labnet_r0", "sweep/dvc.yaml:sweep@16"}
    assert stale_after("data.workers", 1) == set()  # speed only: declared by no stage
    assert stale_after("promote.min_delta", 0.1) == {"promote"}

    # changing one image of the user's collection reruns prepare and everything after it
    write_image(root / "raw/images/img/004.png", 999)
    sh(dvc + ["add", "-q", "raw"], root, env)
    status = json.loads(sh(dvc + ["status", "--json"], root, env).stdout)
    assert "prepare" in status
    before = json.loads((root / "outputs/data/manifest.json").read_text())["dataset_sha256"]
    out = sh(dvc + ["repro"], root, env).stdout
    for stage in ("prepare", "train_labnet_r0", "train_imgnet_r0", "evaluate"):
        assert f"Running stage '{stage}'" in out, out[-2000:]
    assert json.loads((root / "outputs/data/manifest.json").read_text())["dataset_sha256"] != before

    # S3 remote: endpoint from AWS_ENDPOINT_URL_S3, credentials from the environment, never in git
    s3_server.client().create_bucket(Bucket="dseh-dvc")
    sh(dvc + ["remote", "add", "-d", "store", "s3://dseh-dvc/cache"], root, env)
    assert "endpointurl" not in (root / ".dvc/config").read_text()
    sh(dvc + ["push", "-q"], root, env)
    images = (root / "outputs/data/images.npy").read_bytes()
    shutil.rmtree(root / "outputs/data")
    shutil.rmtree(root / ".dvc/cache")
    sh(dvc + ["pull", "-q", "prepare"], root, env)
    assert (root / "outputs/data/images.npy").read_bytes() == images
    keys = s3_server.client().list_objects_v2(Bucket="dseh-dvc").get("KeyCount", 0)
    assert keys > 0
    sh(dvc + ["pull", "-q"], root, env)  # the whole cache back from the remote

    # metrics, plots and experiments work as DVC users expect
    shown = json.loads(sh(dvc + ["metrics", "show", "--json"], root, env).stdout)
    assert "map_all" in json.dumps(shown)
    plots = json.loads(sh(dvc + ["plots", "show", "--json"], root, env).stdout)
    assert "outputs/eval/pr_curve.csv" in json.dumps(plots)
    sh(["git", "add", "-A"], root, env)
    sh(["git", "commit", "-qm", "pipeline"], root, env)
    tracked = sh(["git", "ls-files", "outputs"], root, env).stdout.split()
    assert "outputs/eval/metrics.json" in tracked and "outputs/eval/pr_curve.csv" in tracked
    assert not any(p.startswith(("outputs/data", "outputs/imgnet")) for p in tracked)
    for topk in (10, 20):  # two experiments; only evaluate reruns
        out = sh(dvc + ["exp", "run", "-S", f"evaluate.topk={topk}"], root, env).stdout
        assert "Running stage 'evaluate'" in out and "Running stage 'train_imgnet_r0'" not in out
    exps = json.dumps(json.loads(sh(dvc + ["exp", "show", "--json"], root, env).stdout))
    assert "map_at_10" in exps and "map_at_20" in exps
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["evaluate"]["topk"] = 30
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    sh(dvc + ["repro", "evaluate"], root, env)
    sh(["git", "commit", "-qam", "topk 30"], root, env)
    diff = json.loads(sh(dvc + ["metrics", "diff", "HEAD~1", "--json"], root, env).stdout)
    assert diff["outputs/eval/metrics.json"]["protocol_topk"] == {"old": 37, "new": 30, "diff": -7}
    assert "map_at_30" in diff["outputs/eval/metrics.json"]


def test_import_url_of_an_s3_prefix(project, s3_server):
    root, env, dvc = project
    client = s3_server.client()
    client.create_bucket(Bucket="dseh-raw")
    for p in (root / "raw").rglob("*"):
        if p.is_file() and p.suffix != ".dvc":
            client.upload_file(str(p), "dseh-raw", f"nus/{p.relative_to(root / 'raw').as_posix()}")
    sh(dvc + ["import-url", "-q", "s3://dseh-raw/nus", "imported"], root, env)
    assert (root / "imported.dvc").is_file() and (root / "imported/images/img/000.png").is_file()
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"].update(list_dir="imported", image_root="imported/images")
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    sh([sys.executable, "-m", "dseh", "dvc-yaml"], root, env)
    sh(dvc + ["repro", "prepare"], root, env)
    assert json.loads((root / "outputs/data/manifest.json").read_text())["sizes"]["items"] == 40
    # a changed object upstream shows up as an update of the import
    client.put_object(
        Bucket="dseh-raw", Key="nus/images/img/004.png", Body=(root / "raw/images/img/005.jpg").read_bytes()
    )
    sh(dvc + ["update", "-q", "imported.dvc"], root, env)
    assert "prepare" in json.loads(sh(dvc + ["status", "--json"], root, env).stdout)
