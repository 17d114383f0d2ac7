"""One storage API over a local folder or S3 (`s3://bucket/prefix`), with atomic commits.

S3 endpoint and region come from the standard AWS variables (`AWS_ENDPOINT_URL`, `AWS_DEFAULT_REGION`), so
the same URIs work against AWS, MinIO or moto's server on loopback. Credentials are left to the AWS
credential chain and are never read, printed or forwarded by this module.
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import uuid
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

# Non-secret settings that Ray workers need to reach the same S3 endpoint as the driver.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION")


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or an s3:// URI."""
    uri = str(uri)
    if is_s3(uri):
        return "s3://" + posixpath.join(uri[len("s3://"):], *parts)
    return os.path.join(uri, *parts)


def endpoint_url() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def forwarded_env() -> dict[str, str]:
    """Environment (no credentials) to hand to Ray workers so they resolve URIs like the driver."""
    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a local path or s3:// URI."""
    uri = str(uri)
    if is_s3(uri):
        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
        endpoint = endpoint_url()
        fs = pafs.S3FileSystem(
            endpoint_override=endpoint, region=region,
            scheme="http" if endpoint and endpoint.startswith("http://") else "https",
            allow_bucket_creation=False,
        )
        return fs, uri[len("s3://"):]
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def makedirs(uri: str) -> None:
    if not is_s3(uri):
        Path(uri).mkdir(parents=True, exist_ok=True)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{uri!r} does not exist") from e


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object atomically: a reader sees the old object, or the complete new one, never a part.

    Local files are written beside their target and renamed into place; an S3 PUT is atomic by itself.
    """
    fs, path = filesystem(uri)
    if is_s3(uri):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)


def upload_file(path: str, uri: str, chunk: int = 1 << 24) -> None:
    """Copy a local file to `uri` in chunks (never whole in memory), atomically as write_bytes."""
    fs, target = filesystem(uri)
    if is_s3(uri):
        with open(path, "rb") as src, fs.open_output_stream(target) as dst:
            for block in iter(lambda: src.read(chunk), b""):
                dst.write(block)
        return
    dest = Path(target)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
    shutil.copyfile(path, tmp)
    os.replace(tmp, dest)


def sha256(uri: str, chunk: int = 1 << 24) -> str:
    """The SHA-256 of an object, read in chunks."""
    fs, path = filesystem(uri)
    h = hashlib.sha256()
    try:
        with fs.open_input_stream(path) as f:
            for block in iter(lambda: f.read(chunk), b""):
                h.update(block)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{uri!r} does not exist") from e
    return h.hexdigest()


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def write_parquet(uri: str, table, **kwargs) -> None:
    """Write a pyarrow Table as one Parquet object, atomically (kwargs go to pyarrow.parquet.write_table)."""
    import io

    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf, **kwargs)
    write_bytes(uri, buf.getvalue())


def read_parquet(uri: str, columns: list[str] | None = None):
    """A Parquet file from a local path or s3:// URI as a pyarrow Table (optionally only `columns`)."""
    import pyarrow.parquet as pq

    fs, path = filesystem(uri)
    return pq.read_table(path, columns=columns, filesystem=fs)


def list_files(uri: str, suffix: str = "", recursive: bool = False) -> list[str]:
    """Sorted URIs of the files under `uri` whose names end with `suffix` (hidden temporaries skipped)."""
    fs, path = filesystem(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))
    except FileNotFoundError:
        return []
    prefix = "s3://" if is_s3(uri) else ""
    return sorted(
        prefix + info.path for info in infos
        if info.type == pafs.FileType.File and info.base_name.endswith(suffix)
        and not info.base_name.startswith(".")
    )


def delete(uri: str) -> None:
    """Remove a file or a whole folder; missing is fine."""
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)
