"""Model-family conformance: for every family of dpo_ray.testing.families and every batching mode, per-token
completion log-probs and their gradients equal a plain unbatched forward of each sequence with the
model's eager attention (within float32 rounding relative to their scale: tests/numerics.py), for sequences
shorter and longer than the sliding window.

The independent computation is transformers' own eager attention, one sequence at a time, no padding.
Guards show the data exercise the features: dropping the window or the softcap changes the result.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch

from dpo_ray.compute.attention import enable_segment_attention
from dpo_ray.compute.batching import BATCHING, PairTokens, collate_padded
from dpo_ray.compute.layouts import collate_packed, collate_prefix_shared, segment_token_logps
from dpo_ray.compute.logps import token_logps
from dpo_ray.models.loading import exact_attention, load_causal_lm
from dpo_ray.testing.families import FAMILIES
from tests.numerics import GRADS, LOGPS, assert_close_to_scale, relative_error

WINDOW = 8


def _pairs(vocab: int, long: bool, seed: int) -> list[PairTokens]:
    """Short: every sequence within the window. Long: prompts and completions past it."""
    rng = random.Random(seed)
    lo, hi = (1, 3) if not long else (9, 22)

    def ids(n: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(n)]

    return [PairTokens(ids(rng.randint(lo, hi)), ids(rng.randint(1, hi)), ids(rng.randint(1, hi))) for _ in range(4)]


def _perturbed(model_dir) -> torch.nn.Module:
    """The family's model with larger weights than its init, so attention patterns (and softcapping) matter."""
    model = load_causal_lm(model_dir)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.15)
    return model


def _unbatched(model: torch.nn.Module, pairs: list[PairTokens]) -> list[torch.Tensor]:
    """Per-token completion log-probs of chosen sequences, then rejected ones, one forward per sequence."""
    out = []
    for side in (0, 1):
        for p in pairs:
            completion = p.chosen_ids if side == 0 else p.rejected_ids
            ids = torch.tensor([[*p.prompt_ids, *completion]])
            lp = token_logps(model(input_ids=ids, use_cache=False).logits, ids)[0]
            out.append(lp[len(p.prompt_ids) :])
    return out


def _batched(model: torch.nn.Module, pairs: list[PairTokens], mode: str, pad: int) -> list[torch.Tensor]:
    if mode == "padded":
        batch = collate_padded(pairs, pad)
        lp = token_logps(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, batch.input_ids)
        return [lp[row][batch.completion_mask[row]] for row in range(2 * len(pairs))]
    batch = (collate_packed if mode == "packed" else collate_prefix_shared)(pairs)
    per_token = segment_token_logps(model, batch)
    return [per_token[batch.seq == s] for s in range(2 * len(pairs))]


def _weighted_grads(model: torch.nn.Module, per_seq: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every parameter's gradient of Σ_i w_i · (sequence i's summed log-prob), w from 0.5 to 1.5 (distinct)."""
    weights = torch.linspace(0.5, 1.5, len(per_seq), device=per_seq[0].device)
    model.zero_grad(set_to_none=True)
    sum(w * s.sum() for w, s in zip(weights, per_seq, strict=True)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(
    got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str, bound: float = GRADS
) -> None:
    """Every parameter's gradient within `bound` of want's, relative to its norm (tests/numerics.py)."""
    assert got.keys() == want.keys(), what
    for name, g in want.items():
        assert_close_to_scale(got[name], g, bound, f"{what}: {name}")


@pytest.fixture(scope="module")
def prepared(family_dirs):
    """family → (eager reference model, {mode: model as training runs it})."""
    out = {}
    for name, path in family_dirs.items():
        base = _perturbed(path)
        eager = copy.deepcopy(base)
        eager.set_attn_implementation("eager")
        segments = enable_segment_attention(copy.deepcopy(base))
        out[name] = (eager, {"padded": base, "packed": segments, "prefix_shared": segments})
    return out


@pytest.mark.parametrize("long", [False, True], ids=["within-window", "past-window"])
@pytest.mark.parametrize("mode", BATCHING)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_log_probs_equal_unbatched_eager(prepared, family: str, mode: str, long: bool) -> None:
    eager, models = prepared[family]
    pairs = _pairs(eager.config.vocab_size, long, seed=7 + long)
    with torch.no_grad():
        want = _unbatched(eager, pairs)
        got = _batched(models[mode], pairs, mode, pad=0)
    for i, (w, g) in enumerate(zip(want, got, strict=True)):
        assert_close_to_scale(g, w, LOGPS, f"{family}/{mode} sequence {i}")


@pytest.mark.parametrize("mode", BATCHING)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_gradients_equal_unbatched_eager(prepared, family: str, mode: str) -> None:
    eager, models = prepared[family]
    model = models[mode]
    pairs = _pairs(eager.config.vocab_size, long=True, seed=11)
    want = _weighted_grads(eager, _unbatched(eager, pairs))
    _assert_same_grads(_weighted_grads(model, _batched(model, pairs, mode, pad=0)), want, f"{family}/{mode}")


def _register_dropping(*names: str) -> str:
    """An attention function that forwards to segment attention without the given arguments (the old bug)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    from dpo_ray.compute.attention import segment_attention

    def dropping(*args, **kwargs):
        for n in names:
            kwargs.pop(n, None)
        return segment_attention(*args, **kwargs)

    key = "dpo_test_drop_" + "_".join(names)
    AttentionInterface.register(key, dropping)
    ALL_MASK_ATTENTION_FUNCTIONS.register(key, sdpa_mask)
    return key


