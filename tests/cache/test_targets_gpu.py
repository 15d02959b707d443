"""The targets' CUDA and bf16 paths against the CPU's on the same logits (`pytest -m gpu`;
`python -m logitcache.tools.gpu_check` runs these and prints the same agreement at GPU size).

Counter-based uniforms are integer hashes: bit for bit on any device. The fp32 log-softmax and
the fp64 cumulative sums of the tail draws differ between devices in the last bits only, so
ids agree except where bf16 makes logits tie at the k-th place or a uniform falls within
rounding of a CDF step."""

from __future__ import annotations

import pytest
import torch

from logitcache.cache.capture_config import DEFAULT_TARGETS, TargetConfig
from logitcache.cache.targets import STREAM_TARGETS, row_keys, row_targets, uniforms
from logitcache.tools.gpu_check import target_agreement

pytestmark = pytest.mark.gpu
DEVICE = "cuda"


@pytest.fixture(autouse=True)
def _needs_the_device() -> None:
    if DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")


@pytest.mark.parametrize("sampling", ["systematic", "multinomial"])
def test_counter_uniforms_are_bit_identical_on_the_device(sampling: str) -> None:
    g = torch.Generator().manual_seed(0)
    keys = torch.randint(0, 2**32, (4096,), generator=g, dtype=torch.int64)
    positions = torch.arange(4096, dtype=torch.int64)
    rows = row_keys(keys, positions, STREAM_TARGETS)
    assert torch.equal(row_keys(keys.to(DEVICE), positions.to(DEVICE), STREAM_TARGETS).cpu(), rows)
    assert torch.equal(uniforms(rows.to(DEVICE), 32, sampling).cpu(), uniforms(rows, 32, sampling))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [49_152, 128_256])
def test_default_targets_on_the_device_match_the_cpu(vocab: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    logits = (3.0 * torch.randn(512, vocab, generator=g)).to(dtype)  # (P, V)
    keys = torch.arange(512, dtype=torch.int64)
    positions = torch.zeros(512, dtype=torch.int64)
    cfg = TargetConfig(spec=DEFAULT_TARGETS)
    got = row_targets(logits.to(DEVICE), cfg, keys.to(DEVICE), positions.to(DEVICE))
    ref = row_targets(logits, cfg, keys, positions)
    a = target_agreement(got, ref, logits)
    # bf16 ties many logits, and the devices may break a tie at the k-th place differently.
    assert a["rows the same up to tied logits"] == 1.0, a
    if dtype == torch.float32:  # no ties: the same ids, and (but for rounding) the same draws
        assert a["rows with the same top-k ids"] == 1.0, a
        assert a["rows with the same tail draws"] >= 0.99, a
    assert a["max |Δ log p| (rows with the same ids)"] <= 1e-5, a
    assert a["max |Δ tail log-mass| (rows with the same ids)"] <= 1e-5, a
