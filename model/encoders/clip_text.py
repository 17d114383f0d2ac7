"""The DFN5B CLIP text tower through open_clip (MicroDiT's caption states: 77 token states after ln_final), and a
tiny tower built from config for tests.

Specs: "hf-hub:apple/DFN5B-CLIP-ViT-H-14-378" (any "hf-hub:" open_clip repo with a plain text tower), a local folder
written by `save_tiny_text_encoder` (open_clip's config JSON + safetensors), or "tiny" (width 64, fixed seed).
"""
from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

import torch
from open_clip.model import CLIPTextCfg, _build_text_tower
from open_clip.pretrained import download_pretrained_from_hf
from open_clip.tokenizer import SimpleTokenizer
from safetensors import safe_open
from safetensors.torch import save_file

from model.encoders.specs import CLIP_TINY, is_local_spec

CONFIG_NAME = "open_clip_config.json"  # open_clip's names, so hub repos and local folders read alike
WEIGHTS_NAME = "open_clip_model.safetensors"
TINY_SEED = 20240715
TINY_MODEL_CFG = {
    "embed_dim": 64,
    "quick_gelu": False,
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}


@lru_cache(maxsize=4)
def _tokenizer(context_length: int):

    return SimpleTokenizer(context_length=context_length)  # vocab ships inside open_clip


class TextEncoder:
    """An open_clip text tower returning every token state after ln_final (no pooling, no projection)."""

    def __init__(self, tower: torch.nn.Module, device, dtype):
        self.tower = tower.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.device, self.dtype = torch.device(device), dtype
        self.width = int(tower.width)
        self.context_length = int(tower.context_length)
        self.tokenizer = _tokenizer(self.context_length)

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """(N, context_length) token ids; long captions are truncated (end token kept)."""
        if isinstance(captions, str):
            raise ValueError("expected a list of captions, got a single str")
        return self.tokenizer(list(captions))

    def count_tokens(self, captions: list[str]) -> list[int]:
        """Untruncated token count per caption, start and end tokens included (> context_length: truncated)."""
        return [len(self.tokenizer.encode(c)) + 2 for c in captions]

    @torch.no_grad()
    def encode(self, captions: list[str]) -> torch.Tensor:
        """(N, 77, width) float32 token states after ln_final."""
        t = self.tower
        tokens = self.tokenize(captions).to(self.device)  # (N, L)
        x = t.token_embedding(tokens).to(self.dtype) + t.positional_embedding.to(self.dtype)  # (N, L, D)
        x = t.transformer(x, attn_mask=t.attn_mask)  # batch-first, causal
        return t.ln_final(x).float()  # (N, L, D)


def build_text_tower(model_cfg: dict, dtype=torch.float32) -> torch.nn.Module:
    """The text tower of an open_clip model config, without its projection."""
    text_cfg = dict(model_cfg["text_cfg"])
    if text_cfg.get("hf_model_name") or text_cfg.get("hf_tokenizer_name"):
        raise ValueError(f"text tower with a HuggingFace model/tokenizer ({text_cfg}) is not supported; "
                         "expected an open_clip TextTransformer config")
    text_cfg["proj_type"] = "none"
    cast = dtype if dtype in (torch.float16, torch.bfloat16) else None  # fp32 LayerNorm in low precision
    return _build_text_tower(model_cfg.get("embed_dim", 0), CLIPTextCfg(**text_cfg),
                             quick_gelu=model_cfg.get("quick_gelu", False), cast_dtype=cast)


def _text_state(weights_path: str) -> dict[str, torch.Tensor]:
    """Text-tower tensors of an open_clip checkpoint (CLIP keys, or CustomTextCLIP's "text." prefix)."""
    def keep(k: str) -> str | None:
        k = k[len("text."):] if k.startswith("text.") else k
        if k.startswith(("token_embedding.", "positional_embedding", "transformer.", "ln_final.")):
            return k
        return None

    if weights_path.endswith(".safetensors"):
        with safe_open(weights_path, framework="pt") as f:  # reads only the text tensors
            return {keep(k): f.get_tensor(k) for k in f.keys() if keep(k)}
    sd = torch.load(weights_path, map_location="cpu", weights_only=True)
    sd = sd.get("state_dict", sd)
    return {keep(k): v for k, v in sd.items() if keep(k)}


def _load_tower(model_cfg: dict, weights_path: str, dtype) -> torch.nn.Module:
    tower = build_text_tower(model_cfg, dtype)
    tower.load_state_dict(_text_state(weights_path), strict=True)
    return tower


def load_open_clip(spec: str, device="cpu", dtype: torch.dtype = torch.float32) -> TextEncoder:
    """An open_clip text tower by spec: an "hf-hub:" repo, a local folder from `save_tiny_text_encoder`, or "tiny"."""
    if spec == CLIP_TINY:
        return TextEncoder(tiny_tower(), device, dtype)
    if isinstance(spec, str) and spec.startswith("hf-hub:") and len(spec) > len("hf-hub:"):
        repo = spec[len("hf-hub:"):]
        with open(download_pretrained_from_hf(repo, filename=CONFIG_NAME), encoding="utf-8") as f:
            cfg = json.load(f)
        weights = download_pretrained_from_hf(repo)  # prefers open_clip_model.safetensors
        return TextEncoder(_load_tower(cfg.get("model_cfg", cfg), weights, dtype), device, dtype)
    if is_local_spec(spec):
        folder = Path(spec).expanduser()
        if not (folder / CONFIG_NAME).is_file() or not (folder / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"text encoder folder {str(folder)!r} needs {CONFIG_NAME} and {WEIGHTS_NAME}")
        cfg = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
        return TextEncoder(_load_tower(cfg.get("model_cfg", cfg), str(folder / WEIGHTS_NAME), dtype), device, dtype)
    raise ValueError(f"unknown open_clip text tower {spec!r}; expected an 'hf-hub:' repo, 'tiny' or a folder from "
                     "save_tiny_text_encoder")


