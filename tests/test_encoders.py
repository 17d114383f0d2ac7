"""model/encoders/: stand-in and tiny diffusers VAEs, tiny open_clip text towers, spec errors."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model.encoders import load_text_encoder, load_vae
from model.encoders.clip_text import CONFIG_NAME, WEIGHTS_NAME, build_text_tower, save_tiny_text_encoder
from model.encoders.sdxl_vae import save_tiny_vae

REPO = Path(__file__).resolve().parents[1]
CAPTIONS = ["a large red circle on a white background, top left", "a small blue square on a black background, center"]


@pytest.fixture(scope="module")
def tiny_text():
    return load_text_encoder("tiny")


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    return save_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny_vae", scaling_factor=0.37, seed=0)


def smooth_image(n=2, size=64):
    """Low-frequency colour pattern in [-1, 1]: (n, 3, size, size)."""
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    chans = [torch.sin(2 * math.pi * (x + 0.3 * k)) * 0.4 + 0.5 * y - 0.25 for k in range(3)]
    img = torch.stack(chans)  # (3, H, W)
    return torch.stack([img * (1 - 0.3 * i) for i in range(n)]).clamp(-1, 1)


# ------------------------------------------------------------------------------------------ standin

def test_standin_interface_and_shapes():
    vae = load_vae("standin")
    assert (vae.downsample, vae.latent_channels) == (4, 4)
    z = vae.encode(smooth_image(2, 64))
    assert z.shape == (2, 4, 16, 16) and z.dtype == torch.float32
    assert vae.decode(z).shape == (2, 3, 64, 64)


def test_standin_channels_are_pooled_rgb_and_luminance():
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    z = load_vae("standin").encode(x) / load_vae("standin").scaling_factor
    assert torch.allclose(z[0, :3, 0, 0], x[0, :, :4, :4].mean(dim=(1, 2)), atol=1e-6)
    luma = 0.299 * z[:, 0] + 0.587 * z[:, 1] + 0.114 * z[:, 2]
    assert torch.allclose(z[:, 3], luma, atol=1e-6)


def test_standin_roundtrip_is_near_identity_on_smooth_images():
    vae = load_vae("standin")
    x = smooth_image(2, 64)
    err = (vae.decode(vae.encode(x)) - x).abs()
    assert err[..., 4:-4, 4:-4].max() < 0.05  # interior; borders lose half a block of context
    assert err.mean() < 0.02
    noise = torch.rand(1, 3, 64, 64) * 2 - 1  # white noise is not preserved: the test above can fail
    assert (vae.decode(vae.encode(noise)) - noise).abs().mean() > 0.2


def test_standin_decode_clamps_and_rejects_bad_shapes():
    vae = load_vae("standin")
    assert vae.decode(torch.full((1, 4, 2, 2), 5.0)).max() == 1.0
    with pytest.raises(ValueError, match="multiples of 4"):
        vae.encode(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"\(N, 4, h, w\)"):
        vae.decode(torch.zeros(1, 3, 8, 8))


# ------------------------------------------------------------------------------------- diffusers VAE

def test_tiny_vae_loads_from_folder_with_config_scaling(tiny_vae_dir):
    cfg = json.loads((Path(tiny_vae_dir) / "config.json").read_text())
    assert cfg["_class_name"] == "AutoencoderKL" and cfg["scaling_factor"] == 0.37
    assert (Path(tiny_vae_dir) / "diffusion_pytorch_model.safetensors").is_file()
    vae = load_vae(tiny_vae_dir)
    assert vae.scaling_factor == pytest.approx(0.37)
    assert (vae.downsample, vae.latent_channels) == (4, 4)
    x = smooth_image(2, 32)
    z = vae.encode(x, generator=torch.Generator().manual_seed(0))
    assert z.shape == (2, 4, 8, 8) and z.dtype == torch.float32
    assert vae.decode(z).shape == (2, 3, 32, 32)
    assert vae.decode(z).abs().max() <= 1.0


def test_tiny_vae_encode_is_a_seeded_posterior_sample_times_scaling(tmp_path, tiny_vae_dir):
    unit = load_vae(save_tiny_vae(tmp_path / "unit", scaling_factor=1.0, seed=0))  # same weights, factor 1
    vae = load_vae(tiny_vae_dir)
    x = smooth_image(1, 32)
    z1 = vae.encode(x, generator=torch.Generator().manual_seed(3))
    z1b = vae.encode(x, generator=torch.Generator().manual_seed(3))
    z2 = vae.encode(x, generator=torch.Generator().manual_seed(4))
    assert torch.equal(z1, z1b)
    assert not torch.allclose(z1, z2)  # a sample, not the posterior mean
    zu = unit.encode(x, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(z1, 0.37 * zu, atol=1e-6)
    assert torch.allclose(vae.decode(z1), unit.decode(zu), atol=1e-5)  # decode divides the factor back out


def test_vae_pipeline_snapshot_folder_uses_vae_subfolder(tmp_path):
    save_tiny_vae(tmp_path / "snapshot" / "vae", scaling_factor=0.2)
    assert load_vae(str(tmp_path / "snapshot")).scaling_factor == pytest.approx(0.2)


def test_vae_fp16_refused_for_vaes_that_overflow(tmp_path):
    with pytest.raises(ValueError, match="float16"):
        load_vae("stabilityai/stable-diffusion-xl-base-1.0", dtype=torch.float16)  # refused before download
    folder = save_tiny_vae(tmp_path / "upcast", force_upcast=True)
    with pytest.raises(ValueError, match="force_upcast"):
        load_vae(folder, dtype=torch.float16)
    assert load_vae(folder, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_vae_spec_errors(tmp_path):
    with pytest.raises(ValueError, match="'nope/vae'.*standin"):
        load_vae("nope/vae")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_vae(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_vae(str(tmp_path / "empty"))


# ------------------------------------------------------------------------------------- text encoder

def test_tiny_text_encoder_returns_all_token_states(tiny_text):
    assert (tiny_text.width, tiny_text.context_length) == (64, 77)
    h = tiny_text.encode(CAPTIONS)
    assert h.shape == (2, 77, 64) and h.dtype == torch.float32
    # ln_final output (unit LayerNorm at init): every token state is normalised over the width
    assert torch.allclose(h.mean(-1), torch.zeros(2, 77), atol=1e-4)
    assert torch.allclose(h.std(-1, unbiased=False), torch.ones(2, 77), atol=1e-3)


def test_text_states_are_causal_per_token(tiny_text):
    a, b = tiny_text.encode(["a red circle", "a red square"])  # (77, 64) each
    n_shared = 3  # <start>, "a", "red"
    assert torch.allclose(a[:n_shared], b[:n_shared], atol=1e-6)
    assert not torch.allclose(a[n_shared], b[n_shared], atol=1e-3)
    assert not torch.allclose(a[-1], b[-1], atol=1e-3)  # padding positions still see the caption


def test_tiny_text_encoder_ignores_global_seed(tiny_text):
    torch.manual_seed(123)
    other = load_text_encoder("tiny")
    assert torch.equal(other.encode(CAPTIONS), tiny_text.encode(CAPTIONS))


def test_tiny_text_encoder_same_in_a_fresh_process(tiny_text, tmp_path):
    out = tmp_path / "states.npy"
    code = ("import sys, numpy as np, torch; torch.manual_seed(7)\n"
            "from model.encoders import load_text_encoder\n"
            f"np.save(sys.argv[1], load_text_encoder('tiny').encode({CAPTIONS!r}).numpy())\n")
    subprocess.run([sys.executable, "-c", code, str(out)], cwd=REPO, check=True, timeout=300)
    assert np.array_equal(np.load(out), tiny_text.encode(CAPTIONS).numpy())


def test_tiny_text_encoder_folder_roundtrip(tiny_text, tmp_path):
    folder = save_tiny_text_encoder(tmp_path / "tiny_text")
    cfg = json.loads((Path(folder) / CONFIG_NAME).read_text())
    assert cfg["model_cfg"]["text_cfg"]["width"] == 64
    assert (Path(folder) / WEIGHTS_NAME).is_file()
    loaded = load_text_encoder(folder)
    assert torch.equal(loaded.encode(CAPTIONS), tiny_text.encode(CAPTIONS))
    other = load_text_encoder(save_tiny_text_encoder(tmp_path / "seed1", seed=1))
    assert not torch.allclose(other.encode(CAPTIONS), tiny_text.encode(CAPTIONS))


def test_full_open_clip_checkpoint_matches_open_clip_encode_text(tmp_path):
    """A whole CLIP checkpoint (vision tower, projection, quick_gelu), as hub repos ship: our token states,
    pooled at the end token and projected, equal open_clip's own encode_text."""
    import open_clip
    from safetensors.torch import save_file

    model_cfg = {"embed_dim": 32, "quick_gelu": True,
                 "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 48, "heads": 4, "layers": 2}}
    torch.manual_seed(0)
    clip = open_clip.model.CLIP(**model_cfg).eval()
    (tmp_path / "clip").mkdir()
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(tmp_path / "clip" / WEIGHTS_NAME))
    (tmp_path / "clip" / CONFIG_NAME).write_text(json.dumps({"model_cfg": model_cfg}))

    enc = load_text_encoder(str(tmp_path / "clip"))
    assert enc.width == 48
    tokens = enc.tokenize(CAPTIONS)
    h = enc.encode(CAPTIONS)  # (2, 77, 48)
    pooled = h[torch.arange(2), tokens.argmax(-1)] @ clip.text_projection.detach()  # end token = max id
    with torch.no_grad():
        ref = clip.encode_text(tokens)
    assert torch.allclose(pooled, ref, atol=1e-5)


