"""Exact area resampling from a summed-area table: bit-identical to torch's area interpolation."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from utils.faces.area_resample import area_resize, area_resize_images, summed_area_table


def random_pixels(seed: int, shape: tuple) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8))


@pytest.mark.parametrize("dtype", [None, torch.int64])
def test_opencv_and_torch_tables_are_the_same_integers(dtype):
    pixels = random_pixels(0, (2, 31, 47, 3))
    with_opencv = summed_area_table(pixels, dtype=dtype, use_opencv=True)
    with_torch = summed_area_table(pixels, dtype=dtype, use_opencv=False)
    assert with_opencv.dtype == with_torch.dtype == (dtype or torch.int32)
    assert torch.equal(with_opencv, with_torch)
    assert with_opencv.shape == (2, 32, 48, 3)
    assert with_opencv[:, 0].abs().sum() == 0 and with_opencv[:, :, 0].abs().sum() == 0  # the zero border
    assert torch.equal(with_opencv[:, -1, -1], pixels.long().sum((1, 2)).to(with_opencv.dtype))


def test_pyramid_levels_are_bit_identical_to_torch_area_interpolation():
    pixels = random_pixels(0, (2, 61, 97, 3))
    table = summed_area_table(pixels)
    reference_input = pixels.permute(0, 3, 1, 2).float()
    for size in [(37, 59), (61, 97), (13, 12), (5, 90), (61, 40)]:
        mine = area_resize_images(table, *size)
        assert torch.equal(mine, F.interpolate(reference_input, size=size, mode="area")), size


def test_rectangles_are_bit_identical_to_per_rectangle_area_interpolation():
    pixels = random_pixels(1, (2, 50, 70, 3))
    table = summed_area_table(pixels)
    images = pixels.permute(0, 3, 1, 2).float()
    owner = torch.tensor([0, 1, 1, 0, 1])
    y0, x0 = torch.tensor([0, 3, 10, 49, 0]), torch.tensor([0, 5, 60, 0, 2])
    hc, wc = torch.tensor([50, 7, 40, 1, 30]), torch.tensor([70, 31, 10, 70, 3])
    for out_h, out_w in [(24, 24), (9, 17)]:
        mine = area_resize(table, owner, y0, x0, hc, wc, out_h, out_w)
        for k in range(len(owner)):
            crop = images[owner[k], :, y0[k]:y0[k] + hc[k], x0[k]:x0[k] + wc[k]][None]
            assert torch.equal(mine[k:k + 1], F.interpolate(crop, size=(out_h, out_w), mode="area")), (k, out_h)


def test_a_band_of_rows_is_those_rows_of_the_whole_level():
    table = summed_area_table(random_pixels(2, (2, 45, 38, 3)))
    whole = area_resize_images(table, 27, 23)
    for top, bottom in [(0, 27), (0, 5), (9, 20), (26, 27)]:
        assert torch.equal(area_resize_images(table, 27, 23, rows=(top, bottom)), whole[:, :, top:bottom])
