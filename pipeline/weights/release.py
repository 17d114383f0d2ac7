"""Released checkpoints -> our exports: safe reading, the name map, every shape checked, the export written.

A family declares its `ReleaseFormat` (model/family.py; model/microdit/release.py, model/emmdit/release.py): what its
public release looks like: its variants (file, network config, encoders, sampler, published scores), the rule that
renames a release tensor to ours and back, and the release-only buffers our network rebuilds from its config.
Files load through safetensors or `torch.load(weights_only=True)`, never a plain pickle.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import re
import tempfile
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from model import family as families
from model.family import ReleaseFormat, Variant
from model.objectives.configs import config_from_dict as objective_config
from pipeline.core import layout, storage

WEIGHTS, EMA, CONFIG = "model.safetensors", "ema.safetensors", "config.json"


def get_format(family: str) -> ReleaseFormat:
    """The release format `family` declares; ValueError naming the family (or the known ones) otherwise."""
    fmt = families.get(family).release if family in families.REGISTRY else None
    if fmt is None:
        released = sorted(n for n in families.REGISTRY if families.get(n).release is not None)
        raise ValueError(f"no released weights known for family {family!r}; expected one of {released}")
    return fmt


def variant_for(fmt: ReleaseFormat, path: str, variant: str | None) -> Variant:
    """The variant named by `variant`, else the one whose release file name `path` has."""
    base = os.path.basename(str(path))
    by_file = {v.file: v for v in fmt.variants.values()}
    if variant is None:
        if base not in by_file:
            raise ValueError(f"cannot tell the {fmt.family} variant of {base!r} from its name; pass --variant, "
                             f"one of {sorted(fmt.variants)} (release files: {sorted(by_file)})")
        return by_file[base]
    if variant not in fmt.variants:
        raise ValueError(f"unknown {fmt.family} variant {variant!r}; expected one of {sorted(fmt.variants)}")
    if base in by_file and by_file[base].name != variant:
        raise ValueError(f"{base!r} is the release file of variant {by_file[base].name!r}, not {variant!r}")
    return fmt.variants[variant]


# ------------------------------------------------------------------------------------------- reading

def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _head(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(9)


def _is_safetensors(head: bytes) -> bool:
    return len(head) == 9 and head[8:9] == b"{"  # 8-byte header length, then the JSON header


def read_tensors(path: str) -> dict[str, torch.Tensor]:
    """A file's tensors: safetensors, or a torch.save of a plain {name: tensor} dict (weights_only=True).

    FileNotFoundError if it is missing; ValueError naming the file if it is damaged or truncated, if it holds
    anything but tensors (a pickle of other objects is refused unread), or if it is empty.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {path!r} does not exist")
    head = _head(path)
    if _is_safetensors(head):
        from safetensors.torch import load_file

        try:
            state = load_file(path)
        except Exception as e:  # safetensors raises its own error type for a damaged file
            raise ValueError(f"{path!r} is not a readable safetensors file (truncated or damaged?): {e}") from None
    else:
        try:
            # Zip-format files (torch.save's default) are memory-mapped: a 4.7 GB file is not read twice.
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=head[:4] == b"PK\x03\x04")
        except pickle.UnpicklingError as e:
            raise ValueError(f"{path!r} is not a plain state dict of tensors: it pickles {_pickled_global(e)}, "
                             "which loading would have to run; refused (export the weights as a state dict of "
                             "tensors, or as safetensors)") from None
        except Exception as e:  # RuntimeError from the zip reader, EOFError, ...
            raise ValueError(f"{path!r} cannot be read as a torch.save file (truncated or damaged?): "
                             f"{type(e).__name__}: {e}") from None
    if not isinstance(state, Mapping):
        raise ValueError(f"{path!r} holds a {type(state).__name__}; expected a plain state dict {{name: tensor}}")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ValueError(f"{path!r} is not a plain state dict of tensors: entry {key!r} is a "
                             f"{type(value).__name__}")
    if not state:
        raise ValueError(f"{path!r} holds no tensors")
    return dict(state)


def _pickled_global(error: Exception) -> str:
    """What a refused pickle would have loaded, from torch's message ("GLOBAL module.Name"), without the rest of it
    (its terminal escape codes, and its advice to turn weights_only off)."""
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    return f"the global {found.group(1)!r}" if found else "an object that is not a tensor"


# ------------------------------------------------------------------------------------------- mapping

