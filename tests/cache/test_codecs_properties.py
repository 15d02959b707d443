"""Property tests of the codecs: any ids and any distribution round-trip within the bounds."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from logitcache.cache.codecs import (
    decode_id_planes,
    decode_id_planes_fixed,
    decode_logprobs,
    encode_id_planes,
    encode_logprobs,
    id_bytes_for_vocab,
)


@st.composite
def segmented_ids(draw):
    vocab = draw(st.integers(1, 1 << 20))
    lengths = draw(st.lists(st.integers(0, 12), max_size=20))
    segs = [np.sort(draw(arrays(np.int64, n, elements=st.integers(0, vocab - 1)))) for n in lengths]
    return vocab, np.array(lengths, dtype=np.int64), segs


@given(segmented_ids())
@settings(max_examples=200, deadline=None)
def test_id_planes_round_trip(case):
    vocab, lengths, segs = case
    flat = np.concatenate(segs) if segs else np.zeros(0, np.int64)
    planes = encode_id_planes(flat, lengths, id_bytes_for_vocab(vocab))
    np.testing.assert_array_equal(decode_id_planes(planes, lengths), flat)


@given(st.integers(1, 30), st.integers(1, 8), st.integers(1, 1 << 24), st.data())
@settings(max_examples=100, deadline=None)
def test_fixed_k_fast_path_matches(positions, k, vocab, data):
    ids = np.sort(
        data.draw(arrays(np.int64, (positions, k), elements=st.integers(0, vocab - 1))), axis=1
    )
    planes = encode_id_planes(ids.reshape(-1), np.full(positions, k), id_bytes_for_vocab(vocab))
    np.testing.assert_array_equal(decode_id_planes_fixed(planes, k), ids)


probs = arrays(np.float64, st.integers(1, 64), elements=st.floats(0, 1, allow_subnormal=False))


@given(probs, st.sampled_from(["u8", "u16"]))
@settings(max_examples=200, deadline=None)
def test_sqrt_codecs_within_bound(p, codec):
    q = 255 if codec == "u8" else 65535
    with np.errstate(divide="ignore"):
        lp = np.log(p)
    got = np.exp(decode_logprobs(encode_logprobs(lp, codec), codec).astype(np.float64))
    floor = (1 / q) ** 2
    big = p >= (0.5 / q) ** 2
    assert np.all(np.abs(np.sqrt(got[big]) - np.sqrt(p[big])) <= 0.5 / q + 1e-6)
    np.testing.assert_allclose(got[(p > 0) & ~big], floor, rtol=1e-5)
    assert np.all(got[p == 0] == 0)


@given(arrays(np.float32, st.integers(1, 64), elements=st.floats(-80, 0, width=32)))
@settings(max_examples=200, deadline=None)
def test_f16_relative_bound(lp):
    got = decode_logprobs(encode_logprobs(lp, "f16"), "f16")
    assert np.all(np.abs(got - lp) <= 2**-11 * np.abs(lp) + 6e-8)
