"""The trained policy as a Hugging Face model directory (merged when trained with LoRA), written by rank 0."""

from __future__ import annotations

import os
from typing import Any

from dpo_ray.train.checkpoint import temp_dir

__all__ = ["export_model"]


def export_model(model: Any, cfg: Any, rank: int) -> None:
    """Gather the full weights; rank 0 writes an HF model dir (safetensors, config, tokenizer) to cfg.export."""
    import fsspec
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from dpo_ray.models.loading import load_tokenizer
    from dpo_ray.train.lora import peft_model_from_state

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return
    base = model.module if hasattr(model, "module") else model
    local = temp_dir()
    if cfg.lora is not None:
        peft_model = peft_model_from_state(cfg.model, cfg.lora, full, cfg.trust_remote_code)
        if cfg.lora.save_adapter:
            peft_model.save_pretrained(os.path.join(local, "adapter"))
        peft_model.merge_and_unload().save_pretrained(local, safe_serialization=True)
    else:
        base.save_pretrained(local, state_dict=full, safe_serialization=True)
    load_tokenizer(cfg.model, cfg.trust_remote_code).save_pretrained(local)
    fs, path = fsspec.core.url_to_fs(cfg.export)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    fs.put(local.rstrip("/") + "/", path, recursive=True)
