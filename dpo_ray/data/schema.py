"""Arrow schemas of every artifact (docs/explanation/architecture.md, "Artifacts: the contract between
stages"). Bump SCHEMA_VERSION on any change to a kind's columns (a new kind leaves the others readable).
KIND_DOCS and COLUMN_DOCS say what each holds
(docs/reference/artifacts.md is generated from them).

List columns are plain Arrow `list<int32>` / `list<float32>`, never Ray's tensor extension types: every
writer casts to these schemas explicitly, and readers check them with `check_columns`.
"""

from __future__ import annotations

import pyarrow as pa

__all__ = [
    "COLUMN_DOCS",
    "GENERATIONS_SCHEMA",
    "KINDS",
    "KIND_DOCS",
    "PAIRS_SCHEMA",
    "REJECTS_SCHEMA",
    "SCHEMA_VERSION",
    "SCORED_KIND",
    "SCORED_SCHEMA",
    "SCORED_UNPAIRED_SCHEMA",
    "SEQUENCE_COLUMNS",
    "UNPAIRED_SCHEMA",
    "check_columns",
]

SCHEMA_VERSION = 1

_IDS = pa.list_(pa.int32())
_FLOATS = pa.list_(pa.float32())

PAIRS_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("split", pa.string()),
        ("prompt_ids", _IDS),
        ("chosen_ids", _IDS),
        ("rejected_ids", _IDS),
        ("prompt", pa.string()),
        ("chosen", pa.string()),
        ("rejected", pa.string()),
        ("source", pa.string()),
    ]
)

SCORED_SCHEMA = pa.schema(
    list(PAIRS_SCHEMA)
    + [
        ("ref_chosen_logps", _FLOATS),
        ("ref_rejected_logps", _FLOATS),
        ("ref_chosen_logp", pa.float64()),
        ("ref_rejected_logp", pa.float64()),
    ]
)

UNPAIRED_SCHEMA = pa.schema(
    [
        ("row_id", pa.string()),
        ("split", pa.string()),
        ("prompt_ids", _IDS),
        ("completion_ids", _IDS),
        ("kl_completion_ids", _IDS),
        ("label", pa.bool_()),
        ("prompt", pa.string()),
        ("completion", pa.string()),
        ("kl_row_id", pa.string()),
        ("source", pa.string()),
    ]
)

SCORED_UNPAIRED_SCHEMA = pa.schema(
    list(UNPAIRED_SCHEMA)
    + [
        ("ref_completion_logps", _FLOATS),
        ("ref_kl_logps", _FLOATS),
        ("ref_completion_logp", pa.float64()),
        ("ref_kl_logp", pa.float64()),
    ]
)

REJECTS_SCHEMA = pa.schema(
    [
        ("row", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("record", pa.string()),
    ]
)

GENERATIONS_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("prompt", pa.string()),
        ("prompt_ids", _IDS),
        ("completion_ids", _IDS),
        ("completion", pa.string()),
        ("sample_index", pa.int32()),
        ("reward", pa.float64()),
        ("policy_logp", pa.float64()),
        ("finish_reason", pa.string()),
    ]
)

KINDS: dict[str, pa.Schema] = {
    "pairs": PAIRS_SCHEMA,
    "scored": SCORED_SCHEMA,
    "rejects": REJECTS_SCHEMA,
    "generations": GENERATIONS_SCHEMA,
    "unpaired": UNPAIRED_SCHEMA,
    "scored_unpaired": SCORED_UNPAIRED_SCHEMA,
}

# Per kind the reference stage reads: the two sequences scored after each row's prompt, each as (token ids,
# per-token reference log-probs, their float64 sum). Unpaired rows put the completion and its KL completion
# where a pair has chosen and rejected.
SEQUENCE_COLUMNS: dict[str, tuple[tuple[str, str, str], tuple[str, str, str]]] = {
    "pairs": (
        ("chosen_ids", "ref_chosen_logps", "ref_chosen_logp"),
        ("rejected_ids", "ref_rejected_logps", "ref_rejected_logp"),
    ),
    "unpaired": (
        ("completion_ids", "ref_completion_logps", "ref_completion_logp"),
        ("kl_completion_ids", "ref_kl_logps", "ref_kl_logp"),
    ),
}

# The scored kind the reference stage makes of each kind it reads.
SCORED_KIND = {"pairs": "scored", "unpaired": "scored_unpaired"}


