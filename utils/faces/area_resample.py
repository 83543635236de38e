"""Exact area resampling ("INTER_AREA", torch's ``interpolate(mode="area")``) from a summed-area table.

MTCNN resamples the same photo many times: once per pyramid level, then once per candidate box for RNet
and ONet. Building the image's summed-area table once (integer sums: exact) turns every one of those into
four gathers per output cell, and the results are bit-identical to torch's float kernel on the same
pixels: each cell is the exact integer sum of its source rectangle, divided by its height, then by its
width, as torch's adaptive average pooling divides.

    table = summed_area_table(pixels)                       # [B, H+1, W+1, 3] from uint8 [B, H, W, 3]
    level = area_resize(table, owner, y0, x0, h, w, 24, 24) # [K, 3, 24, 24] float32, channels_last
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _sum_dtype(height: int, width: int) -> torch.dtype:
    """int32 while the largest sum of the table fits (255 per channel and pixel), else int64."""
    return torch.int32 if 255 * (height + 1) * (width + 1) < 2 ** 31 else torch.int64


def summed_area_table(pixels: torch.Tensor, dtype: torch.dtype | None = None,
                      use_opencv: bool | None = None) -> torch.Tensor:
    """Summed-area table [B, H+1, W+1, C] of uint8 images [B, H, W, C], with a leading zero row and column.

    ``dtype`` defaults to int32 while the image's total fits, else int64. On the CPU (``use_opencv`` None)
    the table is OpenCV's ``integral`` (SIMD, ~20x faster than torch's cumsum over a middle axis); elsewhere
    two torch cumsums on the device. Both give the same exact integers."""
    batch, height, width, channels = pixels.shape
    dtype = dtype or _sum_dtype(height, width)
    if use_opencv is None:
        use_opencv = pixels.device.type == "cpu" and channels <= 4
    if use_opencv:
        import cv2

        depth = cv2.CV_32S if dtype == torch.int32 else cv2.CV_64F  # float64 holds these integers exactly
        table = torch.empty(batch, height + 1, width + 1, channels, dtype=dtype)
        for i, image in enumerate(pixels.cpu().numpy()):
            sums = cv2.integral(image, sdepth=depth).reshape(height + 1, width + 1, channels)
            table[i] = torch.from_numpy(sums)
        return table.to(pixels.device)
    table = F.pad(pixels, (0, 0, 1, 0, 1, 0)).cumsum(1, dtype=dtype)
    return table.cumsum_(2)


def cell_bounds(index, length, size: int):
    """Adaptive-average-pool bounds of cells ``index`` when a span ``length`` is cut into ``size`` cells:
    floor(i*L/size) .. ceil((i+1)*L/size). Integer torch tensors or numpy arrays (broadcasting)."""
    return index * length // size, ((index + 1) * length + size - 1) // size


def area_resize(table: torch.Tensor, image_inds, y0, x0, heights, widths, out_h: int, out_w: int) -> torch.Tensor:
    """K rectangles (image ``image_inds[k]``, top-left ``y0, x0``, size ``heights x widths``; integer numpy arrays
    or CPU tensors) area-resampled to [K, C, out_h, out_w] float32 (channels_last memory); bit-identical to one
    ``interpolate(rect, (out_h, out_w), mode="area")`` per rectangle. ``table`` is ``summed_area_table`` of the
    images. The gather indices are worked out in numpy (small arrays: a few calls instead of dozens in torch)."""
    _, rows, cols, channels = table.shape
    image_inds, y0, x0, heights, widths = (np.asarray(v, dtype=np.int64) for v in (image_inds, y0, x0, heights,
                                                                                    widths))
    count = len(image_inds)
    rs, re = cell_bounds(np.arange(out_h), heights[:, None], out_h)
    cs, ce = cell_bounds(np.arange(out_w), widths[:, None], out_w)
    base = image_inds[:, None] * rows + y0[:, None]
    top, bottom = ((base + rs) * cols)[:, :, None], ((base + re) * cols)[:, :, None]
    left, right = (cs + x0[:, None])[:, None, :], (ce + x0[:, None])[:, None, :]
    # the four corners' rows of channel sums in one gather: each copies C values at once
    index = np.stack([bottom + right, top + right, bottom + left, top + left]).reshape(-1)
    corners = table.view(-1, channels).index_select(0, torch.from_numpy(index).to(table.device))
    corners = corners.view(4, count, out_h, out_w, channels)
    total = corners[0].sub_(corners[1]).sub_(corners[2]).add_(corners[3])
    cells = total.to(torch.float32)
    divisors = torch.from_numpy(np.concatenate([re - rs, ce - cs], axis=1).astype(np.float32)).to(table.device)
    cells.div_(divisors[:, :out_h, None, None]).div_(divisors[:, None, out_h:, None])
    return cells.permute(0, 3, 1, 2)


def area_resize_images(table: torch.Tensor, out_h: int, out_w: int,
                       rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Every whole image of ``table`` area-resampled to [B, C, out_h, out_w] (channels_last memory): an MTCNN
    pyramid level; ``rows=(top, bottom)`` computes only those output rows (a band of the level). Rows first
    (each output row is the difference of two table rows), then columns. The cell bounds are plain numbers,
    so they are worked out in numpy: a dozen torch calls per level, not fifty."""
    batch, table_rows, cols, channels = table.shape
    device = table.device

    top, bottom = rows if rows is not None else (0, out_h)
    rs, re = cell_bounds(np.arange(top, bottom, dtype=np.int64), table_rows - 1, out_h)
    cs, ce = cell_bounds(np.arange(out_w, dtype=np.int64), cols - 1, out_w)
    out_h = bottom - top
    row_index = torch.from_numpy(np.concatenate([re, rs])).to(device)
    # each output cell's channels as one flat gather per row of the band (~2x faster than index_select(2, ...))
    column_index = torch.from_numpy(np.concatenate([ce, cs])[:, None] * channels + np.arange(channels)).to(device)
    divisors = torch.from_numpy(np.concatenate([re - rs, ce - cs]).astype(np.float32)).to(device)
    ends_starts = table.index_select(1, row_index)
    band = (ends_starts[:, :out_h] - ends_starts[:, out_h:]).view(batch * out_h, cols * channels)
    corners = torch.gather(band, 1, column_index.view(1, -1).expand(batch * out_h, -1))
    corners = corners.view(batch, out_h, 2, out_w, channels)
    cells = corners[:, :, 0].sub_(corners[:, :, 1]).to(torch.float32)
    cells.div_(divisors[:out_h, None, None]).div_(divisors[out_h:, None])
    return cells.permute(0, 3, 1, 2)
