"""Synthetic coloured shapes (pipeline/data/shapes.py) -> URL list, for the demo and tests.

The URL list points at a server that runs for the duration of the download step (`session`: the images are
served from `images_dir` by pipeline.data.shapes.serve_folder on 127.0.0.1, port 0), and `base_url` is
that server's URL. The images are written once (idempotent for the same parameters); the list is rewritten on
every call, so a rerun after a restart points at the new port. download() fingerprints lists without their
host, so a partial download resumes against the re-pointed list. Usage:

    with spec.session(cfg, raw_uri) as cfg:      # serves the images; fills images_dir and base_url
        spec.run(cfg, urls_uri)
        download(urls_uri, shards_uri, download_cfg)
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.core import storage
from pipeline.data.sources.urls import read_report
from pipeline.data.shapes import serve_folder, write_synthetic_dataset

OUTPUT = "urls"


@dataclass
class SyntheticSourceConfig:
    """The generator's parameters; `images_dir` and `base_url` are filled by `session` unless given."""

    images_dir: str | None = None
    base_url: str | None = None
    n: int = 256
    size: int = 128
    seed: int = 0
    bad_fraction: float = 0.0
    opt_out_fraction: float = 0.0
    large_fraction: float = 0.5
    positions: list[str] | None = None  # restrict shape positions (names of synthetic.POSITIONS); None: all
    sizes: list[str] | None = None      # restrict shape sizes (names of synthetic.SIZES); None: all


def local_images_dir(raw_uri: str) -> str:
    """The images' local folder: the run's raw folder for a local root, a folder under the temp dir for s3://."""
    if not storage.is_s3(raw_uri):
        return raw_uri
    return str(Path(tempfile.gettempdir()) / "microdit-synthetic" / hashlib.sha1(raw_uri.encode()).hexdigest()[:12])


@contextlib.contextmanager
def session(cfg: SyntheticSourceConfig, raw_uri: str):
    """Serve the images over loopback HTTP while the caller prepares and downloads; yields the filled config."""
    images_dir = cfg.images_dir or local_images_dir(raw_uri)
    Path(images_dir).mkdir(parents=True, exist_ok=True)
    with serve_folder(images_dir) as server:
        yield dataclasses.replace(cfg, images_dir=images_dir, base_url=server.url)


def run(cfg: SyntheticSourceConfig, out_uri: str) -> dict:
    """Write (or reuse) the synthetic images and (re)write the URL list pointing at cfg.base_url."""
    if not cfg.images_dir:
        raise ValueError("synthetic source: images_dir is not set (run inside `session`, or give it)")
    if not (cfg.base_url or "").startswith(("http://", "https://")):
        raise ValueError(f"base_url must be the serving server's http URL, got {cfg.base_url!r}")
    ds = write_synthetic_dataset(cfg.images_dir, cfg.n, size=cfg.size, seed=cfg.seed, bad_fraction=cfg.bad_fraction,
                                 opt_out_fraction=cfg.opt_out_fraction, large_fraction=cfg.large_fraction,
                                 positions=cfg.positions, sizes=cfg.sizes)
    ds.write_url_list(out_uri, cfg.base_url)
    kinds: dict[str, int] = {}
    for e in ds.entries:
        kinds[e.kind] = kinds.get(e.kind, 0) + 1
    return {**read_report(out_uri), "source": "synthetic", "kinds": kinds, "images_dir": cfg.images_dir}
