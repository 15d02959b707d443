"""Turning an engine's ``{id: log-prob}`` rows into top-k targets (cache/external.py), and the
served teacher's row parsing and JSON decoding (cache/served.py), against plain references."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest

from logitcache.cache.external import topk_rows
from logitcache.cache.served import ServerError, _loads, _token_row


def reference(rows, k):
    """The one-row-at-a-time definition: sort by (-log-prob, id), keep k, tail from fsum."""
    ids, lps, tail = [], [], []
    for row in rows:
        top = sorted(row.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
        ids.append([t for t, _ in top])
        lps.append([lp for _, lp in top])
        mass = math.fsum(math.exp(lp) for _, lp in top)
        tail.append(math.log1p(-mass) if mass < 1.0 else -math.inf)
    return ids, np.float32(lps), np.float32(tail)


def test_topk_rows_equals_the_row_by_row_definition_with_ties_and_ragged_rows() -> None:
    rng = np.random.default_rng(0)
    k, rows = 4, []
    for p in range(50):
        width = k + int(rng.integers(0, 2))  # vLLM adds the sampled token when not in the top k
        ids = rng.choice(1000, width, replace=False)
        lps = np.log(rng.dirichlet(np.ones(width * 3))[:width])
        if p % 5 == 0:
            lps[1] = lps[2] = lps[0]  # ties: the smaller id first
        rows.append({int(i): float(v) for i, v in zip(ids, lps, strict=True)})
    rows.append({7: 0.0, 3: -80.0, 5: -90.0, 9: -100.0})  # mass 1: tail -inf
    got = topk_rows(rows, k)
    ids, lps, tail = reference(rows, k)
    assert got.ids.tolist() == ids
    np.testing.assert_array_equal(got.logprobs.numpy(), lps)
    np.testing.assert_allclose(got.tail.numpy(), tail, rtol=1e-6)
    assert got.tail[-1] == -math.inf and got.ids.dtype.is_floating_point is False


def test_topk_rows_refuses_a_row_shorter_than_k_naming_the_engine() -> None:
    with pytest.raises(RuntimeError, match=r"^--teacher-url x returned 2 log-probs .* 3 were"):
        topk_rows([{1: -0.1, 2: -3.0, 3: -4.0}, {1: -0.1, 2: -3.0}], 3, "--teacher-url x")
    assert topk_rows([], 3).ids.shape == (0, 3)


def test_token_row_parses_ids_and_names_a_string_key() -> None:
    assert _token_row({"token_id:12": -0.5, "token_id:3": -1.0}, "u") == {12: -0.5, 3: -1.0}
    with pytest.raises(
        ServerError, match=r"keyed by the string 'hello'.*return_tokens_as_token_ids"
    ):
        _token_row({"token_id:12": -0.5, "hello": -1.0}, "u")


def test_loads_falls_back_to_the_standard_library_without_orjson(monkeypatch) -> None:
    body = json.dumps({"choices": [{"logprobs": {"top_logprobs": [{"token_id:1": -0.25}]}}]})
    want = json.loads(body)
    assert _loads(body.encode()) == want
    monkeypatch.setitem(sys.modules, "orjson", None)  # import orjson → ModuleNotFoundError
    assert _loads(body.encode()) == want
