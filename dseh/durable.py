"""A pipeline training step's resume checkpoint, kept where a retried step (a new pod) finds it: a
folder on a claim, or an s3:// prefix (the pipeline root's bucket, when there is no claim) that the
checkpoint in pod scratch is mirrored to after every epoch."""

from __future__ import annotations

import logging
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dseh import artifacts, storage
from dseh.errors import DsehError

log = logging.getLogger(__name__)

MIRROR_S = 5.0  # how often a mirrored checkpoint is looked at (an epoch takes minutes on real data)


def checkpoint_location(folder: str | Path, run_id: str, step: str, round_index: int) -> str:
    """Where the checkpoint of this pipeline run's step and round lives under `folder` (a path or an
    s3:// prefix): one per run, step and round (artifacts.durable_checkpoint)."""
    if storage.is_s3(str(folder)):
        rel = artifacts.durable_checkpoint("/", run_id, step, round_index).relative_to("/")
        return f"{str(folder).rstrip('/')}/{rel.as_posix()}"
    return str(artifacts.durable_checkpoint(folder, run_id, step, round_index))


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


@contextmanager
def local_checkpoint(location: str, poll_s: float | None = None) -> Iterator[Path]:
    """A local path for the checkpoint at `location`. A path is itself. For s3:// it is a file in pod
    scratch: fetched first when the object exists (so the step resumes from it), uploaded whenever
    the training loop replaces it (a thread looks every poll_s seconds, default MIRROR_S) and once more when the block
    ends; when the block ends without it (the loop removes its checkpoint once the step's output is
    written) the object is removed too."""
    if not storage.is_s3(location):
        yield Path(location)
        return
    with tempfile.TemporaryDirectory(prefix="dseh-ckpt-") as tmp:
        local = Path(tmp) / location.rsplit("/", 1)[-1]
        if storage.download(location, local):
            log.info("resume checkpoint fetched from %s", location)
        sent = {"mtime": _mtime(local)}
        lock = threading.Lock()

        def sync() -> None:
            with lock:
                if (now := _mtime(local)) is not None and now != sent["mtime"]:
                    storage.upload(local, location)
                    sent["mtime"] = now

        stop = threading.Event()

        def mirror() -> None:
            while not stop.wait(poll_s or MIRROR_S):
                try:
                    sync()
                except DsehError as exc:  # the next look tries again; the step goes on
                    log.warning("could not mirror the checkpoint to %s: %s", location, exc)

        thread = threading.Thread(target=mirror, name="dseh-checkpoint-mirror", daemon=True)
        thread.start()
        try:
            yield local
        finally:
            stop.set()
            thread.join()
            if local.exists():
                sync()
            else:
                storage.delete(location)
