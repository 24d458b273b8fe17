"""LoRA through peft: only the adapters train; the export is merged into the base weights (so vLLM and
the next stages load it as a plain model) and, optionally, also saved as an adapter.

Reference log-probs are precomputed, so no adapter toggling is needed to get πref during training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["LoraSettings", "apply_lora", "peft_model_from_state"]


@dataclass(frozen=True)
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: tuple[str, ...] = field(default=("q_proj", "k_proj", "v_proj", "o_proj"))
    save_adapter: bool = False


def _peft_config(s: LoraSettings) -> Any:
    try:
        from peft import LoraConfig
    except ImportError as e:
        raise ImportError("train.lora needs peft: pip install 'dpo-ray[lora]' (or pip install peft)") from e

    return LoraConfig(
        r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules=list(s.target_modules), task_type="CAUSAL_LM"
    )


def apply_lora(model: Any, s: LoraSettings) -> Any:
    """Wrap a transformers causal LM with fresh LoRA adapters (B = 0: the model is unchanged at first);
    every base weight is frozen."""
    config = _peft_config(s)  # first: a clear error when peft is missing
    from peft import get_peft_model

    missing = [m for m in s.target_modules if not any(n.endswith(m) for n, _ in model.named_modules())]
    if missing:
        raise ValueError(f"lora.target_modules: {missing} match no module of this model")
    return get_peft_model(model, config)


def peft_model_from_state(
    base_ref: str, s: LoraSettings, state_dict: dict[str, Any], trust_remote_code: bool = False
) -> Any:
    """A CPU PEFT model: base_ref with adapters loaded from `state_dict` (a full PEFT-model state dict,
    e.g. gathered from DDP/FSDP workers). `.merge_and_unload()` gives the merged plain model."""
    from peft import get_peft_model

    from dpo_ray.models.loading import load_causal_lm

    peft_model = get_peft_model(load_causal_lm(base_ref, "float32", trust_remote_code), _peft_config(s))
    result = peft_model.load_state_dict(state_dict, strict=False)
    lora_missing = [k for k in result.missing_keys if "lora_" in k]
    if lora_missing or result.unexpected_keys:
        raise RuntimeError(f"LoRA export: missing {lora_missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    return peft_model
