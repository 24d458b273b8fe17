"""Sequence parallelism (dpo_ray.compute.sequence_parallel): k gloo processes share each row's tokens, and the
per-sequence log-probs and every parameter's gradient equal one process computing the whole row
(dpo_ray.compute.layouts.segment_logps), in the packed and prefix-shared layouts, with grouped-query heads
(divided among the ranks, or repeated when k is a multiple of them), a sliding window and softcapping
(Gemma-2), through the unfused and the fused LM head, for k = 2 and 4; and on every model family against
unbatched eager forwards of each sequence."""

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


def _rank(rank: int, size: int, port: int, out: str, name: str, layout: str, fused: bool) -> None:
    import torch.distributed as dist

    from dpo_ray.compute.fused_head import enable_fused_head
    from dpo_ray.compute.sequence_parallel import SequenceGroup, sequence_parallel_logps, sum_gradients

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    model = enable_fused_head(_model(name)) if fused else _model(name)
    sp = SequenceGroup(None, rank, size)
    # chunks of 2 positions: the fused head's chunking and recompute across a rank's few source positions
    logps = sequence_parallel_logps(model, _row(layout), sp, chunk_tokens=2, fused=fused)
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
    ("name", "layout", "size", "fused"),
    [
        ("llama_gqa", "packed", 2, False),
        ("llama_gqa", "prefix_shared", 2, False),
        ("gemma2", "prefix_shared", 2, False),
        ("gemma2", "packed", 2, True),  # the final softcap applied by the fused head, per rank
        ("llama_mha", "prefix_shared", 4, False),  # 34 tokens: 2 of padding
        ("llama_gqa", "packed", 4, True),  # 2 key-value heads, each repeated for 2 of the 4 ranks
    ],
)
def test_sequence_parallel_equals_one_process(tmp_path, name, layout, size, fused):
    import torch.multiprocessing as mp

    from dpo_ray.compute.layouts import segment_logps

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "rank0.json"
    mp.spawn(_rank, args=(size, port, str(out), name, layout, fused), nprocs=size, join=True)
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


def test_heads_that_do_not_split_among_the_ranks_are_refused():
    """k must divide the query heads, and divide the key-value heads or be a multiple of them (repeated)."""
    import transformers

    from dpo_ray.compute.attention import UnsupportedAttention
    from dpo_ray.compute.sequence_parallel import check_heads, replicate_kv

    config = _model("llama_gqa").config  # 4 query, 2 key-value heads
    check_heads(config, 2)
    check_heads(config, 4)
    with pytest.raises(UnsupportedAttention, match="4 query and 2 key-value heads; k must divide .* \\(here: 2, 4\\)"):
        check_heads(config, 3)
    odd = transformers.LlamaConfig(num_attention_heads=12, num_key_value_heads=3, hidden_size=96)
    check_heads(odd, 3)
    with pytest.raises(UnsupportedAttention, match="12 query and 3 key-value heads; .* \\(here: 3, 6, 12\\)"):
        check_heads(odd, 2)  # 2 divides the query heads but neither divides nor is a multiple of 3
    kv = torch.arange(2.0).reshape(1, 2, 1, 1)
    assert replicate_kv(kv, 4).flatten().tolist() == [0.0, 0.0, 1.0, 1.0]
    assert replicate_kv(kv, 2) is kv


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
# Long prompts, short completions: in a prefix-shared row every completion token's source lies in the last
# shard, so the other ranks of the group hold none in that micro-batch, and each replica's last (syncing)
# micro-batch is such a row. Those ranks must still run every collective and give every parameter (the fused
# LM head's too) a gradient for DDP or FSDP2 to reduce.
LONG_PAIRS = [
    ([1] + [3 + i % 12 for i in range(38)], [5, 2], [6, 2]),
    ([1] + [4 + i % 11 for i in range(30)], [7, 2], [8, 9, 2]),
]
PAIR_SETS = {"step": STEP_PAIRS, "long": LONG_PAIRS}


