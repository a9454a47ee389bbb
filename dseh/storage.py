"""Reading inputs from local paths or `s3://bucket/key` URIs (boto3), and safe path joining.

Endpoint, region and credentials come from the standard AWS environment variables
(AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...); nothing is configured in code.
"""

from __future__ import annotations

import glob
import os
import posixpath
import re
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dseh.errors import DsehError, MissingObject


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> ('bucket', 'a/b')."""
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise DsehError(f"'{uri}' names no bucket")
    return bucket, key


def join(root: str, rel: str) -> str:
    """Join a relative item path onto a root (local folder or s3:// prefix).

    The item path must be relative and stay inside the root: an absolute path or one that
    escapes with `..` is rejected, naming it and the root. This check is lexical; `inside_root`
    also follows symlinks.
    """
    if not rel:
        raise DsehError("empty image path")
    if rel.startswith("/") or rel.startswith("\\") or (len(rel) > 1 and rel[1] == ":"):
        raise DsehError(f"image path '{rel}' is absolute; paths must be relative to the image root '{root}'")
    norm = posixpath.normpath(rel.replace("\\", "/"))
    if norm == ".." or norm.startswith("../"):
        raise DsehError(f"image path '{rel}' escapes the image root '{root}'")
    if is_s3(root):
        return root.rstrip("/") + "/" + norm
    return str(Path(root) / norm) if root else norm


def inside_root(root: str, rel: str) -> str:
    """`join(root, rel)`, and for a local root the path with symlinks resolved, refused when it
    lands outside the (resolved) root: a link inside the image folder must not expose other files.

    The resolved path is what the caller reads, so the file checked is the file read (short of
    someone swapping links while `prepare` runs). S3 keys have no links; they are only joined.
    """
    uri = join(root, rel)
    if is_s3(root):
        return uri
    real_root = os.path.realpath(root or ".")
    real = os.path.realpath(uri)
    if os.path.commonpath([real_root, real]) != real_root:
        raise DsehError(
            f"image path '{rel}' resolves to '{real}', outside the image root '{root}' (symlinks are followed)"
        )
    return real


_local = threading.local()


def _client(timeout_s: float, retries: int):
    """One boto3 S3 client per thread and setting (boto3 clients are not shared across threads)."""
    key = (timeout_s, retries)
    cache = getattr(_local, "clients", None)
    if cache is None:
        cache = _local.clients = {}
    if key not in cache:
        import boto3
        from botocore.config import Config as BotoConfig

        cache[key] = boto3.session.Session().client(
            "s3",
            config=BotoConfig(
                connect_timeout=timeout_s,
                read_timeout=timeout_s,
                retries={"max_attempts": retries, "mode": "standard"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )
    return cache[key]


def _endpoint() -> str:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"


def s3_error(exc: Exception, bucket: str, key: str) -> DsehError:
    """Translate a botocore failure into one message naming the bucket and key."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    where = f"s3://{bucket}/{key}"
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchKey", "404", "NotFound"):
            return MissingObject(f"{where} does not exist")
        if code in ("NoSuchBucket",):
            return DsehError(f"bucket '{bucket}' does not exist (reading {where})")
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return DsehError(f"access denied to {where} ({code}): check AWS credentials")
        return DsehError(f"S3 error {code} reading {where}: {exc}")
    if isinstance(exc, NoCredentialsError):
        return DsehError(f"no AWS credentials to read {where}: set AWS_ACCESS_KEY_ID/SECRET")
    if isinstance(exc, EndpointConnectionError):
        return DsehError(f"S3 endpoint {_endpoint()} is unreachable (reading {where})")
    return DsehError(f"S3 endpoint {_endpoint()} failed reading {where}: {exc}")


def read_bytes(uri: str, timeout_s: float = 10.0, retries: int = 3) -> bytes:
    """The whole content of a local file or an S3 object."""
    if is_s3(uri):
        return _s3_call(uri, timeout_s, retries, lambda c, b, k: c.get_object(Bucket=b, Key=k)["Body"].read())
    try:
        return Path(uri).read_bytes()
    except FileNotFoundError as exc:
        raise MissingObject(f"{uri} does not exist") from exc
    except IsADirectoryError as exc:
        raise DsehError(f"{uri} is a directory, expected a file") from exc


def read_text(uri: str, timeout_s: float = 10.0, retries: int = 3) -> str:
    """A UTF-8 text file or object; other encodings are refused naming the file and the line."""
    data = read_bytes(uri, timeout_s, retries)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DsehError(
            f"{uri}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); save it as UTF-8"
        ) from None


@contextmanager
def local_copy(uri: str, timeout_s: float = 10.0, retries: int = 3) -> Iterator[str]:
    """A local file path for `uri`: the path itself, or a temporary download of the object."""
    if not is_s3(uri):
        if not Path(uri).is_file():
            raise MissingObject(f"{uri} does not exist")
        yield uri
        return
    data = read_bytes(uri, timeout_s, retries)
    with tempfile.NamedTemporaryFile(suffix=posixpath.basename(uri)) as tmp:
        tmp.write(data)
        tmp.flush()
        yield tmp.name


def _s3_call(uri: str, timeout_s: float, retries: int, call):
    """call(client, bucket, key) with botocore's failures as one DsehError naming the object."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split_s3(uri)
    try:
        return call(_client(timeout_s, retries), bucket, key)
    except (BotoCoreError, ClientError) as exc:
        raise s3_error(exc, bucket, key) from exc


def etag(uri: str, timeout_s: float = 10.0, retries: int = 3) -> str:
    """An S3 object's ETag (its content's version as the store knows it), without reading it."""
    return _s3_call(uri, timeout_s, retries, lambda c, b, k: c.head_object(Bucket=b, Key=k)["ETag"].strip('"'))


def upload(path: str | Path, uri: str, timeout_s: float = 10.0, retries: int = 3) -> None:
    """Put a local file at an s3:// URI (a whole object: readers see the old one or the new one)."""
    _s3_call(uri, timeout_s, retries, lambda c, b, k: c.upload_file(str(path), b, k))


