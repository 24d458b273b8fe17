"""A fused LM head for completion log-probs: no [tokens × vocab] tensor in forward or backward.

`enable_fused_head(model)` patches the model's forward: called with `dpo_logps_labels` (N,) token ids and
`logits_to_keep` (N,) positions of a one-row batch (the packed / prefix-shared layouts of dpo_ray.compute.layouts),
it runs the decoder, takes the final hidden states at those positions and, in chunks of `chunk_tokens`
positions, projects one chunk through the LM head, applies the model's final logit soft-capping, reads
gather − logsumexp in float32 (dpo_ray.compute.logps.gathered_logps) and drops the chunk's logits. Each chunk is
recomputed in backward (activation checkpointing), so gradients reach the hidden states and the head's
weights (tied embeddings and a LoRA-adapted head included: the head is called as the module it is) while
at most one chunk's logits exist at a time. The patched forward goes through the model's own call, so DDP
and FSDP2 wrappers see an ordinary forward. Without `dpo_logps_labels` the forward is the original one.

The values are those of the unfused path (same operations in the same dtype, chunk by chunk);
dpo_ray.train.loop's pre-training check compares the configured path with plain unbatched forwards.
Models whose logits get a transform this module does not apply (a logit scale or multiplier) are refused.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import Tensor

from dpo_ray.compute.logps import DEFAULT_CHUNK_TOKENS, chunked_logps, gathered_logps
from dpo_ray.errors import UserError

__all__ = ["UnsupportedHeadError", "check_fused_head", "enable_fused_head", "text_config"]

# Config attributes by which some families scale their logits (Cohere, Granite, Falcon-H1, MiniCPM, ...).
_SCALINGS = ("logit_scale", "output_multiplier", "logits_scaling", "lm_head_multiplier")


class UnsupportedHeadError(UserError, ValueError):
    """The model's logits are transformed in a way the fused head does not reproduce."""


def text_config(config: Any) -> Any:
    """The text model's config of a (multimodal or plain) transformers config."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _chunk_logps(hidden: Tensor, labels: Tensor, head: Any, softcap: float | None) -> Tensor:
    logits = head(hidden)
    if softcap is not None:  # as the model's own forward does it, in the logits' dtype
        logits = torch.tanh(logits / softcap) * softcap
    return gathered_logps(logits, labels)


def check_fused_head(config: Any) -> None:
    """Refuse (UnsupportedHeadError) a model config whose logits get a scale the fused head does not apply."""
    config = text_config(config)
    scaled = [a for a in _SCALINGS if getattr(config, a, None) not in (None, 1, 1.0)]
    if scaled:
        raise UnsupportedHeadError(
            f"train.fused_head: {getattr(config, 'model_type', 'this model')} scales its logits ({', '.join(scaled)}), "
            "which the fused head does not reproduce; set train.fused_head: false"
        )


def enable_fused_head(model: Any) -> Any:
    """Patch `model` (a transformers causal LM, before LoRA or DDP/FSDP wrapping) as described in the module
    docstring; returns it. Refuses (UnsupportedHeadError) a model with a logit scale."""
    check_fused_head(model.config)
    softcap = getattr(text_config(model.config), "final_logit_softcapping", None)
    original = model.forward

    def forward(
        self: Any,
        *args: Any,
        dpo_logps_labels: Tensor | None = None,
        dpo_logps_chunk: int = DEFAULT_CHUNK_TOKENS,
        **kwargs: Any,
    ) -> Any:
        if dpo_logps_labels is None:
            return original(*args, **kwargs)
        keep = kwargs.pop("logits_to_keep")
        kwargs.pop("labels", None)
        backbone = getattr(self, self.base_model_prefix)
        hidden = backbone(*args, **kwargs).last_hidden_state[0, keep]  # (N, H): one row, its kept positions
        head = self.get_output_embeddings()
        # recomputed whenever autograd records: the head's weights take gradients even where the hidden states do not
        return chunked_logps(
            _chunk_logps, hidden, dpo_logps_labels, dpo_logps_chunk, head, softcap, recompute=torch.is_grad_enabled()
        )

    model.forward = types.MethodType(forward, model)
    return model
