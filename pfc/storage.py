"""Reduced-precision row storage for Partial FC: the weight and optimizer state may be stored in
bf16 (or SGD momentum in int8 with a per-row scale) while every update is computed in fp32; values
are rounded stochastically when stored (unbiased, so lr * weight-decay sized updates survive)."""
from __future__ import annotations

from typing import Callable

import torch

WEIGHT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}


def stochastic_round(values: torch.Tensor, dtype: torch.dtype, generator: torch.Generator | None,
                     noise: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 -> bf16 rounding up or down with probability given by the distance (unbiased), so small
    updates (lr * weight decay ~ 1e-5 relative) survive bf16's 8-bit mantissa on average. ``noise``:
    int32 values uniform in [0, 2^16) shaped like ``values`` (drawn here when None)."""
    if dtype == torch.float32:
        return values
    bits = values.contiguous().view(torch.int32)
    if noise is None:
        noise = torch.randint(0, 1 << 16, values.shape, dtype=torch.int32, device=values.device, generator=generator)
    return ((bits + noise) & -65536).view(torch.float32).to(dtype)


def quantize_rows_int8(values: torch.Tensor, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row absmax int8 with stochastic rounding (unbiased): returns (int8 rows, fp32 scale per row)
    with ``values ~= int8 * scale[:, None]``. ``noise``: int32 uniform in [0, 2^16) like ``values``."""
    scale = values.abs().amax(dim=1).div_(127.0)
    scaled = values / scale.clamp_min(1e-30)[:, None]
    uniform = torch.rand_like(values) if noise is None else noise.float().mul_(1.0 / 65536)
    return scaled.add_(uniform).floor_().clamp_(-127, 127).to(torch.int8), scale


def dequantize_rows_int8(rows: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 values of int8 rows with their per-row scale."""
    return rows.float().mul_(scale[:, None])


class RowStorage:
    """Loads rows of stored tensors as fp32 and stores fp32 rows back in the tensor's dtype.

    ``generator`` returns the rounding generator for a device (the head owns it, so it is saved with
    the head's other generators). Stochastic-rounding noise is drawn once per step (``new_step()``) as
    a pool, and each chunk of rows rounds with a window of it at an offset that moves on by a fixed
    stride from chunk to chunk.
    """

    # Offsets step through the pool by the golden ratio of its length: successive windows overlap as little
    # as a fixed stride can make them, with no random draw (reading one back would cost a device sync).
    OFFSET_STRIDE = 0.6180339887498949

    def __init__(self, generator: Callable[[torch.device], torch.Generator], pool_rows: int):
        self.generator, self.pool_rows = generator, int(pool_rows)
        self.noise_pool: torch.Tensor | None = None
        self.windows = 0  # windows handed out since the pool was drawn

    def new_step(self) -> None:
        """Fresh rounding noise for the next step."""
        self.noise_pool = None

    def load(self, tensor: torch.Tensor, rows, scale: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 rows of a stored tensor (int8 ones with their per-row ``scale``); fp32 slices are views."""
        if isinstance(rows, slice):
            view = tensor[rows]
            if view.dtype == torch.int8:
                return dequantize_rows_int8(view, scale[rows])
            return view if view.dtype == torch.float32 else view.float()  # fp32 slices update in place
        if tensor.dtype == torch.int8:
            return dequantize_rows_int8(tensor.index_select(0, rows), scale.index_select(0, rows))
        return tensor.index_select(0, rows).float()

    def rounding_noise(self, values: torch.Tensor) -> torch.Tensor:
        """Stochastic-rounding noise for ``values`` [rows, D]: a window of rows of this step's pool.
        Drawing fresh noise for every element was 3/4 of a bf16 step on CPU (the generator makes ~100M
        values/s). Every element of the pool is uniform and drawn independently of the values, so any
        window keeps the rounding unbiased; the window's offset needs no randomness of its own."""
        rows = values.shape[0]
        pool = self.noise_pool
        if pool is None or pool.shape[0] < 2 * rows or pool.shape[1] != values.shape[1] or pool.device != values.device:
            pool = self.noise_pool = torch.empty((2 * max(rows, self.pool_rows), values.shape[1]),
                                                 dtype=torch.int32, device=values.device)
            pool.random_(0, 1 << 16, generator=self.generator(values.device))
            self.windows = 0
        span = pool.shape[0] - rows + 1
        offset = int(self.windows * self.OFFSET_STRIDE * span) % span
        self.windows += 1
        return pool[offset: offset + rows]

    def store(self, tensor: torch.Tensor, rows, values: torch.Tensor, scale: torch.Tensor | None = None) -> None:
        """Write fp32 ``values`` into ``tensor[rows]`` (rounded to its dtype; int8 also sets ``scale``)."""
        if tensor.dtype == torch.float32:
            if not isinstance(rows, slice):  # fp32 slices were updated in place
                tensor.index_copy_(0, rows, values)
            return
        row_scale = None
        if tensor.dtype == torch.int8:
            rounded, row_scale = quantize_rows_int8(values, noise=self.rounding_noise(values))
        else:
            rounded = stochastic_round(values, tensor.dtype, None, noise=self.rounding_noise(values))
        if isinstance(rows, slice):
            tensor[rows] = rounded
            if row_scale is not None:
                scale[rows] = row_scale
        else:
            tensor.index_copy_(0, rows, rounded)
            if row_scale is not None:
                scale.index_copy_(0, rows, row_scale)

    def convert(self, target: torch.Tensor, source: torch.Tensor, source_scale: torch.Tensor | None,
                target_scale: torch.Tensor | None, chunk_rows: int) -> None:
        """``target[:] = source`` across float32 / bfloat16 / int8 storage, in bounded row chunks."""
        if source.dtype != torch.int8 and target.dtype != torch.int8:
            target.copy_(source)
            return
        for chunk in (slice(start, min(start + chunk_rows, source.shape[0]))
                      for start in range(0, source.shape[0], chunk_rows)):
            values = source[chunk]
            if source_scale is not None:
                values = dequantize_rows_int8(values, source_scale[chunk])
            values = values.to(device=target.device, dtype=torch.float32)
            if target.dtype == torch.float32:
                target[chunk] = values
            else:
                self.store(target, chunk, values, target_scale)
