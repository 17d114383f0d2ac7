"""Source adapters: each turns a dataset's published layout into a URL list (for download()) or into shards.

`get(kind)` returns a `SourceSpec`: its `output` says what `run(config, out_uri)` writes:
- "urls": a URL list Parquet at out_uri (url, caption, extra columns) -> then pipeline.data.download.download;
- "shards": webdataset shards in img2dataset's layout in the folder out_uri (+ _report.json, _SUCCESS).
Configs are typed dataclasses built strictly from dicts (unknown keys raise), e.g. from a recipe's `sources:`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import contextlib
import functools
import typing
from typing import Any, Callable, ContextManager

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
    # For sources that need something running while they are fetched (the synthetic demo's HTTP server):
    # session(config, raw_uri) yields the config to prepare and download with. Default: the config as is.
    session: Callable[[Any, str], ContextManager[Any]] | None = None

    def open(self, cfg: Any, raw_uri: str) -> ContextManager[Any]:
        """The adapter's session around prepare + download (a no-op for most sources)."""
        return self.session(cfg, raw_uri) if self.session else contextlib.nullcontext(cfg)

    def build(self, options: dict | None) -> Any:
        """The typed config from a plain dict: unknown keys or wrongly typed values -> ValueError naming them."""
        from pydantic import ValidationError

        try:
            checked = _strict_model(self.config).model_validate(dict(options or {}))
        except ValidationError as e:
            bad = "; ".join(f"options.{'.'.join(map(str, x['loc']))} = {x.get('input')!r}: {x['msg']}"
                            for x in e.errors())
            raise ValueError(f"source kind {self.kind!r}: {bad}") from None
        return _to_dataclass(self.config, checked)

    def prepare(self, options: dict | Any, out_uri: str) -> dict:
        """Run the adapter with a dict or config object; returns its report."""
        cfg = options if isinstance(options, self.config) else self.build(options)
        return self.run(cfg, out_uri)


@functools.lru_cache(maxsize=None)
def _strict_model(cls: type):
    """A strict pydantic model with the fields of dataclass `cls` (nested dataclasses too): unknown keys and
    wrong types are errors, as everywhere in the plan."""
    from pydantic import ConfigDict, create_model

    hints = typing.get_type_hints(cls)
    fields = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = _strict_model(hints[f.name]) if dataclasses.is_dataclass(hints[f.name]) else hints[f.name]
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
            default = default.__dict__ if dataclasses.is_dataclass(default) else default
        else:
            default = ...
        fields[f.name] = (tp, default)
    return create_model(f"{cls.__name__}Options", __config__=ConfigDict(strict=True, extra="forbid"), **fields)


def _to_dataclass(cls: type, checked) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name in checked.model_fields_set | set(type(checked).model_fields):
        value = getattr(checked, name)
        if dataclasses.is_dataclass(hints[name]) and not dataclasses.is_dataclass(value):
            value = _to_dataclass(hints[name], value) if hasattr(value, "model_fields") else hints[name](**value)
        kwargs[name] = value
    return cls(**kwargs)


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
    SourceSpec("synthetic", synthetic.OUTPUT, synthetic.SyntheticSourceConfig, synthetic.run, synthetic.__doc__,
               synthetic.session),
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
