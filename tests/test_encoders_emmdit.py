"""E-MMDiT's encoders: tiny DC-AE and tiny Llama saved to folders and loaded through the real loading paths."""
from __future__ import annotations

import pytest
import torch

from model.encoders import dcae as encoders_dcae, llama as encoders_llama
from model.encoders import load_text_encoder, load_vae, unconditional_caption


@pytest.fixture(scope="module")
def dcae_folder(tmp_path_factory):
    return encoders_dcae.save_tiny_dcae(tmp_path_factory.mktemp("dcae"))


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    return encoders_llama.save_tiny_llama(tmp_path_factory.mktemp("llama"))


def test_tiny_dcae_loads_from_a_folder_and_encodes_deterministically(dcae_folder):
    vae = load_vae(dcae_folder)
    assert isinstance(vae, encoders_dcae.DCAE)
    assert (vae.latent_channels, vae.downsample, vae.scaling_factor) == (4, 4, 0.41407)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    a = vae.encode(x, generator=[torch.Generator().manual_seed(1)] * 2)
    b = vae.encode(x)
    assert a.shape == (2, 4, 8, 8) and torch.equal(a, b)  # no posterior: the generator changes nothing
    ref = load_vae("tiny-dcae")
    assert torch.equal(ref.encode(x), a)  # the folder holds the same weights as the in-memory spec
    assert vae.decode(a).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="multiples of 4"):
        vae.encode(torch.zeros(1, 3, 30, 30))


def test_tiny_llama_in_compact_mode_pads_with_one_row(llama_folder):
    from model.pipelines.emmdit import compact_ids

    enc = load_text_encoder(llama_folder, mode="compact")
    assert isinstance(enc, encoders_llama.LlamaTextEncoder)
    assert (enc.context_length, enc.width) == (16, 64)
    caps = ["a large red circle on a white background, center", "", "blue " * 30]
    ids, lengths = compact_ids(enc.tokenizer, caps, 16)
    bos, eos = enc.tokenizer.bos_token_id, enc.tokenizer.eos_token_id
    assert ids.shape == (3, 16) and lengths.tolist() == [11, 1, 16]
    assert ids[0, 0] == bos and (ids[0, 11:] == eos).all() and (ids[1, 1:] == eos).all()
    assert enc.count_tokens(caps) == [11, 1, 31]
    states, n = enc.encode_with_lengths(caps)
    assert states.shape == (3, 16, 64) and states.dtype == torch.float32 and n.tolist() == [11, 1, 16]
    # pad rows are one vector; real rows do not depend on the pads (causal), nor on the batch
    assert torch.equal(states[0, 11:], enc.pad_state.expand(5, 64))
    alone = enc.encode(caps[:1])
    assert torch.allclose(alone, states[:1], atol=1e-6)
    # the unconditional input is the empty prompt's embedding: BOS row then pads
    uncond = unconditional_caption(enc)
    assert torch.equal(uncond, states[1]) and not torch.equal(uncond[0], uncond[1])
    # configurable length; the in-memory spec holds the same weights and vocabulary as the saved folder
    long = load_text_encoder("tiny-llama", tokens=32, mode="compact")
    assert long.context_length == 32
    assert torch.allclose(long.encode(caps[:1])[:, :16], alone, atol=1e-6)


def test_tiny_llama_in_release_mode_masks_and_keeps_every_row(llama_folder):
    enc = load_text_encoder(llama_folder)  # the release's mode is the default
    assert enc.mode == "release"
    caps = ["A Large RED circle", "a large red circle", "a dog"]
    states, n = enc.encode_with_lengths(caps)
    assert n.tolist() == [5, 5, 3]  # BOS + words; the release lower-cases (and cleans) first
    assert torch.equal(states[0], states[1])
    assert not torch.allclose(states[1, -1], states[2, -1])  # pad rows see their caption through the mask
    assert torch.equal(unconditional_caption(enc), enc.encode([""])[0])
    with pytest.raises(ValueError, match="compact mode only"):
        enc.pad_state
    with pytest.raises(ValueError, match="text mode 'compact' is for Llama"):
        load_text_encoder("tiny", mode="compact")


def test_open_clip_keeps_its_fixed_length_and_zero_uncond():
    enc = load_text_encoder("tiny")
    assert torch.equal(unconditional_caption(enc), torch.zeros(77, 64))
    with pytest.raises(ValueError, match="fixed context length 77"):
        load_text_encoder("tiny", tokens=128)


def test_tiny_dinov2_matches_the_debug_networks_repa_target_and_loads_from_a_folder(tmp_path):
    """tiny-dinov2 is a transformers Dinov2Model whose patch tokens x width are EMMDiT_Debug's REPA target
    (group-1 tokens x repa_dim); saved with save_pretrained it loads back through from_pretrained unchanged."""
    from transformers import Dinov2Model

    from model.encoders import dino as encoders_dino
    from model.emmdit.config import PRESETS
    from model.encoders import load_repa_encoder

    debug = PRESETS["EMMDiT_Debug"]
    enc = load_repa_encoder("tiny-dinov2")
    assert isinstance(enc.model, Dinov2Model)
    assert enc.shape == (debug.num_patches, debug.repa_dim) == encoders_dino.feature_shape("tiny-dinov2")
    assert enc.image_size == debug.grid_size * enc.patch_size  # derived: the token grid is the latent grid
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    feats = enc.encode(x)
    assert feats.shape == (2, 256, 32) and feats.dtype == torch.float32
    # patch tokens of the last hidden state (after the final LayerNorm), CLS left out, ImageNet-normalised input
    mean = torch.tensor(encoders_dino.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(encoders_dino.IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        hidden = enc.model(pixel_values=((x + 1) / 2 - mean) / std).last_hidden_state
    assert hidden.shape[1] == 257 and torch.equal(feats, hidden[:, 1:])
    # another input size is resized to the encoder's (here 128 -> 64 px)
    assert enc.encode(torch.rand(1, 3, 128, 128) * 2 - 1).shape == (1, 256, 32)

    folder = encoders_dino.save_tiny_dinov2(tmp_path / "dino")
    loaded = load_repa_encoder(folder)
    assert (loaded.image_size, loaded.shape) == (64, (256, 32))
    assert encoders_dino.feature_shape(folder) == (256, 32)
    assert torch.equal(loaded.encode(x), feats)
    with pytest.raises(ValueError, match="unknown REPA feature encoder 'dinov3'"):
        load_repa_encoder("dinov3")
