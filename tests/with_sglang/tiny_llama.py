"""A tiny randomly initialised Llama with a byte-level tokenizer, written to a folder offline (the
SGLang tests' model; test-only)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = 320
BOS, EOS, PAD = 256, 257, 258


def write_tiny_llama(out: Path, seed: int = 0, head_dim: int = 16, layers: int = 2,
                     heads: int = 4, kv_heads: int = 2, dtype: str = "float32", **overrides) -> Path:
    """Save the model and tokenizer under `out`; `overrides` go into the LlamaConfig."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=heads * head_dim, intermediate_size=128,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, head_dim=head_dim,
                      max_position_embeddings=2048, rope_theta=10000.0, tie_word_embeddings=False,
                      bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, torch_dtype=dtype,
                      **overrides)
    LlamaForCausalLM(cfg).eval().to(getattr(torch, dtype)).save_pretrained(out)
    vocab = {bytes([i]).decode("latin-1"): i for i in range(256)}
    vocab.update({"<s>": BOS, "</s>": EOS, "<pad>": PAD})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(out)
    return out


def edit_config(src: Path, dst: Path, **changes) -> Path:
    """A copy of a model folder whose config.json has `changes` (for start-up checks that only
    read the config)."""
    import shutil
    shutil.copytree(src, dst)
    path = dst / "config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))
    return dst
