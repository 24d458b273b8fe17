"""Arrow schemas of every artifact (ARCHITECTURE.md, "Artifacts"). Bump SCHEMA_VERSION on any change.

List columns are plain Arrow `list<int32>` / `list<float32>`, never Ray's tensor extension types: every
writer casts to these schemas explicitly, and readers check them with `check_columns`.
"""

from __future__ import annotations

import pyarrow as pa

__all__ = [
    "GENERATIONS_SCHEMA",
    "KINDS",
    "PAIRS_SCHEMA",
    "REJECTS_SCHEMA",
    "SCHEMA_VERSION",
    "SCORED_SCHEMA",
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
