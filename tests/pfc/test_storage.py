"""pfc/storage.py: int8 rows and bf16 stochastic rounding are unbiased and bounded."""
import math

import pytest
import torch

from pfc import storage


def test_int8_rows_are_unbiased_and_bounded():
    torch.manual_seed(0)  # the rounding noise comes from the global generator
    values = torch.randn(6, 64) * torch.tensor([1e-6, 1e-3, 1.0, 10.0, 0.0, 1e3])[:, None]
    draws = []
    for _ in range(300):
        rows, scale = storage.quantize_rows_int8(values)
        assert rows.dtype == torch.int8 and rows.abs().max() <= 127
        restored = storage.dequantize_rows_int8(rows, scale)
        assert bool(((restored - values).abs() <= scale[:, None] * 1.0001).all())  # within one step
        draws.append(restored)
    assert torch.equal(draws[0][4], torch.zeros(64))  # an all-zero row stays zero
    # Unbiased: the mean of 300 draws is within 5 standard errors (at most step / 2 / sqrt(300) = 0.029
    # steps) of the value in every row, whatever its magnitude; round-to-nearest would be off by up to 0.5.
    for row in range(6):
        error = (torch.stack(draws)[:, row].mean(0) - values[row]).abs().max()
        assert error <= scale[row] * 0.15 + 1e-30


def test_stochastic_rounding_is_unbiased():
    values = torch.full((200000,), 1.0 + 2.0 ** -10)  # a quarter of a bf16 ulp above 1.0
    rounded = storage.stochastic_round(values, torch.bfloat16, torch.Generator().manual_seed(0)).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + 2.0 ** -7}
    assert rounded.mean().item() == pytest.approx(1.0 + 2.0 ** -10, abs=2e-5)
    assert math.isclose(storage.stochastic_round(torch.tensor([-3.0]), torch.bfloat16, None).item(), -3.0)
