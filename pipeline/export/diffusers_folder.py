"""An export -> the standard diffusers folder, loadable where microdit is not installed:

    model_index.json            the pipeline class and each component as [module, class], plus sampler defaults
    pipeline_<family>.py        the pipeline's code (bundle.py: one self-contained file)
    transformer/                config.json, diffusion_pytorch_model.safetensors, transformer_<family>.py
    scheduler/                  scheduler_config.json (+ scheduler_<name>.py when the scheduler is ours)
    vae/  text_encoder/  tokenizer/   as diffusers and transformers save them (+ code for the stand-in VAE)
    README.md                   the model card (model_card.py); samples.png when the run drew a grid

    DiffusionPipeline.from_pretrained(OUT, trust_remote_code=True)

The folder is staged locally and published in one go (a local folder by rename, s3:// by upload), the marker last;
a rerun for the same weights and settings leaves a finished folder as it is.
"""
from __future__ import annotations

import json
import os
import tempfile

import diffusers

from pipeline.core import layout, storage
from pipeline.export.bundle import bundle
from pipeline.export.export_folder import open_export
from pipeline.export.loading import load_pipeline
from pipeline.export.model_card import GRID_NAME, gather, model_card

COMPONENTS = ("transformer", "scheduler", "vae", "text_encoder", "tokenizer")
LIBRARIES = ("diffusers", "transformers")  # what diffusers loads components from without code of ours


def _code_name(component: str, cls: type) -> str:
    """The file stem of a component's bundled code: `{component}_{module}` (the family's name for a module that is
    called like its component, as model/microdit/transformer.py)."""
    parts = cls.__module__.split(".")
    return f"{component}_{parts[-2] if parts[-1] == component else parts[-1]}"


def _entry(component: str, obj, staging: str) -> list[str]:
    """model_index.json's [module, class] of a component, writing its bundled code when the class is ours."""
    cls = type(obj)
    library = cls.__module__.split(".")[0]
    if library in LIBRARIES:
        return [library, cls.__name__]
    stem = _code_name(component, cls)
    with open(os.path.join(staging, component, stem + ".py"), "w", encoding="utf-8") as f:
        f.write(bundle(cls.__module__, f"{cls.__name__}: the {component} of a microdit diffusers folder."))
    return [stem, cls.__name__]


def _request(export, use_ema: bool, vae_spec, text_spec) -> dict:
    """What decides the folder's content: the weights (by hash) and every setting."""
    return {"weights_sha256": storage.sha256(export.weights), "config": export.config, "use_ema": use_ema,
            "vae": vae_spec, "text": text_spec}


def write_folder(pipe, export, staging: str, facts, repo_hint: str) -> None:
    """The folder's files under the local `staging` directory (module docstring)."""
    index = {"_class_name": None, "_diffusers_version": diffusers.__version__}
    for name in COMPONENTS:
        obj = getattr(pipe, name)
        os.makedirs(os.path.join(staging, name), exist_ok=True)
        obj.save_pretrained(os.path.join(staging, name))
        index[name] = _entry(name, obj, staging)
    cls = type(pipe)
    stem = f"pipeline_{export.family.name}"
    with open(os.path.join(staging, stem + ".py"), "w", encoding="utf-8") as f:
        f.write(bundle(cls.__module__, f"{cls.__name__}: the pipeline of a microdit diffusers folder."))
    index["_class_name"] = [stem, cls.__name__]
    index.update({k: v for k, v in pipe.config.items() if not k.startswith("_") and k not in COMPONENTS})
    with open(os.path.join(staging, "model_index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2, sort_keys=True)
    if facts.grid:
        with open(os.path.join(staging, GRID_NAME), "wb") as f:
            f.write(storage.read_bytes(facts.grid))
    license = (export.family.release.license if export.config.get("source") and export.family.release else "other")
    with open(os.path.join(staging, "README.md"), "w", encoding="utf-8") as f:
        f.write(model_card(export, facts, repo_hint, license))


def _publish(staging: str, out: str) -> None:
    """Every staged file under `out` (the marker is written after, by the caller)."""
    for folder, _, files in os.walk(staging):
        for name in sorted(files):
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, staging).replace(os.sep, "/")
            storage.upload_file(path, storage.join(out, rel))


def export_diffusers(export_uri: str, out: str, use_ema: bool = True, vae_spec: str | None = None,
                     text_spec: str | None = None) -> str:
    """Write the diffusers folder of the export at `export_uri` under `out` (module docstring); returns `out`."""
    export = open_export(export_uri, use_ema)
    request = _request(export, use_ema, vae_spec, text_spec)
    if layout.is_complete(out):
        if json.loads(layout.read_marker(out) or b"{}") == request:
            return out
        raise ValueError(f"{out!r} already holds a finished diffusers folder of other weights or settings; "
                         "write into an empty folder")
    pipe = load_pipeline(export, device="cpu", dtype="float32", vae_spec=vae_spec, text_spec=text_spec)
    facts = gather(export)
    repo_hint = out if not storage.is_s3(out) else "<your-user>/<model-name>"
    with tempfile.TemporaryDirectory(prefix="microdit-diffusers-") as staging:
        write_folder(pipe, export, staging, facts, repo_hint)
        _publish(staging, out)
    layout.mark_complete(out, json.dumps(request, sort_keys=True))
    return out
