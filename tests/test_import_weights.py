"""pipeline/weights: released checkpoints (MicroDiT .pt, E-MMDiT .safetensors) -> our exports, back, sampled,
fine-tuned; the name map's full coverage of the XL release layout; every bad file a named error."""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pipeline.weights import get_format, import_weights, read_tensors, release_state_of_export, to_release_state
from model.family import Variant
from pipeline.weights.release import expected_shapes, prepare_init

MICRODIT = get_format("microdit")
EMMDIT = get_format("emmdit")
EDM = {"kind": "edm", "sigma_data": 0.9, "p_mean": 0.0, "p_std": 0.6}
TINY_ENCODERS = {"vae": "standin", "text": "tiny"}
# Test-sized variants beside the released ones (the debug presets, tiny encoders as tests/test_generate.py).
DEBUG = Variant("debug", "dit_debug.pt", "MicroDiT_Debug", {"input_size": 16, "in_channels": 4}, TINY_ENCODERS,
                EDM, {"kind": "heun", "steps": 2, "guidance": 5.0}, {})
DEBUG16 = Variant("debug16", "dit_debug_16.pt", "MicroDiT_Debug", {"input_size": 16, "in_channels": 16},
                  TINY_ENCODERS, EDM, {"kind": "heun", "steps": 2, "guidance": 5.0}, {})
# 77 caption tokens (the tiny text tower's), full attention (77 does not split into subregions).
EDEBUG = Variant("debug", "emmdit_debug.safetensors", "EMMDiT_Debug", {"caption_len": 77, "sub_attention": False},
                 TINY_ENCODERS,
                 {"kind": "rectified_flow"}, {"kind": "euler", "steps": 2, "guidance": 1.0}, {})


@pytest.fixture(autouse=True)
def debug_variants(monkeypatch):
    monkeypatch.setitem(MICRODIT.variants, "debug", DEBUG)
    monkeypatch.setitem(MICRODIT.variants, "debug16", DEBUG16)
    monkeypatch.setitem(EMMDIT.variants, "debug", EDEBUG)


