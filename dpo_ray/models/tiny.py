"""Tiny models trained and built in-process: a BPE tokenizer on a corpus and a small Llama with it (the demo's
policy, and the tests' and benchmarks' models; no hub download)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["BOS_TOKEN", "EOS_TOKEN", "PAD_TOKEN", "build_tiny_llama", "train_bpe_tokenizer"]

BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<s>", "</s>", "<pad>"

logger = logging.getLogger(__name__)


def train_bpe_tokenizer(corpus: Iterable[str], vocab_size: int = 512, chat_template: str | None = None) -> Any:
    """A byte-level BPE tokenizer trained on `corpus`, adding BOS in front of every encoded text.

    Special tokens: BOS `<s>`, EOS `</s>`, PAD `<pad>`. Returns a transformers fast tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    bos_id = bpe.token_to_id(BOS_TOKEN)
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


def build_tiny_llama(
    out_dir: str | os.PathLike[str],
    corpus: Iterable[str],
    *,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    head_dim: int = 32,
    intermediate_size: int = 128,
    max_position_embeddings: int = 1024,
    seed: int = 0,
    chat_template: str | None = None,
) -> Path:
    """Train a BPE tokenizer on `corpus`, initialise a Llama with it, save both to `out_dir`.

    head_dim must be >= 32: vLLM's CPU attention rejects 16. Weights are random (seeded); the saved
    directory loads in transformers and vLLM. Returns `out_dir`.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if head_dim < 32:
        raise ValueError(f"head_dim must be >= 32 (vLLM CPU attention), found {head_dim}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_bpe_tokenizer(corpus, vocab_size=vocab_size, chat_template=chat_template)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    logger.info("built tiny Llama (%d params) at %s", sum(p.numel() for p in model.parameters()), out)
    return out