def download(uri: str, path: str | Path, timeout_s: float = 10.0, retries: int = 3) -> bool:
    """Fetch an S3 object to a local file (written whole, through atomic_file); False when there is none."""
    try:
        with atomic_file(path) as tmp:
            _s3_call(uri, timeout_s, retries, lambda c, b, k: c.download_file(b, k, str(tmp)))
    except MissingObject:
        return False
    return True


def delete(uri: str, timeout_s: float = 10.0, retries: int = 3) -> None:
    """Remove an S3 object (none there is fine)."""
    _s3_call(uri, timeout_s, retries, lambda c, b, k: c.delete_object(Bucket=b, Key=k))


# who writes a temporary sibling: this host and process, so a later run can tell a dead writer's
# leftovers from a live one's (on a volume shared by several pods, only its own host's)
_HOST = "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:40] or "host"
_OWNER = f"{_HOST}-{os.getpid()}"


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise DsehError(f"cannot write {path}: a file stands where its folder {path.parent} should be") from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_leftovers(path: Path) -> list[Path]:
    """Remove what a killed writer of `path` (on this host) left beside it: temporary copies are
    deleted; a previous version moved aside but never replaced (killed between the two renames)
    is put back. Returns what was cleaned."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(tmp|old)-{re.escape(_HOST)}-(\d+)(-.*)?")
    cleaned = []
    for p in path.parent.glob(f".{glob.escape(path.name)}.*"):
        m = pattern.fullmatch(p.name)
        if not m or int(m.group(2)) == os.getpid() or _alive(int(m.group(2))):
            continue
        if m.group(1) == "old" and not path.exists():
            os.replace(p, path)
        elif p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        cleaned.append(p)
    return cleaned


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path to write; on success it replaces `path` in one rename, on any
    failure it is removed and `path` is left as it was."""
    path = Path(path)
    _make_parent(path)
    clean_leftovers(path)
    tmp = path.with_name(f".{path.name}.tmp-{_OWNER}")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


@contextmanager
def atomic_dir(out_dir: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `out_dir` in one rename.

    On any failure the temporary directory is removed and `out_dir` is left as it was, so no
    directory that looks complete is ever half-written.
    """
    out = Path(out_dir)
    _make_parent(out)
    clean_leftovers(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{_OWNER}-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should not be
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{_OWNER}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def copy_dir(src: str | Path, dst: str | Path) -> None:
    """Copy the folder `src` to `dst` through atomic_dir: `dst` appears whole or not at all."""
    with atomic_dir(dst) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
