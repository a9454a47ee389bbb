"""The run's data version computed from its data: the list files' digest, DVC's md5 of an HDF5 file
(a .dvc file beside it or dvc.lock), a file's own digest, an S3 object's ETag; and `dseh pipeline
submit` sending it when none is given."""

from __future__ import annotations

import pytest
import yaml

from dseh.cli import main
from dseh.config import DataConfig
from dseh.data_version import data_version
from dseh.errors import DsehError
from tests.kfp_fake import FakeKfp
from tests.test_kfp_contracts import IMAGE


def lists(folder, database="b.jpg 0 1\n") -> DataConfig:
    folder.mkdir(exist_ok=True)
    (folder / "train.txt").write_text("a.jpg 1 0\n")
    (folder / "test.txt").write_text("c.jpg 1 1\n")
    (folder / "database.txt").write_text(database)
    return DataConfig(source="list-files", list_dir=str(folder), image_root="s3://nus/images")


def test_list_files_are_versioned_by_their_contents_and_image_root(tmp_path):
    v = data_version(lists(tmp_path / "a"))
    assert v.startswith("list-files-") and len(v) == len("list-files-") + 16
    assert data_version(lists(tmp_path / "b")) == v  # the same lists elsewhere: the same data
    assert data_version(lists(tmp_path / "c", database="b.jpg 1 1\n")) != v  # a label changed
    moved = DataConfig(**{**lists(tmp_path / "a").__dict__, "image_root": "s3://nus/images-v2"})
    assert data_version(moved) != v


def test_hdf5_files_are_versioned_by_what_dvc_recorded_else_their_digest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "Img.h5").write_bytes(b"images")
    (tmp_path / "Lab.h5").write_bytes(b"labels")
    cfg = DataConfig(source="hdf5", img_h5="Img.h5", lab_h5="Lab.h5")
    plain = data_version(cfg)
    (tmp_path / "Lab.h5").write_bytes(b"labels, relabelled")
    assert data_version(cfg) != plain  # the file's own digest
    # tracked by DVC: its md5 stands for the file (which may not even be here)
    (tmp_path / "Img.h5.dvc").write_text(yaml.safe_dump({"outs": [{"md5": "a" * 32, "path": "Img.h5"}]}))
    (tmp_path / "Img.h5").unlink()
    tracked = data_version(cfg)
    (tmp_path / "Img.h5.dvc").write_text(yaml.safe_dump({"outs": [{"md5": "b" * 32, "path": "Img.h5"}]}))
    assert data_version(cfg) != tracked
    lock = {"stages": {"fetch": {"cmd": "x", "outs": [{"path": "Lab.h5", "md5": "c" * 32}]}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    (tmp_path / "Lab.h5").unlink()
    data_version(cfg)  # Lab.h5 from dvc.lock
    with pytest.raises(DsehError, match="Nope.h5 does not exist: give the run's data version"):
        data_version(DataConfig(source="hdf5", img_h5="Nope.h5", lab_h5="Lab.h5"))


def test_an_s3_file_is_versioned_by_its_etag(s3_env):
    c = s3_env.client()
    c.create_bucket(Bucket="dseh-h5")
    c.put_object(Bucket="dseh-h5", Key="Img.h5", Body=b"images")
    c.put_object(Bucket="dseh-h5", Key="Lab.h5", Body=b"labels")
    cfg = DataConfig(source="hdf5", img_h5="s3://dseh-h5/Img.h5", lab_h5="s3://dseh-h5/Lab.h5")
    v = data_version(cfg)
    c.put_object(Bucket="dseh-h5", Key="Lab.h5", Body=b"labels, relabelled")
    assert data_version(cfg) != v


def test_submit_sends_the_computed_data_version_unless_one_is_given(tmp_path, capsys):
    lists(tmp_path / "nus")
    sets = ["-S", "source=list-files", "-S", f"list_dir={tmp_path / 'nus'}", "-S", "image_root=s3://nus/images"]
    want = data_version(lists(tmp_path / "nus"))
    with FakeKfp() as kfp:
        base = ["pipeline", "submit", "--host", kfp.url, "--image", IMAGE, *sets]
        assert main(base) == 0 and main([*base, "-S", "data_version=v3"]) == 0
        runs = [r["body"] for r in kfp.requests if r["method"] == "POST" and r["path"] == "/apis/v2beta1/runs"]
    assert [r["runtime_config"]["parameters"]["data_version"] for r in runs] == [want, "v3"]
    assert f'"data_version": "{want}"' in capsys.readouterr().out


def test_a_cached_schedule_needs_a_data_version(capsys):
    with FakeKfp() as kfp:
        args = ["pipeline", "schedule", "--host", kfp.url, "--image", IMAGE, "--cron", "0 0 3 * * *"]
        assert main([*args, "--enable-caching"]) == 2
        assert not kfp.requests  # refused before the cluster is asked anything
    assert "needs -S data_version" in capsys.readouterr().err
