"""The tokenization rule and record → pair conversion, one reject reason at a time (no Ray)."""

from __future__ import annotations

import random

import pytest

from dpo_ray.data.tokenization import REASONS, PairTokenizer, RowRejected, pair_id, prompt_id, record_to_pair, split_of
from dpo_ray.models.loading import load_tokenizer

COLS = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}


def _reason(record, pt, fmt="auto") -> str:
    with pytest.raises(RowRejected) as e:
        record_to_pair(record, pt, COLS, fmt)
    return e.value.reason


def test_explicit_bos_once_eos_once(pt, tok):
    p = record_to_pair({"prompt": "Human: hi Assistant:", "chosen": " good movie", "rejected": " bad"}, pt, COLS)
    assert p.prompt_ids[0] == tok.bos_token_id and p.prompt_ids.count(tok.bos_token_id) == 1
    for ids in (p.chosen_ids, p.rejected_ids):
        assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1
        assert tok.bos_token_id not in ids
    assert tok.decode(p.prompt_ids, skip_special_tokens=True) == "Human: hi Assistant:"
    assert tok.decode(p.chosen_ids, skip_special_tokens=True) == " good movie"
    # Special tokens already in the text are not doubled.
    q = record_to_pair({"prompt": "<s>hello", "chosen": "yes</s>", "rejected": "no"}, pt, COLS)
    assert q.prompt_ids.count(tok.bos_token_id) == 1 and q.chosen_ids.count(tok.eos_token_id) == 1


def test_implicit_hh_prompt(pt):
    chosen = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: How are you?\n\nAssistant: Fine, thanks."
    rejected = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: How are you?\n\nAssistant: Go away."
    p = record_to_pair({"chosen": chosen, "rejected": rejected}, pt, COLS)
    assert p.prompt == "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: How are you?\n\nAssistant:"
    assert (p.chosen, p.rejected) == (" Fine, thanks.", " Go away.")
    # Completions sharing their first words: the prompt still ends at the last marker.
    q = record_to_pair(
        {"chosen": "\n\nHuman: x\n\nAssistant: I do", "rejected": "\n\nHuman: x\n\nAssistant: I don't"}, pt, COLS
    )
    assert q.prompt.endswith("Assistant:") and q.chosen == " I do"
    assert _reason({"chosen": "Human: a", "rejected": "Robot: b"}, pt) == "no_shared_prefix"


def test_conversational_with_and_without_prompt(pt, tok):
    convo = [{"role": "user", "content": "hi"}]
    a = record_to_pair(
        {
            "chosen": [*convo, {"role": "assistant", "content": "hello"}],
            "rejected": [*convo, {"role": "assistant", "content": "go"}],
        },
        pt,
        COLS,
    )
    b = record_to_pair(
        {
            "prompt": convo,
            "chosen": [{"role": "assistant", "content": "hello"}],
            "rejected": [{"role": "assistant", "content": "go"}],
        },
        pt,
        COLS,
    )
    assert a == b
    assert a.prompt == "<|user|>hi\n<|assistant|>" and a.chosen == "hello\n"
    assert a.prompt_ids == pt.prompt_ids("<|user|>hi\n<|assistant|>")
    assert a.chosen_ids[-1] == tok.eos_token_id
    bad = {
        "chosen": [*convo, {"role": "assistant", "content": "x"}],
        "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "y"}],
    }
    assert _reason(bad, pt) == "no_shared_prefix"
    assert (
        _reason(
            {
                "prompt": convo,
                "chosen": [{"role": "user", "content": "x"}],
                "rejected": [{"role": "assistant", "content": "y"}],
            },
            pt,
        )
        == "wrong_type"
    )
    assert (
        _reason(
            {"prompt": convo, "chosen": [{"content": "x"}], "rejected": [{"role": "assistant", "content": "y"}]}, pt
        )
        == "wrong_type"
    )