def _random(fmt, variant: Variant, seed: int = 0) -> dict[str, torch.Tensor]:
    """Our state dict of a debug network with every tensor perturbed (zero-initialised layers would hide bugs)."""
    torch.manual_seed(seed)
    model = fmt.build(fmt.config(variant.preset, variant.overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def release_file(folder, fmt=MICRODIT, variant: Variant = DEBUG, seed: int = 0, name: str | None = None,
                 edit=None) -> tuple[str, dict[str, torch.Tensor]]:
    """A file in the release's layout (our tensors renamed by the inverse map, release buffers added), saved as
    the release saves it: torch.save for MicroDiT, safetensors for E-MMDiT."""
    cfg = fmt.config(variant.preset, variant.overrides)
    state = to_release_state(fmt, _random(fmt, variant, seed), cfg)
    if edit:
        edit(state)
    path = os.path.join(str(folder), name or variant.file)
    if path.endswith(".safetensors"):
        save_file(state, path)
    else:
        torch.save(state, path)
    return path, state


# ------------------------------------------------------------------------------------------- name map

def release_xl_layout(in_channels: int = 4, latent: int = 64) -> dict[str, tuple[int, ...]]:
    """Names and shapes of MicroDiT_XL_2's state dict as the release code builds it (micro_diffusion/models/dit.py:
    DiT(..., use_bias=False) with MicroDiT_XL_2's arguments), written out from that code, not from our network."""
    D, depth, hd, mix, mixdepth, capt, E, C, p = 1024, 28, 64, 768, 6, 1024, 8, in_channels, 2
    up = lambda x, m: m * ((x + m - 1) // m)
    out = {"x_embedder.proj.weight": (D, C, p, p), "x_embedder.proj.bias": (D,),
           "t_embedder.mlp.0.weight": (D, 512), "t_embedder.mlp.0.bias": (D,),
           "t_embedder.mlp.2.weight": (D, D), "t_embedder.mlp.2.bias": (D,),
           "pos_embed": (1, (latent // p) ** 2, D), "mask_token": (1, 1, p * p * C),
           "final_layer.norm_final.weight": (D,), "final_layer.linear.weight": (p * p * C, D),
           "final_layer.linear.bias": (p * p * C,), "final_layer.adaLN_modulation.1.weight": (2 * D, D),
           "final_layer.adaLN_modulation.1.bias": (2 * D,)}
    for name, fin in (("y_embedder.y_proj", capt), ("pooled_y_emb_process", D)):  # timm Mlp with a LayerNorm
        out.update({f"{name}.fc1.weight": (D, fin), f"{name}.fc1.bias": (D,), f"{name}.norm.weight": (D,),
                    f"{name}.fc2.weight": (D, D), f"{name}.fc2.bias": (D,)})
    h = up(int(2 * int(D * 4.0) / 3), 256)  # AttentionBlockPromptEmbedding's FeedForward
    out.update({"y_emb_preprocess.norm1.weight": (D,), "y_emb_preprocess.attn.qkv.weight": (3 * D, D),
                "y_emb_preprocess.attn.proj.weight": (D, D), "y_emb_preprocess.norm2.weight": (D,),
                "y_emb_preprocess.mlp.w1.weight": (h, D), "y_emb_preprocess.mlp.w2.weight": (h, D),
                "y_emb_preprocess.mlp.w3.weight": (D, h)})
    for name, a, b in (("xin", D, mix), ("y", D, mix), ("xout", mix, D)):
        out.update({f"patch_mixer_map_{name}.0.weight": (a,), f"patch_mixer_map_{name}.1.weight": (b, a)})

    def block(prefix, d, qkv_ratio, mlp_ratio, moe):
        a = d if qkv_ratio == 1 else (hd * 2) * ((int(d * qkv_ratio) + hd * 2 - 1) // (hd * 2))
        m = int(d * mlp_ratio)
        out.update({f"{prefix}.norm1.weight": (d,), f"{prefix}.attn.qkv.weight": (3 * a, d),
                    f"{prefix}.attn.proj.weight": (d, a), f"{prefix}.cross_attn.q_linear.weight": (d, d),
                    f"{prefix}.cross_attn.kv_linear.weight": (2 * d, d), f"{prefix}.cross_attn.proj.weight": (d, d),
                    f"{prefix}.norm2.weight": (d,), f"{prefix}.norm3.weight": (d,),
                    f"{prefix}.adaLN_modulation.1.weight": (6 * d, D), f"{prefix}.adaLN_modulation.1.bias": (6 * d,)})
        if moe:
            hm = up(m, 256)
            out.update({f"{prefix}.mlp.w1": (E, d, hm), f"{prefix}.mlp.w2": (E, hm, d),
                        f"{prefix}.mlp.gate.weight": (E, d)})
        else:
            hdn = up(int(2 * m / 3), 256)
            out.update({f"{prefix}.mlp.w1.weight": (hdn, d), f"{prefix}.mlp.w2.weight": (hdn, d),
                        f"{prefix}.mlp.w3.weight": (d, hdn)})

    for i in range(mixdepth):
        block(f"patch_mixer.{i}", mix, 1.0, 4.0, i in [j for j in range(1, mixdepth) if (j + 1) % 2 == 0])
    qkv, mlp = np.linspace(0.5, 1.0, num=depth, dtype=float), np.linspace(0.5, 4.0, num=depth, dtype=float)
    for i in range(depth):
        block(f"blocks.{i}", D, qkv[i], mlp[i], i in [j for j in range(depth - 1) if (j + 1) % 2 == 0])
    return out


@pytest.mark.parametrize("variant", ["37M", "16ch"])
def test_name_map_covers_the_xl_release_layout(variant):
    """Every tensor of the release's XL state dict maps to one of ours with its shape, and every one of ours is
    matched: 476 parameters plus the release's 2 buffers, 478 tensors in all."""
    v = MICRODIT.variants[variant]
    cfg = MICRODIT.config(v.preset, v.overrides)
    ours = expected_shapes(MICRODIT, cfg)  # meta device
    release = release_xl_layout(v.overrides["in_channels"])
    mapped = {MICRODIT.to_ours(k): k for k in release if k not in MICRODIT.buffers}
    assert None not in mapped
    assert set(mapped) == set(ours)  # every release tensor mapped, every parameter of ours matched
    assert all(tuple(release[r]) == ours[o] for o, r in mapped.items())
    assert {MICRODIT.to_release(k) for k in ours} | set(MICRODIT.buffers) == set(release)
    assert (len(release), len(ours), len(MICRODIT.buffers)) == (478, 476, 2)
    # 4 channels: the paper's 1,165,442,320; 16 channels: + 12 x 4 x 1024 in and 48 x 1025 out.
    assert sum(int(np.prod(s)) for s in ours.values()) == {"37M": 1_165_442_320, "16ch": 1_165_540_672}[variant]


def test_emmdit_map_is_the_identity_on_the_release_names():
    cfg = EMMDIT.config("EMMDiT_512", {})
    ours = expected_shapes(EMMDIT, cfg)
    assert all(EMMDIT.to_ours(k) == k == EMMDIT.to_release(k) for k in ours)
    assert len(ours) == 889 and sum(int(np.prod(s)) for s in ours.values()) == 302_449_952 + 96 * 96 * 768
    for key in ("pos_embed.pos_embed", "block_groups.2.3.attn.to_out.0.weight", "tokencompressor.0.0.body2x.1.weight",
                "tokenreconstructor.0.0.mergers.0.weight", "adaln_single.emb.timestep_embedder.linear_1.weight",
                "block_groups.0.0.scale_shift_bias_c", "block_groups.0.0.attn.norm_added_q.weight"):
        assert key in ours
    assert "block_groups.2.3.attn.to_add_out.weight" not in ours  # the last block has no text output path


# ------------------------------------------------------------------------------------------- import + round trip

def test_microdit_release_imports_round_trips_and_samples(tmp_path):
    from pipeline.generate import GenerateConfig, Generator

    path, release = release_file(tmp_path)
    out = import_weights(path, str(tmp_path / "export"), "microdit", "debug")
    assert os.path.isfile(os.path.join(out, "_SUCCESS"))
    config = json.load(open(os.path.join(out, "config.json")))
    # The variant's objective with every constant written out (the ones it does not state: EDM's defaults).
    from model.objectives.configs import EDMConfig, config_from_dict

    assert config["family"] == "microdit" and config["objective"] == dataclasses.asdict(config_from_dict(EDM))
    assert set(config["objective"]) == {f.name for f in dataclasses.fields(EDMConfig)}
    assert config["encoders"] == TINY_ENCODERS and config["model"]["in_channels"] == 4
    assert config["source"]["file"] == "dit_debug.pt" and config["source"]["variant"] == "debug"
    assert config["source"]["release_buffers"] == ["mask_token", "pos_embed"]
    assert read_tensors(os.path.join(out, "model.safetensors")).keys() == \
        read_tensors(os.path.join(out, "ema.safetensors")).keys()
    back = release_state_of_export(out)
    assert back.keys() == release.keys()
    for k in release:
        assert torch.equal(back[k], release[k]), k
    assert import_weights(path, out, "microdit", "debug") == out  # idempotent

    gen = Generator(out, GenerateConfig(steps=2, seed=3, batch_size=2))
    images = gen.sample(["a red circle", "a blue square"])
    assert images.shape == (2, 64, 64, 3) and images.std() > 1
    assert np.array_equal(images, gen.sample(["a red circle", "a blue square"]))


def test_emmdit_release_imports_round_trips_and_samples(tmp_path):
    from safetensors.torch import load_file

    from model import family as families
    from model.objectives.configs import config_from_dict

    path, release = release_file(tmp_path, EMMDIT, EDEBUG)
    release["projectors.0.0.weight"] = torch.ones(2, 2)  # a training-only REPA head, dropped on import
    save_file(release, path)
    out = import_weights(path, str(tmp_path / "export"), "emmdit")  # variant from the file name
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["family"] == "emmdit" and config["source"]["dropped"] == ["projectors.0.0.weight"]
    back = release_state_of_export(out)
    del release["projectors.0.0.weight"]
    assert back.keys() == release.keys() and all(torch.equal(back[k], release[k]) for k in release)

    cfg = EMMDIT.config_from_dict(config["model"])
    net = EMMDIT.build(cfg)
    net.load_state_dict(load_file(os.path.join(out, "model.safetensors")), strict=True)
    noise = torch.randn(2, cfg.in_channels, cfg.input_size, cfg.input_size, generator=torch.Generator().manual_seed(0))
    caption = torch.randn(2, cfg.caption_len, cfg.caption_dim, generator=torch.Generator().manual_seed(1))
    drawing = families.get("emmdit").drawing  # the family's pipeline without encoders: caption states in
    pipe = drawing.pipeline_class()(transformer=net.eval(), scheduler=drawing.scheduler(config_from_dict(config["objective"])))
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(prompt_embeds=caption, latents=noise, num_inference_steps=2, guidance_scale=1.0,
                   output_type="latent").images
    assert latents.shape == noise.shape and torch.isfinite(latents).all() and not torch.equal(latents, noise)


def test_emmdit_export_samples_through_generate(tmp_path):
    from pipeline.generate import GenerateConfig, Generator

    path, _ = release_file(tmp_path, EMMDIT, EDEBUG)
    out = import_weights(path, str(tmp_path / "export"), "emmdit")
    gen = Generator(out, GenerateConfig(steps=2, seed=0))  # the export's sampler: guidance 1, as the distilled file
    images = gen.sample(["a red circle", "a blue square"])
    assert images.shape == (2, 64, 64, 3) and images.std() > 1
    assert np.array_equal(images, gen.sample(["a red circle", "a blue square"]))


def test_released_variants_table():
    assert {v: MICRODIT.variants[v].scores for v in ("22M", "37M", "16ch", "0.5B")} == {
        "22M": {"fid_coco": 12.72, "geneval": 0.46}, "37M": {"fid_coco": 12.66, "geneval": 0.46},
        "16ch": {"fid_coco": 13.04, "geneval": 0.40}, "0.5B": {"fid_coco": 13.26, "geneval": 0.52}}
    v16 = MICRODIT.variants["16ch"]
    assert v16.encoders["vae"] == "ostris/vae-kl-f8-d16" and v16.overrides["in_channels"] == 16
    assert all(v.overrides["input_size"] == 64 and v.overrides["pos_interp_scale"] == 2.0
               and v.sampler == {"kind": "heun", "steps": 30, "guidance": 5.0}
               for v in MICRODIT.variants.values() if v.preset == "MicroDiT_XL_2")
    assert EMMDIT.variants["512px-dist"].sampler == {"kind": "euler", "steps": 4, "guidance": 1.0}


def test_sixteen_channel_vae_spec_loads_from_the_hub_root(monkeypatch):
    from model.encoders import load_vae, sdxl_vae

    seen = {}
    monkeypatch.setattr(sdxl_vae, "_load",
                        lambda path, subfolder, device, dtype: seen.update(path=path, subfolder=subfolder))
    load_vae("ostris/vae-kl-f8-d16")
    assert seen == {"path": "ostris/vae-kl-f8-d16", "subfolder": None}


def test_cli_imports(tmp_path, capsys):
    from cli.main import main

    path, _ = release_file(tmp_path)
    assert main(["import-weights", path, str(tmp_path / "e"), "--family", "microdit", "--variant", "debug"]) == 0
    assert "variant debug" in capsys.readouterr().out
    assert main(["import-weights", path, str(tmp_path / "f"), "--family", "microdit"]) == 0  # name -> variant
    assert main(["import-weights", str(tmp_path / "nope.pt"), str(tmp_path / "g"), "--family", "microdit",
                 "--variant", "debug"]) == 2
    assert "does not exist" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- bad files

class Payload:  # not a tensor: torch.load(weights_only=True) must refuse to build it
    pass


def _import(path, tmp_path, family="microdit", variant="debug"):
    return import_weights(path, str(tmp_path / "out"), family, variant)


def test_pickle_of_objects_is_refused(tmp_path):
    path = str(tmp_path / "evil.pt")
    torch.save({"x_embedder.proj.weight": Payload()}, path)
    with pytest.raises(ValueError, match=r"not a plain state dict of tensors: it pickles the global "
                                         r"'test_import_weights\.Payload'") as refused:
        _import(path, tmp_path)
    message = str(refused.value)  # the global named; torch's terminal escapes and its advice left out
    assert "\x1b[" not in message and "weights_only" not in message and "add_safe_globals" not in message
    torch.save({"x_embedder.proj.weight": "text"}, path)
    with pytest.raises(ValueError, match="entry 'x_embedder.proj.weight' is a str"):
        _import(path, tmp_path)
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError, match="holds a list"):
        _import(path, tmp_path)


@pytest.mark.parametrize("fmt,variant", [(MICRODIT, DEBUG), (EMMDIT, EDEBUG)])
def test_truncated_file(tmp_path, fmt, variant):
    path, _ = release_file(tmp_path, fmt, variant)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or damaged"):
        _import(path, tmp_path, fmt.family, "debug")
    assert not os.path.exists(tmp_path / "out" / "_SUCCESS")


def test_missing_extra_and_misshapen_tensors_are_named(tmp_path):
    path, _ = release_file(tmp_path, edit=lambda s: s.pop("blocks.1.mlp.gate.weight"))
    with pytest.raises(ValueError, match=r"missing tensors \['blocks.1.mlp.gate.weight'\]"):
        _import(path, tmp_path)
    path, _ = release_file(tmp_path, edit=lambda s: s.update({"blocks.0.attn.bias": torch.zeros(3)}))
    with pytest.raises(ValueError, match=r"extra tensors \['blocks.0.attn.bias'\]"):
        _import(path, tmp_path)
    path, _ = release_file(tmp_path, edit=lambda s: s.update({"blocks.2.cross_attn.kv_linear.weight": torch.zeros(3, 4)}))
    with pytest.raises(ValueError, match=r"blocks.2.cross_attn.kv_linear.weight \(ours blocks.2.cross_attn.kv"
                                         r"[a-z_.]*\): file \(3, 4\) vs model"):
        _import(path, tmp_path)
    path, _ = release_file(tmp_path, edit=lambda s: s.update({"mask_token": torch.zeros(1, 1, 5)}))
    with pytest.raises(ValueError, match=r"mask_token: file \(1, 1, 5\) vs model \(1, 1, 16\)"):
        _import(path, tmp_path)


def test_file_of_another_family(tmp_path):
    path, _ = release_file(tmp_path, EMMDIT, EDEBUG)
    with pytest.raises(ValueError, match="looks like a emmdit release: use --family emmdit"):
        _import(path, tmp_path, "microdit", "debug")
    path, _ = release_file(tmp_path, MICRODIT, DEBUG)
    with pytest.raises(ValueError, match="looks like a microdit release: use --family microdit"):
        _import(path, tmp_path, "emmdit", "debug")


def test_file_of_another_variant(tmp_path, monkeypatch):
    path, _ = release_file(tmp_path, variant=DEBUG16, name="renamed.pt")
    with pytest.raises(ValueError, match=r"x_embedder.proj.weight .*file \(128, 16, 2, 2\) vs model \(128, 4, 2, 2\)"
                                         r".*it fits variant 'debug16'"):
        _import(path, tmp_path, variant="debug")
    # Positions at another scale (a file made for another resolution): same shapes, other values.
    scale2 = dataclasses.replace(DEBUG, name="scale2", file="scale2.pt",
                                 overrides={**DEBUG.overrides, "pos_interp_scale": 2.0})
    monkeypatch.setitem(MICRODIT.variants, "scale2", scale2)
    path, _ = release_file(tmp_path, variant=DEBUG, name="scale1.pt")
    with pytest.raises(ValueError, match="pos_embed: values differ.*it fits variant 'debug'"):
        _import(path, tmp_path, variant="scale2")


def test_variant_names(tmp_path):
    path, _ = release_file(tmp_path, name="mystery.pt")
    with pytest.raises(ValueError, match="cannot tell the microdit variant of 'mystery.pt'.*--variant"):
        _import(path, tmp_path, variant=None)
    with pytest.raises(ValueError, match="unknown microdit variant 'XXL'"):
        _import(path, tmp_path, variant="XXL")
    path, _ = release_file(tmp_path)  # dit_debug.pt
    with pytest.raises(ValueError, match="release file of variant 'debug', not '16ch'"):
        _import(path, tmp_path, variant="16ch")
    with pytest.raises(ValueError, match="no released weights known for family 'sd3'"):
        _import(path, tmp_path, family="sd3")
    with pytest.raises(FileNotFoundError):
        _import(str(tmp_path / "absent.pt"), tmp_path)


def test_finished_export_of_another_file_is_kept(tmp_path):
    a, _ = release_file(tmp_path, seed=0)
    import_weights(a, str(tmp_path / "out"), "microdit", "debug")
    b, _ = release_file(tmp_path, seed=1, name="other.pt")
    with pytest.raises(ValueError, match="already holds a finished export"):
        import_weights(b, str(tmp_path / "out"), "microdit", "debug")


# ------------------------------------------------------------------------------------------- training init

def test_init_path_validation():
    from pipeline.core.plan import stage_config

    s = stage_config({"name": "ft", "init": {"from": "weights", "path": "/w/dit.pt"}})
    assert (s.init.kind, s.init.path, s.init.stage) == ("weights", "/w/dit.pt", None)
    with pytest.raises(ValueError, match="exactly one of them"):
        stage_config({"name": "ft", "init": {"from": "weights", "path": "/w/dit.pt", "stage": "a"}})
    with pytest.raises(ValueError, match="init.path is for init.kind='weights'"):
        stage_config({"name": "ft", "init": {"from": "full_state", "path": "/w/dit.pt"}})


def test_init_weights_are_checked_on_the_driver(tmp_path):
    """A released file or an export that does not fit the stage's network is refused before workers start."""
    from pipeline.core.plan import stage_config
    from pipeline.train.stage import resolve_init
    from test_train_helpers import tiny_stage

    path, _ = release_file(tmp_path)
    good = MICRODIT.config_to_dict(MICRODIT.config(DEBUG.preset, DEBUG.overrides))
    stage = stage_config(tiny_stage(name="ft", init={"from": "weights", "path": path}))
    root = str(tmp_path / "run")
    init = resolve_init(root, stage, good, "microdit")
    assert (init.kind, init.uri) == ("weights", f"{root}/train/ft/init/model.safetensors")
    assert resolve_init(root, stage, good, "microdit") == init  # converted once
    wrong = {**good, "depth": 3}
    with pytest.raises(ValueError, match=r"does not fit microdit .*extra tensors \['blocks.3"):
        resolve_init(str(tmp_path / "run2"), stage, wrong, "microdit")
    export = import_weights(path, str(tmp_path / "export"), "microdit", "debug")
    stage = stage_config(tiny_stage(name="ft", init={"from": "weights", "path": export}))
    assert resolve_init(str(tmp_path / "run3"), stage, good, "microdit").uri == f"{export}/model.safetensors"
    with pytest.raises(ValueError, match=r"do not fit this stage's microdit model .*missing \['blocks.3"):
        resolve_init(str(tmp_path / "run4"), stage, {**good, "depth": 5}, "microdit")
    with pytest.raises(ValueError, match="is a microdit export; this stage trains emmdit"):
        prepare_init(export, "emmdit", {}, str(tmp_path / "w"))
    with pytest.raises(FileNotFoundError, match="neither an export folder"):
        prepare_init(str(tmp_path / "nothing"), "microdit", good, str(tmp_path / "w"))
    # An earlier stage's export (`init: {from: weights, stage: prev}`) is checked the same way.
    root = tmp_path / "run5"
    import_weights(path, str(root / "train" / "prev" / "export"), "microdit", "debug")
    after = stage_config(tiny_stage(name="next", init={"from": "weights", "stage": "prev"}))
    assert resolve_init(str(root), after, good, "microdit").uri == f"{root}/train/prev/export/model.safetensors"
    with pytest.raises(ValueError, match=r"prev/export/model.safetensors.* do not fit .*missing \['blocks.3"):
        resolve_init(str(root), after, {**good, "depth": 5}, "microdit")


@pytest.mark.parametrize("start", ["released file", "export", "earlier stage"])
def test_training_task_refuses_weights_of_another_shape_before_ray(tmp_path, start):
    """Through train_stage, as the training task calls it: weights that do not fit the stage's network end the
    stage on the driver, before Ray or any worker starts."""
    import ray

    from pipeline.train.stage import train_stage
    from test_train_helpers import tiny_stage, write_latents

    path, _ = release_file(tmp_path)
    root = tmp_path / "run"
    init = {"from": "weights", "path": path}
    if start != "released file":
        export = import_weights(path, str(root / "train" / "prev" / "export"), "microdit", "debug")
        init = {"from": "weights", "stage": "prev"} if start == "earlier stage" else {"from": "weights", "path": export}
    data = {"synth": write_latents(str(tmp_path / "latents"), rows=8)}
    with pytest.raises(ValueError, match="does not fit|do not fit"):
        train_stage(tiny_stage(name="next", init=init), {"preset": "MicroDiT_Debug", "depth": 5}, str(root), data)
    assert not ray.is_initialized()


@pytest.mark.slow
def test_fine_tune_from_the_released_file(ray_address, tmp_path):
    """Two steps of a real Ray Train stage (one worker: distribution is test_train_stage's business) started from
    a released .pt: the export is the release's weights moved a little (lr 1e-6), not a fresh init."""
    import ray
    from safetensors.torch import load_file

    from pipeline.train.stage import train_stage
    from test_train_helpers import tiny_stage, write_latents

    path, release = release_file(tmp_path)
    data = {"synth": write_latents(str(tmp_path / "latents" / "synth"), rows=16)}
    stage = tiny_stage(name="ft", steps=2, lr=1e-6, schedule={"kind": "constant"}, checkpoint_every=2,
                       init={"from": "weights", "path": path}, sample_prompts=0, num_workers=1, micro_batch=4)
    try:
        out = train_stage(stage, "MicroDiT_Debug", str(tmp_path / "run"), data, encoders=TINY_ENCODERS)
    finally:
        ray.shutdown()
    tuned = load_file(os.path.join(out, "model.safetensors"))
    start = {MICRODIT.to_ours(k): v for k, v in release.items() if k not in MICRODIT.buffers}
    fresh = _random(MICRODIT, DEBUG, seed=99)
    assert tuned.keys() == start.keys()
    moved = max(float((tuned[k] - start[k]).abs().max()) for k in start)
    assert 0 < moved < 1e-3
    assert max(float((fresh[k] - start[k]).abs().max()) for k in start) > 0.05