def _step_batch(loss: str, pairs: str = "step"):
    from dpo_ray.compute.batching import PairTokens
    from dpo_ray.objective.spec import LossSpec
    from dpo_ray.train.step import StepBatch

    chosen = PAIR_SETS[pairs]
    n = len(chosen)
    ref = torch.tensor([-10.0 - i for i in range(n)], dtype=torch.float64)
    labels = torch.tensor([i % 2 == 0 for i in range(n)]) if LossSpec(name=loss).unpaired else None
    # the rejected (KTO: KL) references far below the policy: z0 > 0, not its clamp
    return StepBatch([PairTokens(*p) for p in chosen], ref, ref.flip(0) * 4, labels=labels)


def _step_settings(loss: str, layout: str, k: int, budget: int, fused: bool = False):
    from dpo_ray.objective.spec import LossSpec
    from dpo_ray.train.step import TrainSettings

    return TrainSettings(
        LossSpec(name=loss, beta=0.5), token_budget=budget, batching=layout, max_grad_norm=None, sequence_parallel=k,
        fused_head=fused, chunk_tokens=2,
    )  # fmt: skip


def _step(model, batch, settings, world: int, global_batch: int = len(STEP_PAIRS)) -> dict:
    from dpo_ray.train.optim import make_optimizer, make_scheduler
    from dpo_ray.train.step import train_step

    opt = make_optimizer(model, "adamw", 1e-2, 0.0)
    metrics = train_step(model, opt, make_scheduler(opt, 0, 1, "constant"), batch, settings, global_batch, world)
    return metrics.metrics


def _policy(name: str, lora: bool, fused: bool = False):
    """The model (its LM head untied), with the fused head enabled if `fused`, and with fresh LoRA adapters on
    q/k/v/o if `lora` (only B moves in a first step: A's gradient is 0 while B = 0)."""
    from dpo_ray.compute.fused_head import enable_fused_head

    model = enable_fused_head(_model(name)) if fused else _model(name)
    if not lora:
        return model
    from dpo_ray.train.lora import LoraSettings, apply_lora

    torch.manual_seed(1)
    return apply_lora(model, LoraSettings(r=4, alpha=8))


def _watched(model) -> torch.Tensor:
    """Weights a step moves: the first layer's q_proj, or its LoRA B."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    q = base.model.layers[0].self_attn.q_proj
    return q.lora_B["default"].weight if hasattr(q, "lora_B") else q.weight


def _step_rank(
    rank: int, world: int, k: int, port: int, out: str, loss: str, layout: str, name: str, fsdp: bool, lora: bool,
    fused: bool, pairs: str,
) -> None:  # fmt: skip
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel

    from dpo_ray.compute.sequence_parallel import join_groups

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    sp = join_groups(k)
    if fsdp:  # FSDP2 shards every parameter over all the ranks, across the groups
        model = _policy(name, False, fused)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    else:
        model = DistributedDataParallel(_policy(name, lora, fused))
    replicas, replica = world // k, rank // k  # the ranks of a group train the same pairs: its slice of the batch
    n = len(PAIR_SETS[pairs])
    share = [i for i in range(n) if i % replicas == replica]
    # a small token budget on one replica: several micro-batches there, one on the other (collectives aligned)
    settings = _step_settings(loss, layout, k, 12 if replica == 0 else 1000, fused)
    metrics = _step(model, _step_batch(loss, pairs).select(share), settings, world, n)
    weight = _watched(model if fsdp else model.module)
    weight = (weight.full_tensor() if isinstance(weight, DTensor) else weight).detach().flatten()[:30].tolist()
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"metrics": metrics, "q": weight, "sp_rank": sp.rank}, f)
    dist.barrier()
    os._exit(0)


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("loss", "layout", "world", "k", "name", "fsdp", "lora", "fused", "pairs"),
    [
        ("sigmoid", "prefix_shared", 4, 2, "llama_gqa", False, False, False, "step"),
        ("sigmoid", "prefix_shared", 4, 2, "llama_gqa", True, False, False, "step"),
        ("kto", "packed", 2, 2, "gemma2", False, False, False, "step"),
        ("sigmoid", "packed", 4, 4, "llama_mha", False, False, False, "step"),  # one group of 4
        ("sigmoid", "packed", 4, 2, "llama_gqa", False, True, False, "step"),  # LoRA adapters, DDP over them
        # the fused head on rows where some ranks hold no completion token: they still give the head a (zero)
        # gradient to reduce (before: DDP failed "did not receive grad", FSDP2 reduce-scattered mismatched sets)
        ("sigmoid", "prefix_shared", 4, 2, "llama_gqa", False, False, True, "long"),
        ("sigmoid", "prefix_shared", 4, 2, "llama_gqa", True, False, True, "long"),
        ("sigmoid", "prefix_shared", 4, 4, "llama_gqa", False, False, True, "long"),
    ],
)
def test_a_train_step_with_sequence_parallel_groups_equals_one_process(
    tmp_path, loss, layout, world, k, name, fsdp, lora, fused, pairs
):
    """One optimizer step under DDP (or FSDP2) over `world` ranks in groups of k (world / k replicas, uneven
    micro-batch counts), with or without LoRA or the fused head: the loss, KTO's z₀, the gradient norm and the
    updated weights of one process on all pairs."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "rank0.json"
    args = (world, k, port, str(out), loss, layout, name, fsdp, lora, fused, pairs)
    mp.spawn(_step_rank, args=args, nprocs=world, join=True)
    got = json.loads(out.read_text())
    model = _policy(name, lora)
    n = len(PAIR_SETS[pairs])
    single = _step(model, _step_batch(loss, pairs), _step_settings(loss, layout, 1, 1000), 1, n)  # unfused, 1 process
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
    expected = _watched(model).detach().flatten()[:30]
    assert float(expected.abs().max()) > 1e-3  # the step moved these weights (LoRA: B from 0)
    assert torch.allclose(torch.tensor(got["q"]), expected, atol=1e-5)


