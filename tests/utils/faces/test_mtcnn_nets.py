"""MTCNN networks: the exact stand-ins for torch's pooling and PReLU, and the weight loader."""
import pytest
import torch
import torch.nn.functional as F

from utils.faces import mtcnn_nets
from utils.faces.mtcnn_nets import MTCNNError, load_net, max_pool2_ceil


@pytest.mark.parametrize("shape", [(1, 10, 9, 7), (2, 10, 8, 6), (1, 4, 1, 1), (1, 3, 2, 5)])
def test_pnet_pooling_equals_max_pool2d_ceil_mode(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).contiguous(memory_format=torch.channels_last)
    assert torch.equal(max_pool2_ceil(x), F.max_pool2d(x, 2, 2, ceil_mode=True))
    assert torch.equal(max_pool2_ceil(x.contiguous()), F.max_pool2d(x, 2, 2, ceil_mode=True))


def test_pnet_logits_match_the_plain_torch_layers():
    pnet = load_net("pnet")
    x = torch.randn(1, 3, 31, 26, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        reg, logits = pnet.logits(x)
        h = F.max_pool2d(pnet.prelu1(pnet.conv1(x)), 2, 2, ceil_mode=True)
        h = pnet.prelu3(pnet.conv3(pnet.prelu2(pnet.conv2(h))))
        torch.testing.assert_close(reg, pnet.conv4_2(h), rtol=0, atol=1e-5)
        torch.testing.assert_close(logits, pnet.conv4_1(h), rtol=0, atol=1e-5)


def test_missing_weights_are_one_line(tmp_path):
    with pytest.raises(MTCNNError, match=r"rnet.pt: MTCNN weight file not found"):
        load_net("rnet", str(tmp_path))


@pytest.mark.parametrize("height, width, batch", [(300, 40, 1), (301, 37, 2), (12, 12, 1), (97, 13, 3)])
def test_pnet_in_row_bands_equals_one_pass(monkeypatch, height, width, batch):
    pnet = load_net("pnet")
    x = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        whole = pnet.logits(x)
        monkeypatch.setattr(mtcnn_nets, "_BAND_PIXELS", 1)  # the smallest bands: 16 output rows each
        banded = pnet.logits(x)
    assert whole[0].shape == (batch, 4, (height - 1) // 2 - 4, (width - 1) // 2 - 4)
    for one, other in zip(whole, banded):  # the same sums; oneDNN may pick another kernel for a band's shape
        torch.testing.assert_close(one, other, rtol=0, atol=2e-5)


def test_images_packed_side_by_side_give_each_image_its_own_outputs():
    pnet = load_net("pnet")
    generator = torch.Generator().manual_seed(4)
    sizes = [(31, 27), (24, 19), (17, 12), (12, 16)]  # odd and even sides: partial pooling windows at edges
    images = [torch.randn(2, 3, h, w, generator=generator) for h, w in sizes]
    layout = pnet.packed_layout(sizes)
    packed = torch.full((2, 3, layout.height, layout.width), 7.0)  # whatever lies between the images
    for image, start, (h, w) in zip(images, layout.starts, sizes):
        packed[:, :, :h, start:start + w] = image
    with torch.inference_mode():
        heads = pnet.heads(packed, torch.from_numpy(layout.outside))
        for index, image in enumerate(images):
            alone = pnet.heads(image)
            columns = torch.from_numpy(layout.owner == index)
            mine = heads[:, :alone.shape[1]][:, :, columns]
            assert mine.shape == alone.shape
            torch.testing.assert_close(mine, alone, rtol=0, atol=2e-5)
            assert bool(torch.from_numpy(layout.valid[:, layout.owner == index]).sum() == alone.shape[1] * alone.shape[2])
