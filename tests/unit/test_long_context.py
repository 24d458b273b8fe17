"""The long-context test set (dpo_ray.testing.long_context): HH-RLHF dialogs joined into conversations of 8k-32k
tokens of the tiny tokenizer, each a valid HH record (chosen and rejected share everything up to the last
Assistant turn) within its target length."""

from __future__ import annotations

import pytest

from tests.conftest import HH_SAMPLE

TARGETS = [8_000, 16_000, 32_000]


@pytest.mark.skipif(not HH_SAMPLE.exists(), reason=f"HH-RLHF sample not present at {HH_SAMPLE}")
def test_long_conversations_reach_their_targets_as_hh_records(tiny_model_dir):
    from dpo_ray.models.loading import load_tokenizer
    from dpo_ray.testing.long_context import long_conversations, read_hh

    tok = load_tokenizer(str(tiny_model_dir))
    dialogs = read_hh(HH_SAMPLE)

    def count(text: str) -> int:
        return len(tok(text).input_ids)

    records = long_conversations(dialogs, count, TARGETS, seed=0)
    longest_dialog = max(count(d["chosen"]) for d in dialogs)
    for target, r in zip(TARGETS, records, strict=True):
        assert r["tokens"] == max(count(r["chosen"]), count(r["rejected"]))
        # within the target, and short of it by less than the dialog that did not fit
        assert target - longest_dialog < r["tokens"] <= target, (target, r["tokens"])
        *joined, last = r["dialogs"]
        assert len(set(r["dialogs"])) == len(r["dialogs"]) and len(joined) >= 10
        context = "".join(dialogs[i]["chosen"] for i in joined)
        assert r["chosen"] == context + dialogs[last]["chosen"]
        assert r["rejected"] == context + dialogs[last]["rejected"]
        # HH's implicit format: the pair's shared prompt ends at the last Assistant turn, after the context
        cut = r["chosen"].rindex("\n\nAssistant:")
        assert cut > len(context) and r["rejected"].startswith(r["chosen"][:cut])
        assert r["chosen"].count("\n\nHuman:") >= len(joined) + 1
    again = long_conversations(dialogs, count, TARGETS, seed=0)
    assert [r["dialogs"] for r in again] == [r["dialogs"] for r in records]  # seeded: the same set
    assert long_conversations(dialogs, count, TARGETS, seed=1)[0]["dialogs"] != records[0]["dialogs"]
    with pytest.raises(ValueError, match="below one dialog"):
        long_conversations(dialogs, count, [5])


@pytest.mark.skipif(not HH_SAMPLE.exists(), reason=f"HH-RLHF sample not present at {HH_SAMPLE}")
def test_the_command_writes_hh_records_between_the_bounds(tiny_model_dir, tmp_path, capsys):
    import json

    from dpo_ray.models.loading import load_tokenizer
    from dpo_ray.testing.long_context import main

    out = tmp_path / "long.jsonl"
    main(["--hh", str(HH_SAMPLE), "--tokenizer", str(tiny_model_dir), "--count", "3", "--min-tokens", "3000",
          "--max-tokens", "6000", "--out", str(out)])  # fmt: skip
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    tok = load_tokenizer(str(tiny_model_dir))
    lengths = [len(tok(r["chosen"]).input_ids) for r in rows]
    assert len(rows) == 3 and set(rows[0]) == {"chosen", "rejected"}
    assert all(2000 < n <= 6000 for n in lengths), lengths  # within the bounds, short of the least by < a dialog
    assert "wrote 3 conversations" in capsys.readouterr().out