def test_settings_sequence_parallel_cannot_compute_are_refused():
    from dpo_ray.objective.spec import LossSpec
    from dpo_ray.train.step import TrainSettings

    for kw, why in (
        ({"batching": "padded"}, "batching padded"),
        ({"batching": "packed", "loss": LossSpec(name="aot")}, "loss aot"),
    ):
        with pytest.raises(ValueError, match=f"sequence_parallel 2 does not apply {why}"):
            TrainSettings(sequence_parallel=2, **kw)
    TrainSettings(sequence_parallel=2, batching="prefix_shared", fused_head=True)


def test_the_train_config_refuses_what_sequence_parallel_cannot_compute():
    from pipeline.config import ConfigError, load_config

    base = ["train.model=m", "train.batch_size=8", "train.workers.count=4", "train.sequence_parallel=2"]
    assert load_config(None, base).train.sequence_parallel == 2
    assert load_config(None, [*base, "train.batching.fused_head=true"]).train.batching.fused_head
    for extra, why in (
        (["train.workers.count=3", "train.batch_size=9"], "workers.count 3 is not a multiple of it"),
        (["train.batching.mode=padded"], "batching.mode padded"),
        (["train.loss.name=aot"], "loss aot"),
    ):
        with pytest.raises(ConfigError, match=f"sequence_parallel 2: .*{why}"):
            load_config(None, [*base, *extra])


def _family_rank(rank: int, size: int, port: int, out: str, dirs: dict[str, str]) -> None:
    import torch.distributed as dist

    from dpo_ray.compute.attention import enable_segment_attention
    from dpo_ray.compute.layouts import collate_packed, collate_prefix_shared
    from dpo_ray.compute.sequence_parallel import SequenceGroup, sequence_parallel_logps, sum_gradients
    from tests.unit.test_families import _pairs, _perturbed

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    sp = SequenceGroup(None, rank, size)
    results = {}
    for family, path in dirs.items():
        model = enable_segment_attention(_perturbed(path))
        pairs = _pairs(model.config.vocab_size, long=True, seed=11)
        for layout, collate in (("packed", collate_packed), ("prefix_shared", collate_prefix_shared)):
            model.zero_grad(set_to_none=True)
            logps = sequence_parallel_logps(model, collate(pairs), sp)
            per_seq = torch.cat([logps.chosen, logps.rejected])
            (torch.linspace(0.5, 1.5, len(per_seq)) * per_seq).sum().backward()
            sum_gradients(model, sp)
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            results[f"{family}/{layout}"] = {"sums": per_seq.detach(), "grads": grads}
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    os._exit(0)