def test_chat_prefix_mismatch(tok):
    # A template whose generation prompt is not what the conversation renders: prefix mismatch.
    other = load_tokenizer(tok.name_or_path)
    other.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]: {% endif %}"
    )
    pt2 = PairTokenizer(other, 64, 32)
    rec = {
        "prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "a"}],
        "rejected": [{"role": "assistant", "content": "b"}],
    }
    assert _reason(rec, pt2) == "chat_prefix_mismatch"
    other.chat_template = None
    assert _reason(rec, PairTokenizer(other, 64, 32)) == "no_chat_template"


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ([1, 2], "not_an_object"),
        ({"prompt": "p", "chosen": "c"}, "missing_field"),
        ({"prompt": "p", "chosen": None, "rejected": "r"}, "missing_field"),
        ({"prompt": "p", "chosen": 5, "rejected": "r"}, "wrong_type"),
        ({"prompt": "p", "chosen": {"a": [1]}, "rejected": "r"}, "wrong_type"),
        ({"prompt": "  ", "chosen": "c", "rejected": "r"}, "empty_prompt"),
        ({"prompt": "p", "chosen": "", "rejected": "r"}, "empty_completion"),
        ({"prompt": "p", "chosen": "same", "rejected": "same"}, "identical_completions"),
        ({"prompt": "p", "chosen": "c\ud800", "rejected": "r"}, "undecodable_text"),
        ({"prompt": "p", "chosen": "x" * 2000, "rejected": "r"}, "text_too_long"),
    ],
)
def test_reject_reasons(tok, record, reason):
    pt = PairTokenizer(tok, 64, 32, max_text_chars=1000)
    assert _reason(record, pt) == reason
    assert reason in REASONS


def test_explicit_format_declared_without_prompt(pt):
    assert _reason({"chosen": "a", "rejected": "b"}, pt, fmt="explicit") == "missing_field"


def test_truncation_modes(tok):
    prompt = " ".join(["the movie was great"] * 20)
    long_completion = " ".join(["really good"] * 40)
    rec = {"prompt": prompt, "chosen": long_completion, "rejected": "bad"}
    full = PairTokenizer(tok, 10_000, 9_000).pair(prompt, long_completion, "bad")
    start = record_to_pair(rec, PairTokenizer(tok, 40, 16, "keep_start"), COLS)
    end = record_to_pair(rec, PairTokenizer(tok, 40, 16, "keep_end"), COLS)
    assert start.prompt_ids == full.prompt_ids[:16]
    assert end.prompt_ids == [tok.bos_token_id, *full.prompt_ids[-15:]]
    for p in (start, end):
        assert p.truncated == {"prompt": True, "chosen": True, "rejected": False}
        assert len(p.prompt_ids) + len(p.chosen_ids) == 40
        assert p.chosen_ids[-1] != tok.eos_token_id  # cut short: no EOS
        assert p.rejected_ids == full.rejected_ids and p.rejected_ids[-1] == tok.eos_token_id
        assert p.chosen == long_completion  # text stays whole; the ids say what is trained on
    assert _reason(rec, PairTokenizer(tok, 40, 16, "drop")) == "too_long"
    with pytest.raises(ValueError, match="max_prompt_length"):
        PairTokenizer(tok, 16, 16)


def test_pair_id_and_split_are_deterministic():
    """Ids and splits are content hashes, the same in every process and on every machine (a salted hash() would
    differ between processes): checked against sha256 written out here and against literals, not against a
    second call of the same function (as it used to be)."""
    import hashlib
    import json

    a = pair_id("p", "c", "r")
    assert a == hashlib.sha256(json.dumps(["p", "c", "r"]).encode()).hexdigest()[:32]
    assert a == "e627a5b65f0c2071733ac845292f4600"
    assert a != pair_id("p", "r", "c")
    assert prompt_id("p") == hashlib.sha256(json.dumps(["p", "", ""]).encode()).hexdigest()[:32]
    prompts = [f"prompt {i}" for i in range(4000)]
    frac = sum(split_of(p, 0.1) == "eval" for p in prompts) / len(prompts)
    assert 0.08 < frac < 0.12
    assert all(split_of(p, 0.0) == "train" for p in prompts)
    assert [i for i in range(40) if split_of(f"prompt {i}", 0.1) == "eval"] == [15, 20, 30, 38]


# ---- the rule across model families (dpo_ray.testing.families) ------------------------------------------------------

_FAMILY_TEXT_ROWS = [
    ("Human: what is a good movie?\n\nAssistant:", " I liked the plot a lot.", " The story was boring."),
    ("Human: say something nice \n\nAssistant: ", "I think you are great.", "No."),  # prompt ends in a space
    ("The film was", " great", " terrible fun and not quite good"),
]


def _family_tokenizer(family_dirs, name: str):
    from dpo_ray.data.tokenization import PairTokenizer
    from dpo_ray.models.loading import load_tokenizer

    tok = load_tokenizer(family_dirs[name])
    return tok, PairTokenizer(tok, max_length=4096, max_prompt_length=2048)


