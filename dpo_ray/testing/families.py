"""Tiny random-init models of the major open model families, with each family's tokenizer conventions.

Weights cannot be downloaded here, so tests and demos build models in-process: a small transformers
model of the family's own architecture (random weights, seeded) and a `tokenizers` BPE trained on a
given corpus with the family's special tokens, BOS/EOS/PAD convention, pre-tokenization and chat template
(the real model's template text, shortened only where it handles tools or system prompts). The saved
directory loads in transformers and vLLM like the real model's.

- llama3: Llama, byte-level BPE, adds BOS `<|begin_of_text|>`, EOS `<|end_of_text|>`, no PAD, turns end
  with `<|eot_id|>`.
- qwen2 / qwen3: Qwen2 / Qwen3 (q/k norm), byte-level, no BOS, PAD == EOS `<|endoftext|>`, ChatML turns
  ending `<|im_end|>`; qwen2_swa: Qwen2 with `use_sliding_window` (sliding layers from max_window_layers).
- mistral: Mistral, Metaspace (a ▁ in front of the text), adds `<s>`, EOS `</s>` (also the end of turn),
  no PAD, `[INST]` template, sliding window on every layer.
- gemma2: Gemma-2, SentencePiece-style (spaces → ▁, no prefix), adds `<bos>`, EOS `<eos>`, PAD `<pad>`,
  turns end `<end_of_turn>`; alternating sliding/global layers, attention- and final-logit softcapping.
- gemma3: Gemma-3 text, as gemma2 without softcapping, two sliding layers per global one.
- phi3: Phi-3, Metaspace, adds `<s>`, PAD == EOS `<|endoftext|>`, turns end `<|end|>`, sliding window.
- gpt2: GPT-2, byte-level, BOS == EOS == UNK `<|endoftext|>` never added, no PAD, no chat template,
  learned absolute positions.

head_dim is 32 (vLLM's CPU attention needs >= 32).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["FAMILIES", "Family", "build_tiny_model"]

_LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
_GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
_PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


@dataclass(frozen=True)
class Family:
    """How one family's tiny model and tokenizer are built."""

    name: str
    architecture: str  # transformers config class name
    pre_tokenizer: str  # byte_level | metaspace | sentencepiece
    bos: str | None
    eos: str
    pad: str | None
    unk: str | None = None
    extra_special: tuple[str, ...] = ()
    end_of_turn: str | None = None  # the chat template's stop token (generation_config lists it beside EOS)
    chat_template: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    windowed: bool = False  # some layer attends within a sliding window
    softcap: bool = False  # attention-logit softcapping
    add_bos: bool = True  # the tokenizer puts BOS in front of every encoded text (when it has one)


# What Gemma-2 and Gemma-3 share: tokenizer conventions, GQA, the query scaling, tied embeddings (as every
# Gemma; vLLM's Gemma-2 has no separate lm_head).
_GEMMA_TOKENS: dict[str, Any] = {
    "pre_tokenizer": "sentencepiece",
    "bos": "<bos>",
    "eos": "<eos>",
    "pad": "<pad>",
    "unk": "<unk>",
    "extra_special": ("<start_of_turn>", "<end_of_turn>"),
    "end_of_turn": "<end_of_turn>",
    "chat_template": _GEMMA_TEMPLATE,
}
_GEMMA_CONFIG: dict[str, Any] = {"num_key_value_heads": 1, "query_pre_attn_scalar": 32, "tie_word_embeddings": True}


def _qwen(name: str, config_class: str, config: dict[str, Any], windowed: bool = False) -> Family:
    """A Qwen family: byte-level BPE without BOS, <|endoftext|> as EOS and pad, ChatML turns, GQA."""
    return Family(
        name,
        config_class,
        "byte_level",
        None,
        "<|endoftext|>",
        "<|endoftext|>",
        extra_special=("<|im_start|>", "<|im_end|>"),
        end_of_turn="<|im_end|>",
        chat_template=_CHATML_TEMPLATE,
        config={"num_key_value_heads": 1, **config},
        windowed=windowed,
    )


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "llama3",
            "LlamaConfig",
            "byte_level",
            "<|begin_of_text|>",
            "<|end_of_text|>",
            None,
            extra_special=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
            end_of_turn="<|eot_id|>",
            chat_template=_LLAMA3_TEMPLATE,
            config={"num_key_value_heads": 1, "rope_theta": 500000.0},
        ),
        _qwen("qwen2", "Qwen2Config", {"tie_word_embeddings": True}),
        _qwen("qwen2_swa", "Qwen2Config", {"use_sliding_window": True, "max_window_layers": 1}, windowed=True),
        _qwen("qwen3", "Qwen3Config", {"tie_word_embeddings": True}),
        Family(
            "mistral",
            "MistralConfig",
            "metaspace",
            "<s>",
            "</s>",
            None,
            unk="<unk>",
            end_of_turn="</s>",
            chat_template=_MISTRAL_TEMPLATE,
            config={"num_key_value_heads": 1},
            windowed=True,
        ),
        Family(
            "gemma2",
            "Gemma2Config",
            **_GEMMA_TOKENS,
            config={
                **_GEMMA_CONFIG,
                "attn_logit_softcapping": 50.0,
                "final_logit_softcapping": 30.0,
                "layer_types": ["sliding_attention", "full_attention"],
            },
            windowed=True,
            softcap=True,
        ),
        Family(
            "gemma3",
            "Gemma3TextConfig",
            **_GEMMA_TOKENS,
            config={
                **_GEMMA_CONFIG,
                "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
                "num_hidden_layers": 3,
            },
            windowed=True,
        ),
        Family(
            "phi3",
            "Phi3Config",
            "metaspace",
            "<s>",
            "<|endoftext|>",
            "<|endoftext|>",
            unk="<unk>",
            extra_special=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
            end_of_turn="<|end|>",
            chat_template=_PHI3_TEMPLATE,
            config={"num_key_value_heads": 2},
            windowed=True,
        ),
        Family(
            "gpt2",
            "GPT2Config",
            "byte_level",
            "<|endoftext|>",
            "<|endoftext|>",
            None,
            unk="<|endoftext|>",
            add_bos=False,
        ),
    )
}


