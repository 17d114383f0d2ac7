"""Source adapters: each turns a dataset's published layout into a URL list (for download()) or into shards.

`get(kind)` returns a `SourceSpec`: its `output` says what `run(config, out_uri)` writes:
- "urls": a URL list Parquet at out_uri (url, caption, extra columns) -> then pipeline.data.download.download;
- "shards": webdataset shards in img2dataset's layout in the folder out_uri (+ _report.json, _SUCCESS).
Configs are typed dataclasses built strictly from dicts (unknown keys raise), e.g. from a recipe's `sources:`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from pipeline.core.configs import from_dict
from pipeline.data.sources import cc12m, coco, diffusiondb, journeydb, sa1b, synthetic, textcaps
from pipeline.data.sources.shards import IngestConfig

__all__ = ["SourceSpec", "get", "known", "prepare", "IngestConfig"]


@dataclass(frozen=True)
class SourceSpec:
    """One dataset adapter: its kind, what it writes ("urls" or "shards"), its config type and run function."""

    kind: str
    output: str
    config: type
    run: Callable[[Any, str], dict]
    doc: str

    def build(self, options: dict | None) -> Any:
        """The typed config from a plain dict (unknown keys -> ValueError)."""
        return from_dict(self.config, options or {}, where=f"sources.{self.kind}")

    def prepare(self, options: dict | Any, out_uri: str) -> dict:
        """Run the adapter with a dict or config object; returns its report."""
        cfg = options if isinstance(options, self.config) else self.build(options)
        return self.run(cfg, out_uri)


_SPECS = {s.kind: s for s in (
    SourceSpec("cc12m", cc12m.OUTPUT, cc12m.CC12MConfig, cc12m.run, cc12m.__doc__),
    SourceSpec("diffusiondb", diffusiondb.OUTPUT, diffusiondb.DiffusionDBConfig, diffusiondb.run,
               diffusiondb.__doc__),
    SourceSpec("journeydb", journeydb.OUTPUT, journeydb.JourneyDBConfig, journeydb.run, journeydb.__doc__),
    SourceSpec("sa1b", sa1b.OUTPUT, sa1b.SA1BConfig, sa1b.run, sa1b.__doc__),
    SourceSpec("textcaps", textcaps.OUTPUT, textcaps.TextCapsConfig, textcaps.run, textcaps.__doc__),
    SourceSpec("textcaps_local", textcaps.OUTPUT_LOCAL, textcaps.TextCapsLocalConfig, textcaps.run_local,
               textcaps.__doc__),
    SourceSpec("coco2014_val", coco.OUTPUT, coco.COCOConfig, coco.run, coco.__doc__),
    SourceSpec("synthetic", synthetic.OUTPUT, synthetic.SyntheticSourceConfig, synthetic.run, synthetic.__doc__),
)}


def known() -> list[str]:
    """Every registered source kind."""
    return sorted(_SPECS)


def get(kind: str) -> SourceSpec:
    """The adapter for `kind`; ValueError naming the known kinds if there is none."""
    try:
        return _SPECS[kind]
    except (KeyError, TypeError):
        raise ValueError(f"unknown source kind {kind!r}; known kinds: {known()}") from None


def prepare(kind: str, options: dict | Any, out_uri: str) -> dict:
    """Run the adapter of `kind` with `options` into out_uri; returns its report."""
    return get(kind).prepare(options, out_uri)