@pytest.mark.parametrize("family", ["llama3", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3"])
def test_chat_completions_end_with_the_templates_end_of_turn_exactly_once(family_dirs, family):
    """400 conversations: every completion ends with the family's end-of-turn token once and nothing after it
    (ChatML's "\\n" and Phi-3's trailing EOS are cut), BOS appears once where the family uses one, and prompt +
    completion is the rendered conversation's tokens up to that end of turn."""
    from dpo_ray.data.tokenization import record_to_pair
    from dpo_ray.testing.families import FAMILIES

    spec = FAMILIES[family]
    tok, pt = _family_tokenizer(family_dirs, family)
    stop = tok.convert_tokens_to_ids(spec.end_of_turn)
    assert pt.end_of_turn == stop
    rng = random.Random(0)
    words = "the movie was great boring fun I like it not really story actor music".split()
    ok = 0
    for i in range(400):

        def say(n: int) -> str:
            return " ".join(rng.choice(words) for _ in range(n))

        prompt = [{"role": "user", "content": say(rng.randint(1, 12))}]
        record = {
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": say(rng.randint(1, 12))}],
            "rejected": [{"role": "assistant", "content": say(rng.randint(1, 12)) + f" {i}"}],
        }
        p = record_to_pair(record, pt, {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"})
        for completion, msgs in ((p.chosen_ids, record["chosen"]), (p.rejected_ids, record["rejected"])):
            ok += completion[-1] == stop and completion.count(stop) == 1
            full = tok.apply_chat_template(prompt + msgs, tokenize=False)
            whole = tok(full, add_special_tokens=False).input_ids
            if spec.bos is not None and whole[:1] != [tok.bos_token_id]:
                whole = [tok.bos_token_id, *whole]
            assert [*p.prompt_ids, *completion] == whole[: len(p.prompt_ids) + len(completion)]
        if spec.bos is not None:
            assert p.prompt_ids[0] == tok.bos_token_id and p.prompt_ids.count(tok.bos_token_id) == 1
    assert ok == 800


@pytest.mark.parametrize("family", ["llama3", "qwen2", "mistral", "gemma2", "phi3", "gpt2"])
def test_text_pairs_are_the_whole_texts_tokens_after_the_prompt(family_dirs, family):
    """Text data: prompt + completion (without the final EOS) is the tokenization of the whole text, so a
    Metaspace tokenizer adds no "▁" the completion text lacks; a prompt ending in a space merges with the
    completion and is counted as a boundary merge (its lone space token moves into the completion)."""
    tok, pt = _family_tokenizer(family_dirs, family)
    merges = 0
    for prompt, chosen, rejected in _FAMILY_TEXT_ROWS:
        p = pt.pair(prompt, chosen, rejected)
        for text, completion in ((chosen, p.chosen_ids), (rejected, p.rejected_ids)):
            assert completion[-1] == tok.eos_token_id and completion.count(tok.eos_token_id) == 1
            whole = pt.prompt_ids(prompt + text)
            assert [*p.prompt_ids, *completion[:-1]] == whole
        assert p.prompt_ids == pt.prompt_ids(prompt)[: len(p.prompt_ids)]
        merges += p.boundary_merge
    assert merges >= 1


@pytest.mark.parametrize("family", ["gpt2", "mistral", "llama3"])
def test_text_pairs_match_trl(family_dirs, family, tmp_path):
    """The same rows through TRL 1.16's DPOTrainer preprocessing give the same prompt/chosen/rejected ids."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from dpo_ray.models.loading import load_causal_lm

    tok, pt = _family_tokenizer(family_dirs, family)
    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in _FAMILY_TEXT_ROWS]
    args = DPOConfig(output_dir=str(tmp_path), report_to=[], max_length=None, use_cpu=True)
    trainer = DPOTrainer(
        model=load_causal_lm(family_dirs[family]),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
    )
    for row, trl_row in zip(rows, trainer.train_dataset, strict=True):
        ours = pt.pair(row["prompt"], row["chosen"], row["rejected"])
        assert (ours.prompt_ids, ours.chosen_ids, ours.rejected_ids) == (
            trl_row["prompt_ids"],
            trl_row["chosen_ids"],
            trl_row["rejected_ids"],
        ), row


def test_the_data_howto_lists_every_reject_reason():
    from pathlib import Path

    howto = (Path(__file__).resolve().parents[2] / "docs" / "howto" / "own-model-and-data.md").read_text()
    assert [r for r in REASONS if f"`{r}`" not in howto] == []


def test_a_null_prompt_column_takes_the_shared_messages_as_the_prompt(pt):
    """UltraFeedback-binarized rows: `prompt` is a plain string, chosen/rejected are whole conversations that
    contain it. With columns.prompt null the string is ignored and the shared user turn is the prompt; with
    the default column the string is not a message list and the row is rejected."""
    convo = [{"role": "user", "content": "hi"}]
    row = {
        "prompt": "hi",
        "chosen": [*convo, {"role": "assistant", "content": "hello"}],
        "rejected": [*convo, {"role": "assistant", "content": "go"}],
    }
    p = record_to_pair(row, pt, {**COLS, "prompt": None}, "conversational")
    q = record_to_pair({k: v for k, v in row.items() if k != "prompt"}, pt, COLS, "conversational")
    assert p == q and p.prompt == "<|user|>hi\n<|assistant|>"
    assert _reason(row, pt, "conversational") == "wrong_type"


@pytest.mark.parametrize("family", ["llama3", "qwen2", "mistral", "gemma2", "phi3", "gpt2"])
def test_batched_records_equal_record_by_record(family_dirs, family):
    """records_to_pairs (the batch's texts encoded in one tokenizer call, as prepare runs) gives record_to_pair's
    result for every record: the same ids, truncation flags and boundary merges, and the same reject reasons."""
    from dpo_ray.data.tokenization import record_to_pair, records_to_pairs
    from dpo_ray.models.loading import load_tokenizer

    tok = load_tokenizer(family_dirs[family])
    rng = random.Random(family)
    words = "the movie was great boring fun I like it not really story actor music é ü 映画".split()

    def say(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    records: list = []
    for i in range(60):
        p, c, r = say(rng.randint(1, 30)), say(rng.randint(1, 20)), say(rng.randint(1, 20)) + f" {i}"
        records += [
            {"prompt": f"Human: {p}\n\nAssistant:", "chosen": f" {c}", "rejected": f" {r}"},
            {"chosen": f"Human: {p}\n\nAssistant: {c}", "rejected": f"Human: {p}\n\nAssistant: {r}"},
            {"prompt": f"{p} ", "chosen": c, "rejected": r},  # a boundary merge where the tokenizer has one
            {
                "prompt": [{"role": "user", "content": p}],
                "chosen": [{"role": "assistant", "content": c}],
                "rejected": [{"role": "assistant", "content": r}],
            },
        ]
    records += [
        {"prompt": "x", "chosen": "same", "rejected": "same"},
        {"prompt": " ", "chosen": "a", "rejected": "b"},
        {"chosen": "no prompt here"},
        ["not", "a", "mapping"],
        records[0],  # the same texts twice in one batch
    ]
    rng.shuffle(records)
    kinds = set()
    for pt in (
        PairTokenizer(tok, 4096, 2048),
        PairTokenizer(tok, 24, 12, "keep_end"),
        PairTokenizer(tok, 24, 12, "drop"),
    ):
        batched = records_to_pairs(records, pt, COLS)
        assert len(batched) == len(records)
        for record, got in zip(records, batched, strict=True):
            try:
                want = record_to_pair(record, pt, COLS)
            except RowRejected as e:
                assert isinstance(got, RowRejected), (record, got)
                assert (got.reason, got.detail) == (e.reason, e.detail)
                kinds.add(e.reason)
                continue
            assert got == want, record
            kinds.add("pair")
    assert {"pair", "identical_completions", "too_long", "empty_prompt"} <= kinds


def test_common_prefix_length_equals_a_plain_scan():
    """The binary search over prefix equality against an element-by-element scan, on lists and strings of
    every length relation (equal, one a prefix of the other, empty, differing at any position)."""
    from dpo_ray.data.tokenization import common_prefix_length

    def scan(a, b) -> int:
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    rng = random.Random(7)
    for _ in range(5000):
        a = [rng.randint(0, 2) for _ in range(rng.randint(0, 40))]
        b = a[: rng.randint(0, len(a))] + [rng.randint(0, 2) for _ in range(rng.randint(0, 6))]
        for x, y in ((a, b), (b, a), ("".join(map(str, a)), "".join(map(str, b)))):
            assert common_prefix_length(x, y) == scan(x, y)
