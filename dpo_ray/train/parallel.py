"""The model across workers: DDP or FSDP2 per decoder layer, and torch.compile of each decoder layer."""

from __future__ import annotations

from typing import Any

import torch

from dpo_ray.errors import UserError

__all__ = ["compile_layers", "decoder_layers", "wrap"]


def decoder_layers(model: Any, purpose: str = "FSDP", fix: str = "use train.workers.parallelism: ddp") -> list[Any]:
    """The modules FSDP2 shards (and train.batching.compile compiles) one by one: those of a class the model names in
    `_no_split_modules` (its decoder layers, in every transformers family: LlamaDecoderLayer,
    Gemma2DecoderLayer, GPT2Block, ...)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT (LoRA) or plain
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in base.modules() if type(m).__name__ in names]
    if not layers:
        raise UserError(
            f"{purpose}: {type(base).__name__} names no decoder layer class in _no_split_modules ({sorted(names)}); "
            + fix
        )
    return layers


def compile_layers(model: Any) -> int:
    """torch.compile every decoder layer in place (nn.Module.compile: the module stays itself, so LoRA, DDP,
    FSDP2 and checkpoints see the same names); returns how many. The padding-free attention is opaque to the
    compiler (dpo_ray.compute.attention), so layouts that change every micro-batch cost no recompilation; a row length
    that changes does once (dynamic shapes from the second length on)."""
    layers = decoder_layers(model, "train.batching.compile", "set train.batching.compile: false")
    for layer in layers:
        layer.compile()
    return len(layers)


def wrap(model: Any, parallelism: str, world_size: int, use_gpu: bool) -> Any:
    if world_size <= 1:
        return model
    if parallelism == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in decoder_layers(model):
            fully_shard(layer)
        return fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel

    # No buffer broadcast in every forward: a Llama's only buffers (rotary frequencies) are computed
    # identically on every rank.
    return DistributedDataParallel(
        model, device_ids=[torch.cuda.current_device()] if use_gpu else None, broadcast_buffers=False
    )