def test_custom_text_clip_prefixed_checkpoint_loads(tiny_text, tmp_path):
    """CustomTextCLIP checkpoints keep the tower under "text."; other towers' keys are ignored."""
    from safetensors.torch import save_file

    state = {"text." + k: v.contiguous() for k, v in tiny_text.tower.state_dict().items()}
    state["text.text_projection"] = torch.zeros(64, 64)
    state["visual.proj"] = torch.zeros(2, 2)
    (tmp_path / "custom").mkdir()
    save_file(state, str(tmp_path / "custom" / WEIGHTS_NAME))
    cfg = {"model_cfg": {"embed_dim": 64, "custom_text": True, "text_cfg": {"width": 64, "heads": 4, "layers": 2}}}
    (tmp_path / "custom" / CONFIG_NAME).write_text(json.dumps(cfg))
    assert torch.equal(load_text_encoder(str(tmp_path / "custom")).encode(CAPTIONS), tiny_text.encode(CAPTIONS))


def test_dfn5b_text_tower_architecture():
    """The real tower from open_clip's bundled ViT-H-14-378-quickgelu config (DFN5B's), built on meta: width 1024,
    24 layers, QuickGELU, 352,984,064 parameters (354,032,640 with the projection we leave out)."""
    import open_clip

    cfg = open_clip.get_model_config("ViT-H-14-378-quickgelu")
    with torch.device("meta"):
        tower = build_text_tower(cfg)
    assert (tower.width, tower.context_length, len(tower.transformer.resblocks)) == (1024, 77, 24)
    assert tower.text_projection is None
    assert sum(p.numel() for p in tower.parameters()) == 352_984_064
    assert type(tower.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"


def test_count_tokens_and_truncation(tiny_text):
    long = " ".join(["red"] * 100)
    counts = tiny_text.count_tokens(["a red circle", long, ""])
    assert counts == [5, 102, 2]  # <start> + words + <end>
    tokens = tiny_text.tokenize(["a red circle", long])
    assert tokens.shape == (2, 77)
    assert tokens[1, -1] == tiny_text.tokenizer.eot_token_id  # truncated, end token kept
    assert tiny_text.encode([long]).shape == (1, 77, 64)
    with pytest.raises(ValueError, match="list of captions"):
        tiny_text.encode("a red circle")


def test_text_encoder_bf16_close_to_fp32(tiny_text):
    h16 = load_text_encoder("tiny", dtype=torch.bfloat16).encode(CAPTIONS)
    assert h16.dtype == torch.float32
    assert (h16 - tiny_text.encode(CAPTIONS)).abs().max() < 0.15


def test_text_spec_errors(tmp_path):
    with pytest.raises(ValueError, match="'huge'.*tiny"):
        load_text_encoder("huge")
    with pytest.raises(ValueError, match="unknown text encoder spec"):
        load_text_encoder("hf-hub:")
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        load_text_encoder(str(tmp_path / "missing"))
