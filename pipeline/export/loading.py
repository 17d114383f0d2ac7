"""An export -> its family's diffusers pipeline (model/pipelines/), ready to draw.

The network is built on the meta device (accelerate's `init_empty_weights`: parameters take no memory, buffers are
computed) and takes the export's tensors as they are read: a local safetensors file is memory-mapped, so the weights
are read once and held once. The scheduler comes from the export's objective config, the VAE and text encoder from
its encoder specs (or the ones given), the sampler defaults and text mode from config.json.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import os

import torch
from accelerate import init_empty_weights

from model.encoders import load_text_components, load_vae
from pipeline.core import storage
from pipeline.export.export_folder import Export

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; any other name as given."""
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """"auto" -> bf16 on GPU, fp32 on CPU; else one of DTYPES."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected 'auto' or one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def read_weights(uri: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (a local one memory-mapped); ValueError naming a damaged file."""
    from safetensors.torch import load, load_file

    try:
        return load_file(uri) if not storage.is_s3(uri) else load(storage.read_bytes(uri))
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors raises its own error type for a damaged or foreign file
        raise ValueError(f"weights {uri!r} are not a readable safetensors file (truncated or damaged?): {e}") from None


def check_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """ValueError naming missing, unexpected or misshapen tensors of `state` for `model`. Persistent buffers may be
    missing: they are deterministic tables the network computes (E-MMDiT's sin-cos positions)."""
    expected = model.state_dict()
    params = {n for n, _ in model.named_parameters()}
    missing = sorted(k for k in expected.keys() - state.keys() if k in params)
    unexpected = sorted(state.keys() - expected.keys())
    shapes = sorted(f"{k}: weights {tuple(state[k].shape)} vs config {tuple(expected[k].shape)}"
                    for k in expected.keys() & state.keys() if state[k].shape != expected[k].shape)
    if missing or unexpected or shapes:
        def few(items):
            return f"{items[:8]}{' ...' if len(items) > 8 else ''} ({len(items)})"
        raise ValueError(f"weights {source!r} do not match the model config beside them: missing tensors "
                         f"{few(missing)}, unexpected tensors {few(unexpected)}, shape mismatches {few(shapes)}")


def at_resolution(export: Export, latent_side: int | None):
    """The export's network config, re-sized for `latent_side` latents a side (positions are rebuilt buffers, so
    the weights load strictly at any size; the interpolation scale follows the grid)."""
    cfg = export.model
    if latent_side is None or latent_side == cfg.input_size:
        return cfg
    scale = {f.name for f in dataclasses.fields(cfg)} & {"pos_interp_scale"}
    return dataclasses.replace(cfg, input_size=latent_side,
                               **{k: cfg.pos_interp_scale * latent_side / cfg.input_size for k in scale})


def load_transformer(export: Export, device: torch.device, dtype: torch.dtype, latent_side: int | None = None):
    """The family's diffusers model holding the export's weights (see the module docstring)."""
    cls = export.family.drawing.transformer_class()
    cfg = at_resolution(export, latent_side)
    with init_empty_weights(include_buffers=False):
        model = cls(**export.family.config_to_dict(cfg))
    state = read_weights(export.weights)
    check_state(model, state, export.weights)
    model.load_state_dict(state, strict=False, assign=True)  # missing: only computed buffers (check_state)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_pipeline(export: Export, device: str = "auto", dtype: str = "auto", resolution: int | None = None,
                  vae_spec: str | None = None, text_spec: str | None = None):
    """The family's DiffusionPipeline for `export` on `device` (the network in `dtype`; the encoders in bf16 on GPU,
    fp32 on CPU: the SDXL VAE overflows in fp16). `resolution` in pixels (default: the network's own)."""
    dev = resolve_device(device)
    net_dtype = resolve_dtype(dtype, dev)
    enc_dtype = torch.float32 if net_dtype == torch.float32 else torch.bfloat16
    specs = {"vae": vae_spec or export.encoders.get("vae"), "text": text_spec or export.encoders.get("text")}
    for name, spec in specs.items():
        if not spec:
            raise ValueError(f"{export.folder!r} records no {name} encoder; pass one ({name}_spec)")
    vae = load_vae(specs["vae"], dev, enc_dtype)
    if vae.latent_channels != export.model.in_channels:
        raise ValueError(f"VAE {specs['vae']!r} has {vae.latent_channels} latent channels but the model expects "
                         f"in_channels={export.model.in_channels}")
    side = None
    if resolution is not None:
        if resolution % (vae.downsample * export.model.patch_size):
            raise ValueError(f"resolution={resolution} is not a multiple of VAE downsample {vae.downsample} x patch "
                             f"{export.model.patch_size}")
        side = resolution // vae.downsample
    text_encoder, tokenizer = load_text_components(specs["text"], dev, enc_dtype, export.model.caption_len)
    if text_encoder.config.hidden_size != export.model.caption_dim:
        raise ValueError(f"text encoder {specs['text']!r} has width {text_encoder.config.hidden_size} but the model "
                         f"expects caption_dim={export.model.caption_dim}")
    transformer = load_transformer(export, dev, net_dtype, side)
    scheduler = export.family.drawing.scheduler(export.objective)
    pipeline_class = export.family.drawing.pipeline_class()
    options = {"num_inference_steps": export.sampler["steps"], "guidance_scale": export.sampler["guidance"]}
    if "text_mode" in inspect.signature(pipeline_class.__init__).parameters:  # Llama states: the export's mode
        options["text_mode"] = export.text_mode
    return pipeline_class(transformer=transformer, scheduler=scheduler, vae=vae.vae, text_encoder=text_encoder,
                          tokenizer=tokenizer, **options)


INDEX = "model_index.json"
LIBRARIES = ("diffusers", "transformers")


def is_diffusers_folder(uri: str) -> bool:
    return storage.exists(storage.join(str(uri).rstrip("/"), INDEX))


def check_diffusers_folder(folder: str) -> dict:
    """A diffusers folder's model_index.json, every component's class checked: known to diffusers or transformers,
    or shipped as code in the component's folder. FileNotFoundError / ValueError naming what is missing."""
    import diffusers
    import transformers

    index_path = os.path.join(folder, INDEX)
    if not os.path.isfile(index_path):
        raise FileNotFoundError(f"{folder!r} has no {INDEX}: not a diffusers folder (write one with "
                                "`microdit export-diffusers`)")
    with open(index_path, encoding="utf-8") as f:
        index = json.load(f)
    libraries = {"diffusers": diffusers, "transformers": transformers}
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or entry[0] is None:
            continue
        library, cls = entry
        if library in LIBRARIES:
            if getattr(libraries[library], cls, None) is None:
                version = libraries[library].__version__
                raise ValueError(f"{index_path}: unknown {name} class {cls!r}: {library} {version} has none, and the "
                                 "folder ships no code for it")
        elif not os.path.isfile(os.path.join(folder, name, f"{library}.py")):
            raise ValueError(f"{index_path}: unknown {name} class {cls!r}: neither diffusers nor transformers has it, "
                             f"and {os.path.join(name, library + '.py')!r} is not in the folder")
    return index


def load_diffusers_folder(folder: str, device: str = "auto", dtype: str = "auto"):
    """A local diffusers folder's pipeline (the code it ships runs: trust_remote_code), checked first."""
    from diffusers import DiffusionPipeline

    if storage.is_s3(folder):
        raise ValueError(f"{folder!r}: draw from a local copy of a diffusers folder (download it first)")
    check_diffusers_folder(folder)
    dev = resolve_device(device)
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True, torch_dtype=resolve_dtype(dtype, dev))
    return pipe.to(dev)
