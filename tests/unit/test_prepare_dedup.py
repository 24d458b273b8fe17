"""prepare's dedup at the driver: identities as 16-byte numpy keys, the first pair in input order kept."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.stages.prepare import UNIFIED_SCHEMA, _duplicates, _keys


def _block(ids: list[str | None]) -> pa.Table:
    """A tokenized block: a pair per id, a reject per None."""
    rows = [
        {"row": f"f:{i}", "kind": "reject", "reason": "empty_completion"}
        if pid is None
        else {"row": f"f:{i}", "kind": "pair", "pair_id": pid}
        for i, pid in enumerate(ids)
    ]
    return pa.Table.from_pylist(rows, schema=UNIFIED_SCHEMA)


def test_the_first_pair_in_input_order_is_kept_across_blocks():
    rng = np.random.default_rng(0)
    pool = [f"{rng.integers(0, 2**63):016x}{rng.integers(0, 2**63):016x}" for _ in range(40)]
    blocks = [
        [None if rng.random() < 0.2 else pool[int(rng.integers(0, len(pool)))] for _ in range(int(rng.integers(0, 30)))]
        for _ in range(12)
    ]
    keys = []
    for ids in blocks:
        n, digests, positions = _keys(_block(ids))
        assert n == len(ids) and positions.tolist() == [i for i, pid in enumerate(ids) if pid is not None]
        assert [d.tobytes().hex() for d in digests] == [pid for pid in ids if pid is not None]
        keys.append((digests, positions))
    # Independently: walk the input in order, the first holder of an id keeps it.
    first: dict[str, tuple[int, int]] = {}
    expected: list[dict[int, tuple[int, int]]] = [{} for _ in blocks]
    for b, ids in enumerate(blocks):
        for p, pid in enumerate(ids):
            if pid is None:
                continue
            if pid in first:
                expected[b][p] = first[pid]
            else:
                first[pid] = (b, p)
    found = _duplicates(keys)
    assert found == expected and sum(map(len, found)) > 50


def test_no_pairs_and_no_duplicates():
    assert _duplicates([]) == []
    n, digests, positions = _keys(_block([None, None]))
    assert n == 2 and digests.shape == (0, 2) and positions.size == 0
    assert _duplicates([(digests, positions)]) == [{}]
    one = _keys(_block(["ab" * 16, "cd" * 16]))
    assert _duplicates([one[1:], (digests, positions)]) == [{}, {}]
