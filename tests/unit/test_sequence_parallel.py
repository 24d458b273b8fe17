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


STEP_PAIRS = PAIRS + [([1, 3], [5, 6, 7, 2], [8, 2]), ([1, 2, 3, 4, 5], [6, 2], [7, 7, 2])]


def _step_batch(loss: str):
    from dpo_ray.compute.batching import PairTokens
    from dpo_ray.objective.spec import LossSpec
    from dpo_ray.train.step import StepBatch

    n = len(STEP_PAIRS)
    ref = torch.tensor([-10.0 - i for i in range(n)], dtype=torch.float64)
    labels = torch.tensor([i % 2 == 0 for i in range(n)]) if LossSpec(name=loss).unpaired else None
    # the rejected (KTO: KL) references far below the policy: z0 > 0, not its clamp
    return StepBatch([PairTokens(*p) for p in STEP_PAIRS], ref, ref.flip(0) * 4, labels=labels)


def _step_settings(loss: str, layout: str, k: int, budget: int):
    from dpo_ray.objective.spec import LossSpec
    from dpo_ray.train.step import TrainSettings

    return TrainSettings(
        LossSpec(name=loss, beta=0.5), token_budget=budget, batching=layout, max_grad_norm=None, sequence_parallel=k
    )


def _step(model, batch, settings, world: int) -> dict:
    from dpo_ray.train.optim import make_optimizer, make_scheduler
    from dpo_ray.train.step import train_step

    opt = make_optimizer(model, "adamw", 1e-2, 0.0)
    metrics = train_step(model, opt, make_scheduler(opt, 0, 1, "constant"), batch, settings, len(STEP_PAIRS), world)
    return metrics.metrics


def _step_rank(
    rank: int, world: int, k: int, port: int, out: str, loss: str, layout: str, name: str, fsdp: bool
) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel

    from dpo_ray.compute.sequence_parallel import join_groups

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    sp = join_groups(k)
    if fsdp:  # FSDP2 shards every parameter over all the ranks, across the groups
        model = _model(name)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    else:
        model = DistributedDataParallel(_model(name))
    replicas, replica = world // k, rank // k  # the ranks of a group train the same pairs: its slice of the batch
    share = [i for i in range(len(STEP_PAIRS)) if i % replicas == replica]
    # a small token budget on one replica: several micro-batches there, one on the other (collectives aligned)
    settings = _step_settings(loss, layout, k, 12 if replica == 0 else 1000)
    metrics = _step(model, _step_batch(loss).select(share), settings, world)
    inner = model if fsdp else model.module
    weight = inner.model.layers[0].self_attn.q_proj.weight
    weight = (weight.full_tensor() if isinstance(weight, DTensor) else weight).detach().flatten()[:30].tolist()
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"metrics": metrics, "q": weight, "sp_rank": sp.rank}, f)
    dist.barrier()
    os._exit(0)


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("loss", "layout", "world", "k", "name", "fsdp"),
    [
        ("sigmoid", "prefix_shared", 4, 2, "llama_gqa", False),
        ("sigmoid", "prefix_shared", 4, 2, "llama_gqa", True),
        ("kto", "packed", 2, 2, "gemma2", False),
        ("sigmoid", "packed", 4, 4, "llama_mha", False),  # one group of 4: k must divide the key-value heads
    ],
)
def test_a_train_step_with_sequence_parallel_groups_equals_one_process(tmp_path, loss, layout, world, k, name, fsdp):
    """One optimizer step under DDP (or FSDP2) over `world` ranks in groups of k (world / k replicas, uneven
    micro-batch counts): the loss, KTO's z₀, the gradient norm and the updated weights of one process on all
    pairs."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "rank0.json"
    mp.spawn(_step_rank, args=(world, k, port, str(out), loss, layout, name, fsdp), nprocs=world, join=True)
    got = json.loads(out.read_text())
    model = _model(name)
    single = _step(model, _step_batch(loss), _step_settings(loss, layout, 1, 1000), 1)
    # Bounds: as above, the loss is a mean of per-pair terms of those log-prob sums (1e-4 / pair, slope <= 1),
    # the gradient norm sums the same products in another order (relative 1e-4); Adam's first step moves each
    # weight by ~lr = 1e-2 whatever the gradient's size, so the weights agree to lr x the gradients' relative
    # error where a gradient is not near 0: 1e-5 absolute.
    assert got["metrics"]["loss"] == pytest.approx(single["loss"], abs=1e-4)
    assert got["metrics"]["grad_norm"] == pytest.approx(single["grad_norm"], rel=1e-4)
    assert got["metrics"]["rewards/margins"] == pytest.approx(single["rewards/margins"], abs=1e-4)
    if loss == "kto":
        assert single["kto/z0"] > 0.1 and got["metrics"]["kto/z0"] == pytest.approx(single["kto/z0"], abs=1e-4)
        # counts are sums over the ranks: each group's k ranks hold the same rows, counted once
        assert got["metrics"]["count/desirable"] == single["count/desirable"] == 3
    expected = model.model.layers[0].self_attn.q_proj.weight.detach().flatten()[:30]
    assert torch.allclose(torch.tensor(got["q"]), expected, atol=1e-5)


def test_settings_sequence_parallel_cannot_compute_are_refused():
    from dpo_ray.objective.spec import LossSpec
    from dpo_ray.train.step import TrainSettings

    for kw, why in (
        ({"batching": "padded"}, "batching padded"),
        ({"batching": "packed", "fused_head": True}, "the fused head"),
        ({"batching": "packed", "loss": LossSpec(name="aot")}, "loss aot"),
    ):
        with pytest.raises(ValueError, match=f"sequence_parallel 2 does not apply {why}"):
            TrainSettings(sequence_parallel=2, **kw)
    TrainSettings(sequence_parallel=2, batching="prefix_shared")


def test_the_train_config_refuses_what_sequence_parallel_cannot_compute():
    from pipeline.config import ConfigError, load_config

    base = ["train.model=m", "train.batch_size=8", "train.workers.count=4", "train.sequence_parallel=2"]
    assert load_config(None, base).train.sequence_parallel == 2
    for extra, why in (
        (["train.workers.count=3", "train.batch_size=9"], "workers.count 3 is not a multiple of it"),
        (["train.batching.mode=padded"], "batching.mode padded"),
        (["train.batching.fused_head=true"], "batching.fused_head"),
        (["train.loss.name=aot"], "loss aot"),
    ):
        with pytest.raises(ConfigError, match=f"sequence_parallel 2: .*{why}"):
            load_config(None, [*base, *extra])
