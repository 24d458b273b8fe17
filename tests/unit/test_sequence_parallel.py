"""Sequence parallelism (dpo_ray.compute.sequence_parallel): k gloo processes share each row's tokens, and the
per-sequence log-probs and every parameter's gradient equal one process computing the whole row
(dpo_ray.compute.layouts.segment_logps), in the packed and prefix-shared layouts, with grouped-query heads,
a sliding window and softcapping (Gemma-2), for k = 2 and 4."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch

PAIRS = [
    ([1, 5, 6], [7, 8, 2, 9, 9, 3], [9, 2]),
    ([1, 4], [6, 2], [5, 5, 5, 2, 7, 7, 7]),
    ([1, 9, 9, 9, 4, 4, 3], [3, 2], [4, 2, 6]),
]
MODELS = {
    # name: (transformers config class, its arguments); heads divide among k = 2 (GQA: 4 query, 2 kv heads)
    "llama_gqa": ("LlamaConfig", {"num_attention_heads": 4, "num_key_value_heads": 2}),
    "llama_mha": ("LlamaConfig", {"num_attention_heads": 4, "num_key_value_heads": 4}),
    # a window of 3 (shorter than most sequences here) on the first layer, softcapped attention logits
    "gemma2": (
        "Gemma2Config",
        {
            "num_attention_heads": 4, "num_key_value_heads": 2, "sliding_window": 3,
            "layer_types": ["sliding_attention", "full_attention"], "attn_logit_softcapping": 2.0,
            "final_logit_softcapping": 30.0, "query_pre_attn_scalar": 16,
        },
    ),
}  # fmt: skip


def _model(name: str):
    import transformers

    cls, extra = MODELS[name]
    config = getattr(transformers, cls)(
        vocab_size=16, hidden_size=64, intermediate_size=96, num_hidden_layers=2, head_dim=16,
        max_position_embeddings=64, **extra,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # weights large enough that the softcap and the window change the log-probs
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    from dpo_ray.compute.attention import enable_segment_attention
    from dpo_ray.models.loading import disable_dropout

    return enable_segment_attention(disable_dropout(model))


def _row(layout: str):
    from dpo_ray.compute.batching import PairTokens
    from dpo_ray.compute.layouts import collate_packed, collate_prefix_shared

    collate = collate_packed if layout == "packed" else collate_prefix_shared
    return collate([PairTokens(*p) for p in PAIRS])


def _loss(logps) -> torch.Tensor:
    """A loss that weighs every sequence differently, so a gradient summed over the wrong sequences shows."""
    w = torch.arange(1, 2 * len(PAIRS) + 1, dtype=torch.float32)
    return (torch.cat([logps.chosen, logps.rejected]) * w).sum() / 10


def _rank(rank: int, size: int, port: int, out: str, name: str, layout: str) -> None:
    import torch.distributed as dist

    from dpo_ray.compute.sequence_parallel import SequenceGroup, sequence_parallel_logps, sum_gradients

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    model = _model(name)
    sp = SequenceGroup(None, rank, size)
    logps = sequence_parallel_logps(model, _row(layout), sp)
    _loss(logps).backward()
    sum_gradients(model, sp)
    if rank == 0:
        grads = {n: p.grad.flatten().tolist() for n, p in model.named_parameters() if p.grad is not None}
        result = {"chosen": logps.chosen.tolist(), "rejected": logps.rejected.tolist(), "grads": grads}
        with open(out, "w") as f:
            json.dump(result, f)
    dist.barrier()
    os._exit(0)  # no gloo teardown (see test_distributed_alignment.py)


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("name", "layout", "size"),
    [
        ("llama_gqa", "packed", 2),
        ("llama_gqa", "prefix_shared", 2),
        ("gemma2", "prefix_shared", 2),
        ("gemma2", "packed", 2),
        ("llama_mha", "prefix_shared", 4),  # 34 tokens: 2 of padding
    ],
)
def test_sequence_parallel_equals_one_process(tmp_path, name, layout, size):
    import torch.multiprocessing as mp

    from dpo_ray.compute.layouts import segment_logps

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "rank0.json"
    mp.spawn(_rank, args=(size, port, str(out), name, layout), nprocs=size, join=True)
    got = json.loads(out.read_text())

    model = _model(name)
    batch = _row(layout)
    logps = segment_logps(model, batch)
    _loss(logps).backward()
    # Bounds: float32 log-probs are ~1e-6 relative (tests/unit/test_logps.py); a sequence sums <= 7 tokens of
    # |log p| <= ~10 (vocabulary 16, weights x0.3 noise): 7 x 10 x 1e-6 ~ 1e-4. Gradients: the same products,
    # added in another order across ranks, relative to the largest entry of each tensor.
    assert got["chosen"] == pytest.approx(logps.chosen.tolist(), abs=1e-4)
    assert got["rejected"] == pytest.approx(logps.rejected.tolist(), abs=1e-4)
    grads = {n: p.grad.flatten() for n, p in model.named_parameters() if p.grad is not None}
    assert set(got["grads"]) == set(grads)
    for n, g in grads.items():
        found = torch.tensor(got["grads"][n])
        scale = float(g.abs().max()) or 1.0
        assert float((found - g).abs().max()) <= 1e-4 * scale, n


def test_heads_that_do_not_divide_among_the_ranks_are_refused():
    from dpo_ray.compute.attention import UnsupportedAttention
    from dpo_ray.compute.sequence_parallel import check_heads

    config = _model("llama_gqa").config
    check_heads(config, 2)
    with pytest.raises(UnsupportedAttention, match="4 query and 2 key-value heads, not divisible by 4"):
        check_heads(config, 4)


def test_a_row_is_cut_into_equal_shards_that_predict_every_completion_token_once():
    """Shards of the padded row: equal lengths, global position ids, and every completion token read on the
    rank that holds its source position, with its label from the whole row."""
    from dpo_ray.compute.sequence_parallel import shard_row

    batch = _row("prefix_shared")
    for size in (1, 2, 3, 4):
        shards = [shard_row(batch, r, size) for r in range(size)]
        assert len({s.input_ids.shape[1] for s in shards}) == 1
        ids = torch.cat([s.input_ids for s in shards], dim=1)[:, : batch.num_tokens]
        pos = torch.cat([s.position_ids for s in shards], dim=1)[:, : batch.num_tokens]
        assert torch.equal(ids, batch.input_ids) and torch.equal(pos, batch.position_ids)
        seq = torch.cat([s.seq for s in shards])
        labels = torch.cat([s.labels for s in shards])
        assert sorted(seq.tolist()) == sorted(batch.seq.tolist())
        assert sorted(labels.tolist()) == sorted(batch.input_ids[0, batch.targets].tolist())
        ends = {b.end for b in shards[0].blocks}
        assert max(ends) == shards[0].input_ids.shape[1] * size  # the padding is a block of its own
