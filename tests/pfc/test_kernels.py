"""pfc/kernels.py: the GradientSink sums micro-steps on the union of their rows and hands workspace
buffers back; the Workspace never hands one buffer out twice."""
import torch

from pfc.kernels import GradientSink, Workspace


def test_gradient_sink_sums_micro_steps_and_releases_buffers():
    workspace, sink = Workspace(), GradientSink(num_rows=10, embedding_size=3)
    first, lease = workspace.take("center_grad", (2, 3), torch.device("cpu"))
    first.copy_(torch.tensor([[1.0, 2, 3], [4, 5, 6]]))
    sink.add(torch.tensor([2, 7]), first, lease)
    leaf = torch.zeros(3, 3, requires_grad=True)
    sink.watch(torch.tensor([0, 2, 9]), leaf)
    (leaf * torch.arange(9.0).view(3, 3)).sum().backward()  # leaf.grad = 0..8
    index, grad = sink.coalesced()
    assert index.tolist() == [0, 2, 7, 9]
    assert grad.tolist() == [[0, 1, 2], [1 + 3, 2 + 4, 3 + 5], [4, 5, 6], [6, 7, 8]]
    sink.unscale_(0.5)
    assert sink.coalesced()[1][1].tolist() == [2, 3, 4] and sink.all_finite()
    sink.coalesced()[1][3, 0] = float("nan")
    assert not sink.all_finite()
    # A second taker gets a fresh tensor while the lease is held; clear() hands the buffer back.
    again, none = workspace.take("center_grad", (2, 3), torch.device("cpu"))
    assert none is None and again.data_ptr() != first.data_ptr()
    sink.clear()
    assert sink.coalesced() is None and not workspace.busy
    reused, lease = workspace.take("center_grad", (1, 3), torch.device("cpu"))
    assert reused.data_ptr() == first.data_ptr()
    # Gathered rows are only offered for the same index object and an unchanged weight version.
    index = torch.tensor([1, 4])
    sink.keep_gathered(index, torch.ones(2, 3), weight_version=5, lease=lease)
    assert sink.gathered_rows(index, 5) is not None
    assert sink.gathered_rows(index.clone(), 5) is None and sink.gathered_rows(index, 6) is None
    sink.clear()
    assert not workspace.busy
