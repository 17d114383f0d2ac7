"""Reading the archive formats sources ship in: tar / tar.gz members streamed, and jsonl possibly inside a tgz."""
from __future__ import annotations

import io
import json
import posixpath
import tarfile
from typing import Iterator

import pyarrow.fs as pafs

from pipeline.core import storage
from pipeline.data.sources.shards import ArchiveTask
from pipeline.data.sources.shards import RawSample


def list_archives(folder: str, suffixes: tuple[str, ...]) -> list[str]:
    """URIs of files directly in folder whose names end with one of suffixes, sorted."""
    if not storage.exists(folder):
        raise FileNotFoundError(f"archive folder {folder!r} does not exist")
    return [u for u in storage.list_files(folder) if u.endswith(suffixes)]


def iter_tar(uri: str) -> Iterator[tuple[str, bytes]]:
    """(member path without a leading './', bytes) of every regular file in a tar/tgz, streamed in archive order."""
    fs, path = storage.filesystem(uri)
    with fs.open_input_stream(path) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for m in tar:
            if m.isfile():
                name = m.name[2:] if m.name.startswith("./") else m.name
                yield name, tar.extractfile(m).read()


def iter_jsonl(uri: str) -> Iterator[dict]:
    """Records of a .jsonl file, or of the first .jsonl inside a .tgz / .tar.gz (how JourneyDB ships them)."""
    if not storage.exists(uri):
        raise FileNotFoundError(f"annotation file {uri!r} does not exist")
    if uri.endswith((".tgz", ".tar.gz", ".tar")):
        for name, data in iter_tar(uri):
            if name.endswith(".jsonl"):
                yield from _lines(io.BytesIO(data), uri)
                return
        raise ValueError(f"{uri!r} holds no .jsonl file")
    fs, path = storage.filesystem(uri)
    with fs.open_input_stream(path, compression="detect") as f:
        yield from _lines(f, uri)


def _lines(f, uri: str) -> Iterator[dict]:
    for i, line in enumerate(io.TextIOWrapper(f, encoding="utf-8")):
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{uri!r} line {i + 1} is not JSON: {e}") from e


def stem(path: str) -> str:
    """'./046/abc.jpg' -> 'abc'."""
    return posixpath.basename(path).split(".")[0]


def is_file(uri: str) -> bool:
    """Whether uri is a regular file (not a folder)."""
    fs, path = storage.filesystem(uri)
    return fs.get_file_info(path).type == pafs.FileType.File


def read_listed_images(task) -> Iterator:
    """Reader for ArchiveTask params {"base": folder or .zip, "items": [(file name, caption, extra), ...]}.

    In a zip the file is found by its base name, whatever folder the zip puts it under.
    """
    import posixpath as pp
    import zipfile

    base, items = task.params["base"], task.params["items"]
    if base.endswith(".zip"):
        fs, path = storage.filesystem(base)
        with fs.open_input_file(path) as f, zipfile.ZipFile(f) as z:
            names = {pp.basename(n): n for n in z.namelist() if not n.endswith("/")}
            for fname, caption, extra in items:
                member = names.get(pp.basename(fname))
                yield (RawSample(fname, z.read(member), caption, extra) if member else
                       RawSample(fname, None, caption, extra, reason="missing_image"))
        return
    for fname, caption, extra in items:
        try:
            yield RawSample(fname, storage.read_bytes(storage.join(base, fname)), caption, extra)
        except FileNotFoundError:
            yield RawSample(fname, None, caption, extra, reason="missing_image")


def chunk_tasks(items: list, per_shard: int, base: str, reader) -> list:
    """Split a fixed, ordered item list into ArchiveTasks of per_shard items (shard id = chunk index)."""
    if per_shard < 1:
        raise ValueError(f"images_per_shard must be >= 1, got {per_shard}")
    return [ArchiveTask(i, f"{posixpath.basename(base)}[{i * per_shard}:{(i + 1) * per_shard}]", reader,
                        {"base": base, "items": items[i * per_shard:(i + 1) * per_shard]})
            for i in range((len(items) + per_shard - 1) // per_shard)]