def _train_tokenizer(family: Family, corpus: Iterable[str], vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(dict.fromkeys(t for t in (family.pad, family.bos, family.eos, family.unk) if t))
    specials += [t for t in family.extra_special if t not in specials]
    if family.pre_tokenizer == "byte_level":
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        # SentencePiece-style: spaces become ▁; Llama/Mistral/Phi-3 also put one in front of the text.
        bpe = Tokenizer(models.BPE(unk_token=family.unk))
        scheme = "first" if family.pre_tokenizer == "metaspace" else "never"
        bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme)
        bpe.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=scheme)
        if family.pre_tokenizer == "sentencepiece":
            bpe.normalizer = normalizers.Replace(" ", "▁")
        alphabet = []
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    if family.bos is not None and family.add_bos:
        bos_id = bpe.token_to_id(family.bos)
        bpe.post_processor = processors.TemplateProcessing(
            single=f"{family.bos} $A", pair=f"{family.bos} $A $B", special_tokens=[(family.bos, bos_id)]
        )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=family.bos,
        eos_token=family.eos,
        pad_token=family.pad,
        unk_token=family.unk,
        additional_special_tokens=list(family.extra_special) or None,
    )
    if family.chat_template is not None:
        tok.chat_template = family.chat_template
    return tok


def _config(family: Family, tok: Any, hidden: int, layers: int, window: int) -> Any:
    import transformers

    cls = getattr(transformers, family.architecture)
    ids = {
        "bos_token_id": tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    if family.architecture == "GPT2Config":
        return cls(vocab_size=len(tok), n_embd=hidden, n_layer=layers, n_head=hidden // 32, n_positions=1024, **ids)
    kw: dict[str, Any] = {
        "vocab_size": len(tok),
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // 32,
        "head_dim": 32,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": False,
        **ids,
        **family.config,
    }
    if family.windowed:
        kw["sliding_window"] = window
    if family.architecture == "Phi3Config":
        kw.pop("head_dim")
    return cls(**kw)


def build_tiny_model(
    family: str,
    out_dir: str | os.PathLike[str],
    corpus: Iterable[str],
    *,
    vocab_size: int = 400,
    hidden_size: int = 64,
    num_layers: int = 2,
    window: int = 8,
    seed: int = 0,
    perturb_std: float = 0.0,
) -> Path:
    """Build `family`'s tiny model (random weights, seeded) and tokenizer; save both to `out_dir`.

    window: the sliding window of the families that have one (the real ones use 512-4096).
    perturb_std: add N(0, perturb_std²) noise to every weight after the init. At the default init (std 0.02)
    attention logits stay far below Gemma-2's softcap of 50, so a scorer that dropped the softcap would
    agree with one that applies it; 0.15 makes the softcap change log-probs by tenths of a nat.
    Returns `out_dir`, which transformers and vLLM load like a downloaded model.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    if family not in FAMILIES:
        raise ValueError(f"family: unknown {family!r}; expected one of {', '.join(FAMILIES)}")
    spec = FAMILIES[family]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = _train_tokenizer(spec, corpus, vocab_size)
    config = _config(spec, tok, hidden_size, spec.config.get("num_hidden_layers", num_layers), window)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if perturb_std:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * perturb_std)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    # Instruct models list the end-of-turn token beside EOS: generation (vLLM, transformers) stops on either.
    stops = [tok.eos_token_id]
    if spec.end_of_turn is not None and tok.convert_tokens_to_ids(spec.end_of_turn) not in stops:
        stops.append(tok.convert_tokens_to_ids(spec.end_of_turn))
    GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=stops if len(stops) > 1 else stops[0],
        pad_token_id=tok.pad_token_id,
    ).save_pretrained(out)
    (out / "dpo_ray_family.json").write_text(json.dumps({"family": family, "window": window}))
    return out