@pytest.mark.parametrize("family", [f for f, spec in FAMILIES.items() if spec.windowed or spec.softcap])
def test_the_features_matter(prepared, family: str) -> None:
    """Guard: ignoring the window (or the softcap) gives wrong log-probs on these inputs, so the tests above
    would fail if the modes ignored them (the per-block attention of an earlier version did)."""
    eager, models = prepared[family]
    pairs = _pairs(eager.config.vocab_size, long=True, seed=7)
    spec = FAMILIES[family]
    model = copy.deepcopy(models["packed"])
    model.set_attn_implementation(_register_dropping("sliding_window", "softcap"))
    with torch.no_grad():
        want = torch.cat(_unbatched(eager, pairs))
        wrong = torch.cat(_batched(model, pairs, "packed", pad=0))
    assert (wrong - want).abs().max() > 1e-3
    assert relative_error(wrong, want) > 10 * LOGPS  # far outside float32 rounding (tests/numerics.py)
    if spec.softcap:  # transformers' own SDPA path drops the softcap too: the padded mode must not use it
        assert exact_attention(eager.config) == "eager"
        sdpa = copy.deepcopy(models["padded"])
        sdpa.set_attn_implementation("sdpa")
        with torch.no_grad():
            dropped = torch.cat(_batched(sdpa, pairs, "padded", pad=0))
        assert (dropped - want).abs().max() > 1e-3
        assert relative_error(dropped, want) > 10 * LOGPS


def test_every_family_builds_with_its_conventions(family_dirs) -> None:
    from dpo_ray.models.loading import load_tokenizer

    for name, spec in FAMILIES.items():
        tok = load_tokenizer(family_dirs[name])
        encoded = tok("hello there").input_ids
        assert (encoded[0] == tok.bos_token_id) == (spec.bos is not None and spec.add_bos), name
        assert tok.eos_token == spec.eos
        assert (tok.chat_template is not None) == (spec.chat_template is not None)
        layer_types = getattr(load_causal_lm(family_dirs[name]).config, "layer_types", None) or []
        if spec.windowed and layer_types:
            assert "sliding_attention" in layer_types
        if name.startswith("gemma"):  # alternating local and global layers
            assert "full_attention" in layer_types


def test_unknown_attention_arguments_are_refused(prepared) -> None:
    """An attention argument the padding-free modes do not implement (e.g. attention sinks) is an error."""
    from dpo_ray.compute.attention import UnsupportedAttention, segment_attention
    from dpo_ray.compute.layouts import Block

    module = prepared["llama3"][1]["packed"].model.layers[0].self_attn
    q = torch.randn(1, 2, 4, 32)
    k = v = torch.randn(1, 1, 4, 32)
    blocks = (Block(0, 4),)
    with pytest.raises(UnsupportedAttention, match="s_aux"):
        segment_attention(module, q, k, v, None, dpo_blocks=blocks, s_aux=torch.zeros(2))
    with pytest.raises(UnsupportedAttention, match="non-causal"):
        segment_attention(module, q, k, v, None, dpo_blocks=blocks, is_causal=False)
    out, _ = segment_attention(module, q, k, v, None, dpo_blocks=blocks, position_ids=None, use_cache=False)
    assert out.shape == (1, 4, 2, 32)


