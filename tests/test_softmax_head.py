"""softmax_head.py: cross-entropy of x W^T + b, loading facenet-pytorch's logits layer, errors, and
BackboneWithHead on 2 gloo ranks with summed gradients (the trainer's DDP hook) against one process."""
import json
import logging
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from softmax_head import BackboneWithHead, SoftmaxHead, SoftmaxHeadError
from tests.spawn_helpers import run_ranks


def test_loss_and_gradients_equal_cross_entropy_of_the_linear_layer():
    torch.manual_seed(0)
    head = SoftmaxHead(16, 7)
    x = torch.randn(9, 16, requires_grad=True)
    labels = torch.randint(0, 7, (9,))
    loss = head(x, labels)
    loss.backward()
    x_ref = x.detach().clone().requires_grad_(True)
    w_ref = head.logits.weight.detach().clone().requires_grad_(True)
    b_ref = head.logits.bias.detach().clone().requires_grad_(True)
    expected = F.cross_entropy(x_ref @ w_ref.t() + b_ref, labels)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    for mine, ref in ((x.grad, x_ref.grad), (head.logits.weight.grad, w_ref.grad), (head.logits.bias.grad, b_ref.grad)):
        assert torch.allclose(mine, ref, atol=1e-6)
    assert set(head.state_dict()) == {"logits.weight", "logits.bias"}


def _facenet_state(facenet_fixtures, num_classes):
    """716 keys as facenet-pytorch's InceptionResnetV1(classify=True) has them; only logits.* are real-sized."""
    with open(os.path.join(facenet_fixtures, "expected.json")) as handle:
        reference = json.load(handle)["inception_resnet_v1"]
    state = {name: torch.zeros(1) for name, _ in reference["keys"]}
    generator = torch.Generator().manual_seed(1)
    state["logits.weight"] = torch.randn(num_classes, 512, generator=generator)
    state["logits.bias"] = torch.randn(num_classes, generator=generator)
    assert len(state) == 716
    return state


def test_load_logits_from_a_facenet_state_dict(facenet_fixtures, caplog):
    state = _facenet_state(facenet_fixtures, 8631)  # VGGFace2's class count
    head = SoftmaxHead(512, 8631)
    assert head.load_logits(state, "vggface2.pt") is True
    assert torch.equal(head.logits.weight, state["logits.weight"]) and torch.equal(head.logits.bias, state["logits.bias"])
    x = torch.randn(3, 512)
    assert torch.allclose(head.logits(x), x @ state["logits.weight"].t() + state["logits.bias"], atol=1e-4)
    # DataParallel-style "module." names load too.
    other = SoftmaxHead(512, 8631)
    assert other.load_logits({f"module.{k}": v for k, v in state.items()}) is True
    assert torch.equal(other.logits.bias, state["logits.bias"])
    plain = SoftmaxHead(512, 8631)
    assert plain.load_logits({"weight": state["logits.weight"], "bias": state["logits.bias"]}) is True
    assert torch.equal(plain.logits.weight, state["logits.weight"])
    # Another class count: keep the fresh classifier, say so in one log line.
    small = SoftmaxHead(512, 10)
    before = small.logits.weight.detach().clone()
    with caplog.at_level(logging.WARNING, logger="softmax_head"):
        assert small.load_logits(state, "vggface2.pt") is False
    assert torch.equal(small.logits.weight, before)
    assert "vggface2.pt: logits.weight (8631, 512) does not match" in caplog.text
    del state["logits.bias"]
    with pytest.raises(SoftmaxHeadError, match="vggface2.pt: no 'logits.bias' tensor"):
        head.load_logits(state, "vggface2.pt")


def test_bad_inputs_are_one_line_errors():
    head = SoftmaxHead(4, 3)
    with pytest.raises(SoftmaxHeadError, match=r"label 3 out of range.*num_classes=3"):
        head(torch.randn(2, 4), torch.tensor([0, 3]))
    with pytest.raises(SoftmaxHeadError, match=r"label -1 out of range"):
        head(torch.randn(2, 4), torch.tensor([-1, 0]))
    with pytest.raises(SoftmaxHeadError, match=r"embeddings must be \[N, 4\]"):
        head(torch.randn(2, 5), torch.tensor([0, 1]))
    with pytest.raises(SoftmaxHeadError, match="num_classes=1"):
        SoftmaxHead(4, 1)


def _model(seed=0):
    torch.manual_seed(seed)
    return BackboneWithHead(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5)), SoftmaxHead(5, 4))


def _data():
    generator = torch.Generator().manual_seed(3)
    return torch.randn(10, 6, generator=generator), torch.randint(0, 4, (10,), generator=generator)


def _ranks_worker(rank, world_size, sizes):
    import torch.distributed as dist

    images, labels = _data()
    start = sum(sizes[:rank])
    model = _model()
    loss, _ = model(images[start:start + sizes[rank]], labels[start:start + sizes[rank]])
    loss.backward()
    # What DDP with utils/device.py's sum_allreduce_hook does to every gradient bucket: a plain SUM
    # (DDP itself is left out: its construction alone costs ~4 s on gloo).
    for param in model.parameters():
        dist.all_reduce(param.grad)
    # numpy, not tensors: torch's queue would share tensors through this (exiting) process's fds
    return loss.item(), {name: p.grad.numpy().copy() for name, p in model.named_parameters()}


def test_two_ranks_with_summed_gradients_equal_one_process(port):
    images, labels = _data()
    model = _model()
    loss, embeddings = model(images, labels)
    loss.backward()
    assert embeddings.shape == (10, 5)
    results = run_ranks(_ranks_worker, 2, port, [6, 4], timeout=90)  # unequal local batches
    for value, grads in results:
        assert value == pytest.approx(loss.item(), rel=1e-6)  # every rank reports the global mean
        for name, param in model.named_parameters():
            assert np.allclose(grads[name], param.grad.numpy(), atol=1e-6), name
