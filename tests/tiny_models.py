"""Offline stand-ins for tests: a byte-level BPE tokenizer trained on the task haystacks (with a BOS
token and a chat template) and a tiny random Llama folder that `from_pretrained` loads."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from vortex_hybrid.eval import tasks

CHAT = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def tiny_tokenizer(bos: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE of 600 tokens trained on the haystacks: any text encodes, and decodes."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(s) for s in tasks.HAYSTACKS.values()], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>",
                                   **({"bos_token": "<s>"} if bos else {}))
    fast.chat_template = CHAT
    return fast




def tiny_llama_folder(path: Path, positions: int = 4096) -> Path:
    """A randomly initialised 2-layer Llama with `tiny_tokenizer`, saved as a model folder."""
    tok = tiny_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      max_position_embeddings=positions, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tiny_llama_loaded(folder: Path, seed: int):
    """(model in eval mode, float32, tokenizer) of a `tiny_llama_folder` made under `seed` in
    `folder` (module fixtures: set up before conftest's per-test seed, so they fix their own)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.manual_seed(seed)
    print(f"model seed {seed}")
    path = tiny_llama_folder(folder)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)