# What each kind holds and which stage writes it.
KIND_DOCS: dict[str, str] = {
    "pairs": "Tokenized preference pairs with their split. Written by prepare (from the inputs) and by generate "
    "(on-policy pairs of the policy's samples); read by reference, by train for a reference-free loss, and by "
    "generate and evaluate for their prompts.",
    "scored": "A `pairs` artifact plus the reference model's log-probs of every completion token. Written by "
    "reference; read by train and by evaluate (preference accuracy on the eval split).",
    "rejects": "Every input record prepare did not turn into a pair (or unpaired row), with the reason; under "
    "`rejects/` of the `pairs` (or `unpaired`) artifact, so the two account for every input row. The reference "
    "stage's rejects (too long for its model) are under `rejects/` of its output.",
    "generations": "Every sample generate drew, with its reward; generate pairs them into its `pairs` artifact "
    "(or labels them into its `unpaired` artifact).",
    "unpaired": "Tokenized unpaired feedback (one completion, a desirable/undesirable label) with its split and the "
    "mismatched KL completion KTO's reference point is estimated from (dpo_ray.data.unpaired). Written by prepare "
    "(from unpaired records, or pairs split in two) and by generate; read by reference.",
    "scored_unpaired": "An `unpaired` artifact plus the reference model's log-probs of every completion and KL "
    "completion token. Written by reference; read by train (an unpaired loss: kto, apo_zero_unpaired) and evaluate.",
}

# Every column of every kind (a column of one name means the same in each kind that has it).
COLUMN_DOCS: dict[str, str] = {
    "pair_id": "sha256 of the JSON list [prompt, chosen, rejected], 32 hex digits: the identity dedup uses.",
    "split": "`train` or `eval`, from the hash of the prompt text (every pair or row of one prompt in one split).",
    "prompt_ids": "The prompt's token ids as the model sees them when it generates (chat template applied, BOS once).",
    "chosen_ids": "The preferred completion's token ids, ending with the stop token exactly once (EOS for text, the "
    "template's end of turn for chat; dpo_ray.data.tokenization).",
    "rejected_ids": "The dispreferred completion's token ids, as chosen_ids.",
    "prompt": "The prompt's text (chat prompts: the rendered template).",
    "chosen": "The preferred completion's text.",
    "rejected": "The dispreferred completion's text.",
    "source": "Where the pair or row came from: the input file or dataset (prepare), or the generating policy "
    "(generate).",
    "ref_chosen_logps": "The reference model's log-prob of each chosen completion token (float32).",
    "ref_rejected_logps": "The reference model's log-prob of each rejected completion token (float32).",
    "ref_chosen_logp": "Their sum over the chosen completion, in float64 (what the losses read).",
    "ref_rejected_logp": "Their sum over the rejected completion, in float64.",
    "row": "Where the record was in the inputs (its file or dataset and position).",
    "reason": "Why it was rejected: a reason code (table below).",
    "detail": "The specifics of the reason (lengths, the field, the parser's message).",
    "record": "The input record as JSON text.",
    "prompt_id": "sha256 of the prompt text, 32 hex digits (generate's prompts are unique by it).",
    "completion_ids": "The completion's token ids (generations: the sample; unpaired: the rated completion, ending "
    "with the stop token once, as chosen_ids).",
    "completion": "The completion's text.",
    "sample_index": "Which of the prompt's n samples this is (0 .. n-1).",
    "reward": "The sample's reward under generate.reward.",
    "policy_logp": "The sampling policy's log-prob of the whole completion (vLLM's, summed).",
    "finish_reason": "vLLM's: `stop` (ended by a stop token) or `length` (cut at max_tokens).",
    "row_id": 'sha256 of the JSON list ["unpaired", prompt, completion, label], 32 hex digits: an unpaired row\'s '
    "identity (dedup, the training order).",
    "kl_completion_ids": "Another row's completion (same shard or unit, same split, another prompt; prepare cuts it to "
    "fit max_length after this row's prompt): the mismatched sample KTO's KL estimate z₀ scores with this prompt.",
    "label": "true: a desirable completion; false: an undesirable one.",
    "kl_row_id": "The row_id of the row whose completion kl_completion_ids is.",
    "ref_completion_logps": "The reference model's log-prob of each completion token (float32).",
    "ref_kl_logps": "The reference model's log-prob of each KL completion token after this row's prompt (float32).",
    "ref_completion_logp": "Their sum over the completion, in float64 (what the losses read).",
    "ref_kl_logp": "Their sum over the KL completion, in float64.",
}


def check_columns(found: pa.Schema, expected: pa.Schema, where: str) -> None:
    """Raise ValueError naming `where` and each missing or mistyped column."""
    problems = []
    for field in expected:
        idx = found.get_field_index(field.name)
        if idx < 0:
            problems.append(f"missing column {field.name!r} ({field.type})")
        elif not found.field(idx).type.equals(field.type):
            problems.append(f"column {field.name!r}: expected {field.type}, found {found.field(idx).type}")
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems))
