"""The tokenization rule and record → pair conversion, one reject reason at a time (no Ray)."""

from __future__ import annotations

import pytest

from dpo_ray.models import load_tokenizer
from dpo_ray.tokenization import REASONS, PairTokenizer, RowRejected, pair_id, record_to_pair, split_of

COLS = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def pt(tok):
    return PairTokenizer(tok, max_length=64, max_prompt_length=32, truncation="keep_end")


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
    a = pair_id("p", "c", "r")
    assert a == pair_id("p", "c", "r") and a != pair_id("p", "r", "c") and len(a) == 32
    ids = [pair_id(str(i), "c", "r") for i in range(4000)]
    frac = sum(split_of(i, 0.1) == "eval" for i in ids) / len(ids)
    assert 0.08 < frac < 0.12
    assert all(split_of(i, 0.0) == "train" for i in ids)