def expected_shapes(fmt: ReleaseFormat, cfg: Any) -> dict[str, tuple[int, ...]]:
    """Our state dict's names and shapes for `cfg` (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = fmt.build(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _few(items: list[str], n: int = 6) -> str:
    return f"{items[:n]}{' ...' if len(items) > n else ''} ({len(items)})"


@dataclass
class Converted:
    """Our-layout tensors of a release file, and what was left out on purpose."""

    state: dict[str, torch.Tensor]
    release_buffers: list[str]
    dropped: list[str]


def to_ours(fmt: ReleaseFormat, release: Mapping[str, torch.Tensor], cfg: Any, source: str,
            hints: bool = True) -> Converted:
    """Rename a release state dict to ours and check it against `cfg`: every tensor mapped, none missing, every
    shape equal, release buffers as `cfg` rebuilds them. ValueError naming each bad tensor otherwise."""
    release = _unwrap(release)
    expected = expected_shapes(fmt, cfg)
    state, origin, extra, dropped, buffers, bad = {}, {}, [], [], [], []
    for key, value in release.items():
        if any(key.startswith(p) for p in fmt.dropped):
            dropped.append(key)
            continue
        if key in fmt.buffers:
            buffers.append(key)
            want = fmt.buffers[key](cfg)
            if tuple(value.shape) != tuple(want.shape):
                bad.append(f"{key}: file {tuple(value.shape)} vs model {tuple(want.shape)}")
            elif key in fmt.checked_buffers and not torch.allclose(value.float(), want, atol=1e-4):
                bad.append(f"{key}: values differ from the ones this config rebuilds (another resolution or "
                           "position scale?)")
            continue
        ours = fmt.to_ours(key)
        if ours is None or ours not in expected:
            extra.append(key)
            continue
        origin[ours] = key
        if tuple(value.shape) != expected[ours]:
            bad.append(f"{key} (ours {ours}): file {tuple(value.shape)} vs model {expected[ours]}")
            continue
        if not value.is_floating_point():
            bad.append(f"{key}: dtype {value.dtype}, expected a floating-point tensor")
            continue
        state[ours] = value.float().contiguous()
    missing = sorted(fmt.to_release(k) for k in expected.keys() - origin.keys())
    missing_buffers = sorted(set(fmt.buffers) - set(buffers))
    if extra or bad or missing or missing_buffers:
        msg = (f"{source!r} does not fit {fmt.family} {_describe(fmt, cfg)}: missing tensors "
               f"{_few(missing + missing_buffers)}, extra tensors {_few(sorted(extra))}, shape mismatches {_few(bad, 4)}")
        raise ValueError(msg + (_hint(fmt, release, cfg, bad and not extra and not missing) if hints else ""))
    return Converted(state, sorted(buffers), sorted(dropped))


def _unwrap(release: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """The network's tensors of a whole-pipeline state dict (keys `dit.*` beside `vae.*`, `text_encoder.*`)."""
    if any(k.startswith("dit.") for k in release) and not any(k.startswith(("x_embedder.", "blocks."))
                                                               for k in release):
        return {k[len("dit."):]: v for k, v in release.items() if k.startswith("dit.")}
    return release


def _hint(fmt: ReleaseFormat, release, cfg, only_shapes: bool) -> str:
    """Which family or variant a file that does not fit seems to be."""
    for other in families.REGISTRY:  # a file of another family?
        o = families.get(other).release
        if o is not None and other != fmt.family and o.signature and any(k.startswith(o.signature) for k in release):
            return f"; it looks like a {other} release: use --family {other}"
    if only_shapes:  # a file of another variant?
        for v in fmt.variants.values():
            vcfg = fmt.config(v.preset, v.overrides)
            if vcfg != cfg and _fits(fmt, release, vcfg):
                return f"; it fits variant {v.name!r} ({v.file})"
    return ""


def _describe(fmt: ReleaseFormat, cfg) -> str:
    d = fmt.config_to_dict(cfg)
    keys = ("input_size", "in_channels", "dim", "depth", "pos_interp_scale")
    return "(" + ", ".join(f"{k}={d[k]}" for k in keys if k in d) + ")"


def _fits(fmt: ReleaseFormat, release, cfg) -> bool:
    try:
        to_ours(fmt, release, cfg, "", hints=False)
    except ValueError:
        return False
    return True


def to_release_state(fmt: ReleaseFormat, state: Mapping[str, torch.Tensor], cfg: Any) -> dict[str, torch.Tensor]:
    """Our state dict in the release's layout, release-only buffers rebuilt from `cfg` (the inverse map)."""
    out = {fmt.to_release(k): v for k, v in state.items()}
    out.update({k: make(cfg) for k, make in fmt.buffers.items()})
    return out


# ------------------------------------------------------------------------------------------- export

def export_config(fmt: ReleaseFormat, v: Variant, cfg: Any, source: dict[str, Any]) -> dict[str, Any]:
    """config.json of an imported export: what generate and training need, and where the weights came from."""
    # The objective with all its constants (a variant states only those that differ from the defaults).
    objective = dataclasses.asdict(objective_config(v.objective))
    return {"family": fmt.family, "model": fmt.config_to_dict(cfg), "objective": objective,
            "encoders": dict(v.encoders), "sampler": dict(v.sampler), "step": None, "source": source}


def write_weights(state: Mapping[str, torch.Tensor], uris: list[str]) -> None:
    """A safetensors file of `state` at each URI: serialised once to a local file straight from the tensors (a
    memory-mapped release is never copied into memory), then copied in chunks (pipeline/core/storage.py)."""
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(prefix="microdit-weights-") as folder:
        local = os.path.join(folder, WEIGHTS)
        save_file(dict(state), local)
        for uri in uris:
            storage.upload_file(local, uri)