@pytest.mark.timeout(600)
def test_every_family_and_layout_with_two_ranks_equals_unbatched_eager(tmp_path, family_dirs):
    """k = 2 on every family of dpo_ray.testing.families (their sliding windows of 8 and Gemma-2's softcaps,
    sequences past the window; one key-value head repeated for both ranks where the family has one), packed
    and prefix-shared: each sequence's summed log-prob and every parameter's gradient of a weighted sum of them
    against plain unbatched forwards with the model's eager attention (test_families' independent computation),
    within the float32 bounds of tests/numerics.py (the two ranks' partial gradients add one more rounding)."""
    import torch.multiprocessing as mp

    from dpo_ray.testing.families import FAMILIES
    from tests.numerics import GRADS, LOGPS, assert_close_to_scale
    from tests.unit.test_families import _pairs, _perturbed, _unbatched, _weighted_grads

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "rank0.pt"
    dirs = {name: str(path) for name, path in family_dirs.items()}
    mp.spawn(_family_rank, args=(2, port, str(out), dirs), nprocs=2, join=True)
    got = torch.load(out)
    assert set(got) == {f"{f}/{layout}" for f in FAMILIES for layout in ("packed", "prefix_shared")}
    for family, path in dirs.items():
        eager = _perturbed(path)
        eager.set_attn_implementation("eager")
        pairs = _pairs(eager.config.vocab_size, long=True, seed=11)
        with torch.no_grad():
            want_sums = torch.stack([lp.sum() for lp in _unbatched(eager, pairs)])
        want_grads = _weighted_grads(eager, _unbatched(eager, pairs))
        for layout in ("packed", "prefix_shared"):
            what = f"{family}/{layout}"
            assert_close_to_scale(got[what]["sums"], want_sums, LOGPS, what)
            assert got[what]["grads"].keys() == want_grads.keys(), what
            for name, g in want_grads.items():
                assert_close_to_scale(got[what]["grads"][name], g, GRADS, f"{what}: {name}")


def test_the_pre_training_check_cuts_long_pairs_to_what_eager_attention_holds():
    """The check's unbatched eager forwards hold [heads x T x T] scores: its pairs are the longest, cut to
    check_tokens(config) tokens (the prompt's end kept), so a 32k-token pair is checked on its first part."""
    import types

    import numpy as np

    from dpo_ray.train.loop import CHECK_SCORE_BYTES, _check_pairs, check_tokens

    assert check_tokens(types.SimpleNamespace(num_attention_heads=4)) == 8192
    assert check_tokens(types.SimpleNamespace(num_attention_heads=32)) == 2896
    assert check_tokens(types.SimpleNamespace(num_attention_heads=32, sliding_window=4096)) == 4160  # crosses it
    assert check_tokens(types.SimpleNamespace(num_attention_heads=4, sliding_window=512)) == 8192
    phi = types.SimpleNamespace(num_attention_heads=24, sliding_window=262_144, max_position_embeddings=131_072)
    assert check_tokens(phi) == 3344  # a window past the positions is no window: the memory bound holds
    assert 32 * 2896**2 * 4 <= CHECK_SCORE_BYTES < 32 * 2897**2 * 4

    def column(lists):
        out = np.empty(len(lists), dtype=object)
        out[:] = [np.asarray(x) for x in lists]
        return out

    prompts = [list(range(100)), list(range(30)), list(range(5))]
    chosen, rejected = [list(range(1000, 1003)), [7] * 90, [8] * 2], [[9] * 4, [6] * 50, [5] * 40]
    columns = {
        "pair_id": np.array(["a", "b", "c"]), "prompt_ids": column(prompts), "chosen_ids": column(chosen),
        "rejected_ids": column(rejected), "ref_chosen_logp": np.zeros(3), "ref_rejected_logp": np.zeros(3),
    }  # fmt: skip
    whole = _check_pairs(columns, k=2)
    assert [len(p.prompt_ids) for p in whole] == [100, 30]  # the two longest, in base order
    cut = _check_pairs(columns, k=2, max_tokens=64)
    assert cut[0].prompt_ids == list(range(40, 100)) and cut[0].rejected_ids == [9] * 4  # the prompt: its end
    assert cut[1].prompt_ids == list(range(30)) and cut[1].chosen_ids == [7] * 34 and cut[1].rejected_ids == [6] * 34
    assert all(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) <= 64 for p in cut)