def test_unsupported_config_features_are_named() -> None:
    from types import SimpleNamespace

    from dpo_ray.compute.attention import unsupported_features

    assert unsupported_features(SimpleNamespace(sliding_window=8, attn_logit_softcapping=50.0)) == []
    assert unsupported_features(SimpleNamespace(use_bidirectional_attention=True)) == [
        "bidirectional attention (use_bidirectional_attention)"
    ]


@pytest.mark.parametrize("mode", ["packed", "prefix_shared"])
def test_the_pre_training_check_catches_a_mode_that_ignores_the_window(prepared, mode: str) -> None:
    """train_loop.batching_mismatch compares the train forward with unbatched eager forwards before any step:
    silent for the real attention, a named refusal for one that drops the sliding window (the old bug)."""
    from dpo_ray.train.preflight import batching_mismatch
    from dpo_ray.train.step import TrainSettings

    eager, models = prepared["mistral"]
    pairs = _pairs(eager.config.vocab_size, long=True, seed=3)
    settings = TrainSettings(batching=mode)
    assert batching_mismatch(models[mode], pairs, settings) is None
    broken = copy.deepcopy(models[mode])
    broken.set_attn_implementation(_register_dropping("sliding_window"))
    message = batching_mismatch(broken, pairs, settings)
    assert message is not None and f"batching {mode!r} is not exact" in message and "padded" in message
    assert broken.config._attn_implementation.startswith("dpo_test_drop")  # restored after the eager pass


def test_train_refuses_a_known_unsupported_feature_before_any_work(family_dirs, tmp_path) -> None:
    """A config feature the padding-free modes cannot reproduce: an explicit mode is refused naming it,
    auto falls back to padded."""
    import json
    import shutil

    from pipeline.config import ConfigError, TrainConfig
    from pipeline.stages.train import _batching

    model = tmp_path / "gemma3-bidirectional"
    shutil.copytree(family_dirs["gemma3"], model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "use_bidirectional_attention": True}))

    def cfg(model_dir: object, **batching: object) -> TrainConfig:
        return TrainConfig.model_validate({"model": str(model_dir), "batching": batching, "workers": {"use_gpu": True}})

    with pytest.raises(ConfigError, match="batching.mode 'packed' cannot apply gemma3_text bidirectional attention"):
        _batching(cfg(model, mode="packed"))
    assert _batching(cfg(model, mode="auto")) == ("padded", "blocks")
    with pytest.raises(ConfigError, match="attention 'flex' needs a padding-free batching mode.*bidirectional"):
        _batching(cfg(model, mode="auto", attention="flex"))
    # Failed before: auto fell back to padded and the fused head was silently not used (tokens x vocab logits).
    with pytest.raises(
        ConfigError, match="train.batching.fused_head needs a padding-free batching mode.*bidirectional"
    ):
        _batching(cfg(model, mode="auto", fused_head=True))
    assert _batching(cfg(family_dirs["gemma2"], mode="auto")) == ("packed", "blocks")


def test_fsdp_finds_every_familys_decoder_layers(prepared) -> None:
    from dpo_ray.train.parallel import decoder_layers

    for name, (eager, _) in prepared.items():
        layers = decoder_layers(eager)
        n = getattr(eager.config, "num_hidden_layers", None) or eager.config.n_layer
        assert len(layers) == n, name
        assert len({type(m).__name__ for m in layers}) == 1


@pytest.mark.parametrize("family", list(FAMILIES))
def test_completion_logps_with_logits_to_keep_equal_unbatched_eager(prepared, family: str) -> None:
    """completion_logps (the reference's transformers backend, the parity gate, the pre-training check) asks
    each family's own forward for the logits of its last positions only (logits_to_keep): per-token log-probs
    as a plain forward of each sequence with every logit."""
    from dpo_ray.compute.batching import completion_logps

    eager, models = prepared[family]
    pairs = _pairs(eager.config.vocab_size, long=True, seed=5)
    prompts, completions = (
        [p.prompt_ids for p in pairs] * 2,
        [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs],
    )
    with torch.no_grad():
        want = _unbatched(eager, pairs)
    got = completion_logps(models["padded"], prompts, completions, pad_token_id=0, token_budget=10_000)
    for i, (w, g) in enumerate(zip(want, got, strict=True)):
        assert_close_to_scale(torch.tensor(g, dtype=torch.float32), w, LOGPS, f"{family} sequence {i}")
