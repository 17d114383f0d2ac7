"""Llama caption encoder (E-MMDiT): last hidden states of Llama-3.2-1B, padded to `tokens` rows with EOS.

Specs: "meta-llama/Llama-3.2-1B" (or any hub id / local folder holding a Llama `config.json`, weights and a
tokenizer, as `save_pretrained` writes them), or "tiny-llama" (width 64, 2 layers, a word-level tokenizer built
offline, fixed-seed weights). `tokens` is the padded length (128 for E-MMDiT).

Two text modes, defined once in model/pipelines/emmdit.py (`encode_llama`), which the pipeline draws with:
"release", the Nitro-E release's procedure (captions cleaned, Llama run with the attention mask, all rows kept: the
pad rows depend on the caption), and "compact", an opt-in for storage (Llama without a mask, every pad row one fixed
vector, `pad_state`, so storage keeps a caption's own rows only). The unconditional input is the empty prompt's
embedding in the same mode.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from model.encoders.specs import LLAMA_TINY
from model.pipelines.emmdit import TEXT_MODES, encode_llama, preprocess_captions

TINY_SEED = 20251031
TINY_TOKENS = 16
DEFAULT_TOKENS = 128
CLEAN_CAPTION = True  # the release cleans captions in its precompute and its pipeline call alike
BOS, EOS, UNK = "<|begin_of_text|>", "<|end_of_text|>", "<unk>"
# The tiny tokenizer's words: the synthetic demo captions' vocabulary plus common caption words.
TINY_WORDS = ("a an the of on in at with and to is are small large big little red green blue yellow purple orange "
              "white black gray grey pink brown circle square triangle background center centre top bottom left "
              "right middle photo photograph picture painting image drawing shape shapes object dog cat car "
              "house tree sky sea city street man woman person people , .").split()
TINY_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=True)


def build_tiny_tokenizer():
    """A word-level PreTrainedTokenizerFast (lower-cased, BOS prepended) that needs no download."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([UNK, BOS, EOS, *dict.fromkeys(TINY_WORDS)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK,
                                   model_max_length=TINY_TOKENS)


def build_tiny_model(vocab_size: int, seed: int = TINY_SEED):
    """A tiny LlamaModel with fixed-seed weights (the same in every process)."""
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(vocab_size=vocab_size, **TINY_CONFIG)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaModel(cfg)


def save_tiny_llama(folder, seed: int = TINY_SEED) -> str:
    """Write the tiny Llama and its tokenizer with save_pretrained (the real loading path reads them back)."""
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(len(tokenizer), seed)
    Path(folder).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    return str(folder)


class LlamaTextEncoder:
    """Captions -> (N, tokens, width) float32 Llama last hidden states in a text mode (module docstring); the same
    procedure the E-MMDiT pipeline draws with (model/pipelines/emmdit.py `encode_llama`)."""

    def __init__(self, model, tokenizer, device, dtype, tokens: int, mode: str = "release"):
        if tokens < 2:
            raise ValueError(f"tokens={tokens}: expected at least 2 (BOS and one more)")
        if tokenizer.eos_token_id is None or tokenizer.bos_token_id is None:
            raise ValueError("the Llama tokenizer needs a BOS and an EOS token")
        if mode not in TEXT_MODES:
            raise ValueError(f"text mode {mode!r}: expected one of {TEXT_MODES}")
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.device, self.dtype = torch.device(device), dtype
        self.width = int(model.config.hidden_size)
        self.context_length = int(tokens)
        self.mode = mode

    def count_tokens(self, captions: list[str]) -> list[int]:
        """Untruncated token count per caption as the mode tokenizes it, BOS included (> context_length:
        truncated)."""
        if isinstance(captions, str):
            raise ValueError("expected a list of captions, got a single str")
        texts = preprocess_captions(list(captions), CLEAN_CAPTION) if self.mode == "release" else list(captions)
        ids = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        bos = self.tokenizer.bos_token_id
        return [len(i) + (i[:1] != [bos]) for i in ids]

    @property
    def pad_state(self) -> torch.Tensor:
        """(width,) float32, compact mode's value of every pad row: the last hidden state of a lone EOS token."""
        if self.mode != "compact":
            raise ValueError("pad rows are one fixed vector in compact mode only")
        return self.encode([""])[0, -1]

    def encode_with_lengths(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """((N, tokens, width) float32 states, (N,) real token counts)."""
        if isinstance(captions, str):
            raise ValueError("expected a list of captions, got a single str")
        return encode_llama(self.tokenizer, self.model, list(captions), self.context_length, self.mode,
                            CLEAN_CAPTION)

    def encode(self, captions: list[str]) -> torch.Tensor:
        """(N, tokens, width) float32 last hidden states."""
        return self.encode_with_lengths(captions)[0]

    def unconditional(self) -> torch.Tensor:
        """(tokens, width) float32: the empty prompt's embedding (classifier-free guidance, caption dropout)."""
        return self.encode([""])[0]


def load_llama(spec: str, device="cpu", dtype: torch.dtype = torch.float32, tokens: int | None = None,
               mode: str = "release") -> LlamaTextEncoder:
    """A Llama caption encoder: "tiny-llama", a hub id, or a local folder (FileNotFoundError when it lacks files)."""
    if spec == LLAMA_TINY:
        tokenizer = build_tiny_tokenizer()
        return LlamaTextEncoder(build_tiny_model(len(tokenizer)), tokenizer, device, dtype, tokens or TINY_TOKENS,
                                mode)
    from transformers import AutoModel, AutoTokenizer

    path = str(spec)
    if os.path.isdir(os.path.expanduser(path)):
        path = os.path.expanduser(path)
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"Llama folder {path!r} has no config.json")
    tokenizer = AutoTokenizer.from_pretrained(path)
    # LlamaModel (no LM head): hub checkpoints of LlamaForCausalLM load with their "model." prefix stripped.
    model = AutoModel.from_pretrained(path, dtype=dtype, use_safetensors=True)
    if getattr(model.config, "model_type", None) != "llama":
        raise ValueError(f"text encoder {spec!r} is a {model.config.model_type!r} model, expected 'llama'")
    default = tokenizer.model_max_length if tokenizer.model_max_length <= 4096 else DEFAULT_TOKENS
    return LlamaTextEncoder(model, tokenizer, device, dtype, tokens or default, mode)