def tiny_tower(seed: int = TINY_SEED) -> torch.nn.Module:
    # Own RNG state: the same weights in every process, whatever the caller seeded.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_text_tower(TINY_MODEL_CFG, torch.float32)


def save_tiny_text_encoder(folder, seed: int = TINY_SEED) -> str:
    """Write the tiny text tower as an open_clip config JSON + safetensors weights (CLIP key names)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in tiny_tower(seed).state_dict().items()}
    save_file(state, str(folder / (WEIGHTS_NAME + ".tmp")))
    os.replace(folder / (WEIGHTS_NAME + ".tmp"), folder / WEIGHTS_NAME)
    (folder / CONFIG_NAME).write_text(json.dumps({"model_cfg": TINY_MODEL_CFG}, indent=2), encoding="utf-8")
    return str(folder)


# ------------------------------------------------------------------- the same tower as transformers' CLIP


def to_transformers(encoder: TextEncoder):
    """(CLIPTextModel, CLIPTokenizer) computing the same caption states as `encoder`: the open_clip tower's weights
    under transformers' names (the fused q|k|v split in three), and a tokenizer from open_clip's own BPE vocabulary
    padding with id 0 as open_clip does. Exported pipelines carry these, so they load without open_clip."""
    from transformers import CLIPTextConfig, CLIPTextModel

    tower = encoder.tower
    block = tower.transformer.resblocks[0]
    act = "quick_gelu" if type(block.mlp.gelu).__name__ == "QuickGELU" else "gelu"
    cfg = CLIPTextConfig(vocab_size=tower.vocab_size, hidden_size=tower.width,
                         intermediate_size=block.mlp.c_fc.out_features,
                         num_hidden_layers=len(tower.transformer.resblocks), num_attention_heads=tower.heads,
                         max_position_embeddings=tower.context_length, hidden_act=act,
                         layer_norm_eps=tower.ln_final.eps, pad_token_id=0, bos_token_id=49406, eos_token_id=49407)
    state = {"text_model.embeddings.token_embedding.weight": tower.token_embedding.weight,
             "text_model.embeddings.position_embedding.weight": tower.positional_embedding,
             "text_model.final_layer_norm.weight": tower.ln_final.weight,
             "text_model.final_layer_norm.bias": tower.ln_final.bias}
    for i, b in enumerate(tower.transformer.resblocks):
        pre = f"text_model.encoder.layers.{i}."
        q, k, v = b.attn.in_proj_weight.chunk(3)
        qb, kb, vb = b.attn.in_proj_bias.chunk(3)
        state.update({pre + "self_attn.q_proj.weight": q, pre + "self_attn.k_proj.weight": k,
                      pre + "self_attn.v_proj.weight": v, pre + "self_attn.q_proj.bias": qb,
                      pre + "self_attn.k_proj.bias": kb, pre + "self_attn.v_proj.bias": vb,
                      pre + "self_attn.out_proj.weight": b.attn.out_proj.weight,
                      pre + "self_attn.out_proj.bias": b.attn.out_proj.bias,
                      pre + "layer_norm1.weight": b.ln_1.weight, pre + "layer_norm1.bias": b.ln_1.bias,
                      pre + "layer_norm2.weight": b.ln_2.weight, pre + "layer_norm2.bias": b.ln_2.bias,
                      pre + "mlp.fc1.weight": b.mlp.c_fc.weight, pre + "mlp.fc1.bias": b.mlp.c_fc.bias,
                      pre + "mlp.fc2.weight": b.mlp.c_proj.weight, pre + "mlp.fc2.bias": b.mlp.c_proj.bias})
    model = CLIPTextModel(cfg)
    # transformers 5 names the tensors without the "text_model." of its 4.x checkpoints
    prefix = "text_model." if any(k.startswith("text_model.") for k in model.state_dict()) else ""
    model.load_state_dict({prefix + k[len("text_model."):]: v.detach().clone() for k, v in state.items()},
                          strict=True)
    return model.to(device=encoder.device, dtype=encoder.dtype).eval().requires_grad_(False), clip_tokenizer()


def clip_tokenizer():
    """transformers' CLIPTokenizer over open_clip's BPE vocabulary (the one every CLIP text tower shares); with
    model/pipelines/microdit.py `clip_ids` (open_clip's cleaning, pad id 0) its ids are open_clip's."""
    import tempfile

    from transformers import CLIPTokenizer

    bpe = SimpleTokenizer()  # its vocabulary and merges, read from the file open_clip ships
    vocab = dict(bpe.encoder)
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    vocab = {("<|startoftext|>" if k == "<start_of_text>" else "<|endoftext|>" if k == "<end_of_text>" else k): v
             for k, v in vocab.items()}
    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(vocab, f, ensure_ascii=False)
        with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                             model_max_length=77)
