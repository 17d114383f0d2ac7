"""Synthetic coloured shapes (pipeline/testing/synthetic.py) -> URL list, for the demo and tests.

Decision: the URL list points at a server the caller runs for the duration of the download step
(`pipeline.testing.synthetic.serve_folder(images_dir)` on 127.0.0.1, port 0), and `base_url` is that server's URL. The
images are written once (idempotent for the same parameters); the list is rewritten on every call, so a rerun
after a restart points at the new port. download() fingerprints lists without their host, so a partial download
resumes against the re-pointed list. Usage:

    with serve_folder(images_dir) as server:
        sources.prepare("synthetic", {"images_dir": images_dir, "base_url": server.url, "n": 512}, urls_uri)
        download(urls_uri, shards_uri, cfg)
"""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.data.sources.urls import read_report
from pipeline.testing.synthetic import write_synthetic_dataset

OUTPUT = "urls"


@dataclass
class SyntheticSourceConfig:
    """Where the images go, the running server's base URL, and the generator's parameters."""

    images_dir: str
    base_url: str
    n: int = 256
    size: int = 128
    seed: int = 0
    bad_fraction: float = 0.0
    opt_out_fraction: float = 0.0
    large_fraction: float = 0.5
    positions: list[str] | None = None  # restrict shape positions (names of synthetic.POSITIONS); None: all
    sizes: list[str] | None = None      # restrict shape sizes (names of synthetic.SIZES); None: all


def run(cfg: SyntheticSourceConfig, out_uri: str) -> dict:
    """Write (or reuse) the synthetic images and (re)write the URL list pointing at cfg.base_url."""
    if not cfg.base_url.startswith(("http://", "https://")):
        raise ValueError(f"base_url must be the serving server's http URL, got {cfg.base_url!r}")
    ds = write_synthetic_dataset(cfg.images_dir, cfg.n, size=cfg.size, seed=cfg.seed, bad_fraction=cfg.bad_fraction,
                                 opt_out_fraction=cfg.opt_out_fraction, large_fraction=cfg.large_fraction,
                                 positions=cfg.positions, sizes=cfg.sizes)
    ds.write_url_list(out_uri, cfg.base_url)
    kinds: dict[str, int] = {}
    for e in ds.entries:
        kinds[e.kind] = kinds.get(e.kind, 0) + 1
    return {**read_report(out_uri), "source": "synthetic", "kinds": kinds, "images_dir": cfg.images_dir}
