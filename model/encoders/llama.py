"""Llama caption encoder (E-MMDiT): last hidden states of Llama-3.2-1B, BOS + caption, right-padded with EOS.

Specs: "meta-llama/Llama-3.2-1B" (or any hub id / local folder holding a Llama `config.json`, weights and a
tokenizer, as `save_pretrained` writes them), or "tiny-llama" (width 64, 2 layers, a word-level tokenizer built
offline, fixed-seed weights). `tokens` is the padded length (128 for E-MMDiT).

Pad rows: the network attends to every one of the `tokens` rows (no text mask), so pad rows are part of the
input. Llama is causal, so a caption's own rows do not depend on what follows them; the pad rows do in a plain
padded forward (each EOS sees the caption before it). Here every pad row is one fixed vector instead, `pad_state`
(the last hidden state of a lone EOS token), so a caption is exactly (its n real rows, n) and storage keeps only
those (precompute re-pads on read). The unconditional input is the empty prompt's embedding: BOS, then pads.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

LLAMA_3_2_1B = "meta-llama/Llama-3.2-1B"
HUB = ("meta-llama/Llama-3.2-1B",)  # the E-MMDiT release's
TINY = "tiny-llama"
TINY_SEED = 20251031
TINY_TOKENS = 16
DEFAULT_TOKENS = 128
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
    """Captions -> (N, tokens, width) float32 Llama last hidden states; pad rows are `pad_state`."""

    def __init__(self, model, tokenizer, device, dtype, tokens: int):
        if tokens < 2:
            raise ValueError(f"tokens={tokens}: expected at least 2 (BOS and one more)")
        if tokenizer.eos_token_id is None or tokenizer.bos_token_id is None:
            raise ValueError("the Llama tokenizer needs a BOS and an EOS token")
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.device, self.dtype = torch.device(device), dtype
        self.width = int(model.config.hidden_size)
        self.context_length = int(tokens)
        self.eos_id, self.bos_id = int(tokenizer.eos_token_id), int(tokenizer.bos_token_id)
        self._pad = None

    def _ids(self, captions: list[str]) -> list[list[int]]:
        if isinstance(captions, str):
            raise ValueError("expected a list of captions, got a single str")
        ids = self.tokenizer(list(captions), add_special_tokens=True)["input_ids"]
        return [i if i[:1] == [self.bos_id] else [self.bos_id, *i] for i in ids]  # BOS first, as Llama-3's

    def count_tokens(self, captions: list[str]) -> list[int]:
        """Untruncated token count per caption, BOS included (> context_length: truncated)."""
        return [len(i) for i in self._ids(captions)]

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """((N, tokens) ids right-padded with EOS, (N,) real lengths), long captions truncated."""
        ids = [i[:self.context_length] for i in self._ids(captions)]
        lengths = torch.tensor([len(i) for i in ids], dtype=torch.long)
        padded = torch.full((len(ids), self.context_length), self.eos_id, dtype=torch.long)
        for row, i in enumerate(ids):
            padded[row, :len(i)] = torch.tensor(i, dtype=torch.long)
        return padded, lengths

    @property
    def pad_state(self) -> torch.Tensor:
        """(width,) float32: the last hidden state of a lone EOS token, the value of every pad row."""
        if self._pad is None:
            ids = torch.tensor([[self.eos_id]], device=self.device)
            with torch.no_grad():
                self._pad = self.model(input_ids=ids).last_hidden_state[0, 0].float()
        return self._pad

    @torch.no_grad()
    def encode_with_lengths(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """((N, tokens, width) float32 states, (N,) real lengths)."""
        ids, lengths = self.tokenize(captions)
        ids = ids.to(self.device)
        # No attention mask: causal attention keeps real rows independent of the pads after them.
        states = self.model(input_ids=ids).last_hidden_state.float()  # (N, L, D)
        pad = torch.arange(self.context_length, device=self.device)[None, :] >= lengths.to(self.device)[:, None]
        states = torch.where(pad[..., None], self.pad_state.to(states), states)
        return states, lengths

    def encode(self, captions: list[str]) -> torch.Tensor:
        """(N, tokens, width) float32 last hidden states."""
        return self.encode_with_lengths(captions)[0]

    def unconditional(self) -> torch.Tensor:
        """(tokens, width) float32: the empty prompt's embedding (classifier-free guidance, caption dropout)."""
        return self.encode([""])[0]


def load_llama(spec: str, device="cpu", dtype: torch.dtype = torch.float32,
               tokens: int | None = None) -> LlamaTextEncoder:
    """A Llama caption encoder: "tiny-llama", a hub id, or a local folder (FileNotFoundError when it lacks files)."""
    if spec == TINY:
        tokenizer = build_tiny_tokenizer()
        return LlamaTextEncoder(build_tiny_model(len(tokenizer)), tokenizer, device, dtype, tokens or TINY_TOKENS)
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
    return LlamaTextEncoder(model, tokenizer, device, dtype, tokens or default)


def is_llama_folder(folder: str) -> bool:
    """True for a local folder holding a transformers Llama config (model_type "llama")."""
    import json

    cfg = Path(folder).expanduser() / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text(encoding="utf-8")).get("model_type") == "llama"
    except ValueError:
        return False
