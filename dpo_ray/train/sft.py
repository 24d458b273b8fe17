"""Supervised fine-tuning (next-token prediction) of a small causal LM on texts: the demo's reference model.

Plain PyTorch on one process: tiny models for the sentiment demo train in a minute or two on a CPU. Large
models are out of scope here (use the train stage's machinery or an SFT tool).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = ["sft_train"]


def sft_train(
    model_dir: str | Path,
    texts: Sequence[str],
    steps: int,
    lr: float = 3e-3,
    batch_size: int = 32,
    seed: int = 0,
    log_every: int = 50,
) -> list[float]:
    """Train the model in `model_dir` on `texts` (BOS + text + EOS) for `steps` AdamW steps; save it back.

    Returns the loss of every step (mean token cross-entropy).
    """
    from dpo_ray.compute.batching import collate_sequences
    from dpo_ray.models.loading import load_causal_lm, load_tokenizer

    if steps < 1 or not texts:
        raise ValueError(f"sft_train: need steps >= 1 and some texts, found {steps} steps, {len(texts)} texts")
    tok = load_tokenizer(model_dir)
    model: Any = load_causal_lm(model_dir).train()
    encoded = [tok(t, add_special_tokens=True).input_ids + [tok.eos_token_id] for t in texts]
    rng = random.Random(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for step in range(1, steps + 1):
        batch = rng.sample(encoded, min(batch_size, len(encoded)))
        ids, attention, mask = collate_sequences([b[:1] for b in batch], [b[1:] for b in batch], tok.pad_token_id)
        labels = ids.masked_fill(~mask, -100)  # predict every token after BOS, never padding
        loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
        if step % log_every == 0 or step == steps:
            logger.info("sft step %d/%d loss %.4f", step, steps, losses[-1])
    model.eval().save_pretrained(model_dir, safe_serialization=True)
    return losses