def import_weights(path: str, out: str, family: str, variant: str | None = None) -> str:
    """Read a released checkpoint, check it, and write our export (model + EMA safetensors, config.json,
    marker last) under `out`; returns `out`. Idempotent: an export of the same file is left as it is."""
    fmt = get_format(family)
    v = variant_for(fmt, path, variant)
    if not os.path.isfile(str(path)):
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    digest = sha256_file(path)
    source = {"file": os.path.basename(str(path)), "sha256": digest, "variant": v.name, "repo": fmt.repo,
              "scores": dict(v.scores)}
    if layout.is_complete(out):
        done = storage.read_json(storage.join(out, CONFIG)).get("source") or {}
        if (done.get("sha256"), done.get("variant")) == (digest, v.name):
            return out
        raise ValueError(f"{out!r} already holds a finished export ({done.get('file', 'a trained model')}); "
                         "import into an empty folder")
    cfg = fmt.config(v.preset, v.overrides)
    converted = to_ours(fmt, read_tensors(path), cfg, str(path))
    source.update(release_buffers=converted.release_buffers, dropped=converted.dropped)
    # A release has one set of weights: the EMA is the same file.
    write_weights(converted.state, [storage.join(out, WEIGHTS), storage.join(out, EMA)])
    storage.write_json(storage.join(out, CONFIG), export_config(fmt, v, cfg, source))
    layout.mark_complete(out, json.dumps({"source": source["file"], "sha256": digest}))
    return out


def release_state_of_export(folder: str) -> dict[str, torch.Tensor]:
    """An export (ours, imported or trained) back in its family's release layout."""
    from safetensors.torch import load

    config = storage.read_json(storage.join(folder, CONFIG))
    fmt = get_format(config["family"])
    cfg = fmt.config_from_dict(config["model"])
    return to_release_state(fmt, load(storage.read_bytes(storage.join(folder, WEIGHTS))), cfg)


# ------------------------------------------------------------------------------------------- training init

def is_export(uri: str) -> bool:
    return storage.exists(storage.join(uri, CONFIG)) and storage.exists(storage.join(uri, WEIGHTS))


def prepare_init(path: str, family: str, model_dict: dict, work_uri: str) -> str:
    """Weights to start a stage from, checked on the driver against the stage's network (`model_dict`).

    `path` is an export folder (ours or imported) or a released file; a released file is converted once to
    `{work_uri}/model.safetensors`. Returns the safetensors URI the workers load. ValueError naming the bad
    tensors (or the family) if the weights do not fit the stage's model.
    """
    fmt = get_format(family)
    cfg = fmt.config_from_dict(model_dict)
    if is_export(path):
        config = storage.read_json(storage.join(path, CONFIG))
        if config.get("family", families.DEFAULT) != family:
            raise ValueError(f"init.path {path!r} is a {config.get('family')} export; this stage trains {family}")
        uri = storage.join(path, WEIGHTS)
        _check_ours(fmt, _shapes(uri), cfg, uri)
        return uri
    if not os.path.isfile(str(path)):
        raise FileNotFoundError(f"init.path {path!r} is neither an export folder ({CONFIG} + {WEIGHTS}) nor a "
                                "released weights file")
    digest = sha256_file(path)
    uri, marker = storage.join(work_uri, WEIGHTS), storage.join(work_uri, "source.json")
    if storage.exists(marker) and storage.exists(uri) and storage.read_json(marker).get("sha256") == digest \
            and storage.read_json(marker).get("model") == model_dict:
        return uri
    converted = to_ours(fmt, read_tensors(path), cfg, str(path))
    write_weights(converted.state, [uri])
    storage.write_json(marker, {"file": os.path.basename(str(path)), "sha256": digest, "model": model_dict})
    return uri


def _shapes(uri: str) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a safetensors file (a local one: from its header alone)."""
    from safetensors import safe_open
    from safetensors.torch import load

    try:
        if not storage.is_s3(uri):
            with safe_open(uri, framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        return {k: tuple(v.shape) for k, v in load(storage.read_bytes(uri)).items()}
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(f"weights {uri!r} are not a readable safetensors file: {e}") from None


def _check_ours(fmt: ReleaseFormat, shapes: Mapping[str, tuple[int, ...]], cfg, source: str) -> None:
    expected = expected_shapes(fmt, cfg)
    missing = sorted(expected.keys() - shapes.keys())
    extra = sorted(shapes.keys() - expected.keys())
    bad = sorted(f"{k}: weights {shapes[k]} vs model {expected[k]}"
                 for k in expected.keys() & shapes.keys() if shapes[k] != expected[k])
    if missing or extra or bad:
        raise ValueError(f"weights {source!r} do not fit this stage's {fmt.family} model {_describe(fmt, cfg)}: "
                         f"missing {_few(missing)}, extra {_few(extra)}, shape mismatches {_few(bad, 4)}")

