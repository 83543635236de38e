"""partial_fc.py: exactness against a single-process full softmax (W = 1, 2, 3 gloo ranks, uneven class
split, uneven local batches), sampling, sparse vs dense updates, optimizer semantics, label errors,
world-size independent checkpoints, AdaFace / CurricularFace inside Partial FC, bf16 storage."""
import io

import pytest
import torch
import torch.nn.functional as F

import losses
import partial_fc
from partial_fc import PartialFC, PartialFCError, init_weight_rows
from tests.conftest import free_port
from tests.spawn_helpers import run_ranks

C, D = 23, 8  # 23 classes: uneven over 2 and 3 ranks
LOCAL_BATCH = {1: [9], 2: [5, 4], 3: [4, 2, 3]}  # uneven local batches, 9 samples globally
SEED = 3


def global_batch(total: int = 9, seed: int = 11, num_classes: int = C):
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(total, D, generator=generator) * 3
    labels = torch.randint(0, num_classes, (total,), generator=generator)
    labels[:3] = torch.tensor([0, num_classes - 1, labels[5]])  # first, last class and a repeated label
    return embeddings, labels


def reference(margin, embeddings, labels, weight):
    """Single-process full softmax: loss and gradients w.r.t. embeddings and centers."""
    embeddings = embeddings.clone().requires_grad_(True)
    weight = weight.clone().requires_grad_(True)
    logits = F.linear(F.normalize(embeddings), F.normalize(weight)).clamp(-1, 1)
    norms = embeddings.detach().norm(dim=1)
    loss = F.cross_entropy(margin(logits, labels, norms=norms), labels)
    loss.backward()
    return loss.detach(), embeddings.grad, weight.grad


def make_margin(kind: str):
    if kind == "arcface":
        return losses.CombinedMarginLoss(64.0, 1.0, 0.5, 0.0)
    if kind == "combined_exact":
        return losses.CombinedMarginLoss(32.0, 1.0, 0.3, 0.2, margin_grad="exact")
    if kind == "adaface":
        return losses.AdaFaceLoss(s=32.0, m=0.4)
    return losses.CurricularFaceLoss(s=32.0, m=0.5)


def run_head(rank, world_size, kind, state=None, sample_rate=1.0):
    """One forward/backward on this rank's slice of the global batch."""
    sizes = LOCAL_BATCH[world_size]
    start = sum(sizes[:rank])
    embeddings, labels = global_batch()
    local = embeddings[start: start + sizes[rank]].clone().requires_grad_(True)
    head = PartialFC(make_margin(kind), D, C, sample_rate=sample_rate, seed=SEED)
    head.configure_optimizer("sgd", momentum=0.9, weight_decay=5e-4)
    if state is not None:
        head.load_full_state_dict(state)
    loss = head(local, labels[start: start + sizes[rank]].int())  # int32 labels are accepted
    loss.backward()
    index, center_grad = head.center_grad()
    return head, {"loss": loss.detach(), "embedding_grad": local.grad, "center_grad": center_grad,
                  "index": index, "class_start": head.class_start, "buffers": dict(head.margin_loss.named_buffers())}


def _pack(obj) -> bytes:
    """Tensors cross the spawn queue as bytes: torch's shared-memory handles die with the child."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _unpack(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=True)


def _spawned_worker(rank, world_size, packed_state):
    return _pack(_exactness_worker(rank, world_size, None if packed_state is None else _unpack(packed_state)))


ALL_KINDS = ("arcface", "combined_exact", "adaface", "curricularface")


def kinds_for(world_size: int) -> tuple:
    # AdaFace / CurricularFace are compared on 1 and 2 ranks; 3 ranks checks the combined margins only.
    return ALL_KINDS if world_size < 3 else ALL_KINDS[:2]


def _exactness_worker(rank, world_size, state_for_loading):
    results = {}
    for kind in kinds_for(world_size):
        _, results[kind] = run_head(rank, world_size, kind)
    head, _ = run_head(rank, world_size, "arcface")
    head.step(0.1)  # non-trivial weight and momentum rows in the saved state
    results["state"] = head.full_state_dict()
    default_chunk, partial_fc.GATHER_CHUNK_VALUES = partial_fc.GATHER_CHUNK_VALUES, 5 * D
    try:  # 5 rows per transfer to rank 0: several chunks, the last one short
        results["state_in_chunks"] = head.full_state_dict()
    finally:
        partial_fc.GATHER_CHUNK_VALUES = default_chunk
    results["repr"] = repr(head)
    if state_for_loading is not None:
        _, results["loaded"] = run_head(rank, world_size, "arcface", state=state_for_loading)
    return results


def check_against_reference(results_by_rank, world_size):
    embeddings, labels = global_batch()
    weight = init_weight_rows(0, C, D, SEED, 0.01)
    sizes = LOCAL_BATCH[world_size]
    for kind in kinds_for(world_size):
        loss, embedding_grad, weight_grad = reference(make_margin(kind), embeddings, labels, weight)
        got_embedding_grad = torch.cat([r[kind]["embedding_grad"] for r in results_by_rank])
        got_weight_grad = torch.cat([r[kind]["center_grad"] for r in results_by_rank])
        assert got_embedding_grad.shape[0] == sum(sizes)
        for result in results_by_rank:
            assert result[kind]["loss"].item() == pytest.approx(loss.item(), rel=1e-5), kind
        torch.testing.assert_close(got_embedding_grad, embedding_grad, rtol=1e-5, atol=1e-5 * embedding_grad.abs().max())
        torch.testing.assert_close(got_weight_grad, weight_grad, rtol=1e-5, atol=1e-5 * weight_grad.abs().max())


def test_single_process_equals_full_softmax():
    results = _exactness_worker(0, 1, None)
    check_against_reference([results], 1)
    assert results["state"]["weight"].shape == (C, D)
    assert not torch.equal(results["state"]["weight"], PartialFC(make_margin("arcface"), D, C, seed=SEED).weight)


def test_two_and_three_ranks_equal_full_softmax_and_checkpoints_move_between_world_sizes(port):
    two = [_unpack(data) for data in run_ranks(_spawned_worker, 2, port, None, timeout=120)]
    check_against_reference(two, 2)
    assert [r["class_start"] for r in (two[0]["arcface"], two[1]["arcface"])] == [0, 12]
    # AdaFace / CurricularFace batch statistics are global: the EMA buffers match the 1-process run.
    single = _exactness_worker(0, 1, None)
    for kind in ("adaface", "curricularface"):
        for name, value in single[kind]["buffers"].items():
            for rank_result in two:
                assert rank_result[kind]["buffers"][name].item() == pytest.approx(value.item(), rel=1e-6), name
    state = two[0]["state"]
    assert two[1]["state"] is None
    assert torch.equal(two[0]["state_in_chunks"]["weight"], state["weight"])
    assert torch.equal(two[0]["state_in_chunks"]["optimizer"]["momentum_buffer"], state["optimizer"]["momentum_buffer"])
    for saved, expected in ((state["weight"], single["state"]["weight"]),
                            (state["optimizer"]["momentum_buffer"], single["state"]["optimizer"]["momentum_buffer"])):
        assert saved.shape == (C, D)
        torch.testing.assert_close(saved, expected, rtol=1e-5, atol=1e-5 * expected.abs().max())

    three = [_unpack(data) for data in run_ranks(_spawned_worker, 3, free_port(), _pack(state), timeout=120)]
    check_against_reference(three, 3)
    # A 2-rank checkpoint loaded on 3 ranks and on 1 gives the same loss and gradients.
    _, loaded_single = run_head(0, 1, "arcface", state=state)
    for rank_result in three:
        assert rank_result["loaded"]["loss"].item() == pytest.approx(loaded_single["loss"].item(), rel=1e-6)
    for key in ("embedding_grad", "center_grad"):
        expected = loaded_single[key]
        torch.testing.assert_close(torch.cat([r["loaded"][key] for r in three]), expected, rtol=1e-5,
                                   atol=1e-5 * expected.abs().max())


def test_initial_weight_rows_do_not_depend_on_the_sharding():
    assert torch.equal(init_weight_rows(5, 10, D, 1, 0.01), init_weight_rows(0, 20, D, 1, 0.01)[5:15])
    big = init_weight_rows(partial_fc.INIT_BLOCK_ROWS - 3, 6, 4, 1, 0.01)  # crosses an init block
    assert torch.equal(big[3:], init_weight_rows(partial_fc.INIT_BLOCK_ROWS, 3, 4, 1, 0.01))


# ---------------------------------------------------------------- sampling (r < 1)
def _sampled_head(num_classes=1000, sample_rate=0.1, pfc_update="sparse", optimizer="sgd", eps=1e-8, **kwargs):
    head = PartialFC(make_margin("arcface"), D, num_classes, sample_rate=sample_rate, pfc_update=pfc_update,
                     seed=SEED, **kwargs)
    head.configure_optimizer(optimizer, momentum=0.9, weight_decay=5e-4, eps=eps)
    return head


def test_sampling_keeps_positives_and_equals_restricted_softmax():
    head = _sampled_head()
    embeddings, labels = global_batch(total=40, num_classes=1000)
    loss = head(embeddings, labels)
    index = head.last_index
    assert index.numel() == 100 and bool((index[1:] > index[:-1]).all())  # round(0.1 * 1000), sorted, unique
    assert set(labels.tolist()) <= set(index.tolist())
    # Loss = full softmax restricted to the sampled classes, labels remapped to sampled positions.
    remapped = torch.searchsorted(index, labels)
    ref_loss, _, ref_grad = reference(make_margin("arcface"), embeddings, remapped, head.weight[index])
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    loss.backward()
    grad_index, grad = head.center_grad()
    assert torch.equal(grad_index, index)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-5 * ref_grad.abs().max())
    # Different steps sample different negatives (the generator advances).
    head.zero_grad()
    head(embeddings, labels)
    assert not torch.equal(head.last_index, index)


def test_more_positives_than_sample_size_keeps_all_positives():
    head = _sampled_head(num_classes=50, sample_rate=0.1)  # num_sample = 5
    embeddings, labels = global_batch(total=30, num_classes=50)
    head(embeddings, labels).backward()
    index, grad = head.center_grad()
    assert torch.equal(index, torch.unique(labels)) and grad.shape == (index.numel(), D)


def _one_step(head, embeddings, labels, lr=0.1):
    loss = head(embeddings, labels)
    loss.backward()
    index = head.last_index
    head.step(lr)
    head.zero_grad()
    return index


def test_sparse_vs_dense_sgd_one_step():
    embeddings, labels = global_batch(total=40, num_classes=1000)
    sparse, dense = _sampled_head(), _sampled_head(pfc_update="dense")
    momentum = torch.randn(1000, D, generator=torch.Generator().manual_seed(0)) * 1e-3
    for head in (sparse, dense):
        head.momentum_buffer.copy_(momentum)
    weight_before = sparse.weight.clone()
    index = _one_step(sparse, embeddings, labels)
    assert torch.equal(index, _one_step(dense, embeddings, labels))  # same seed -> same sample
    assert torch.equal(sparse.weight[index], dense.weight[index])  # bit-identical sampled rows
    assert torch.equal(sparse.momentum_buffer[index], dense.momentum_buffer[index])
    unsampled = torch.ones(1000, dtype=torch.bool)
    unsampled[index] = False
    assert torch.equal(sparse.weight[unsampled], weight_before[unsampled])  # untouched
    assert torch.equal(sparse.momentum_buffer[unsampled], momentum[unsampled])
    # Dense: every unsampled row decays: buf = 0.9 buf + wd w; w -= lr buf.
    expected_buf = momentum[unsampled] * 0.9 + 5e-4 * weight_before[unsampled]
    torch.testing.assert_close(dense.momentum_buffer[unsampled], expected_buf, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(dense.weight[unsampled], weight_before[unsampled] - 0.1 * expected_buf,
                               rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_dense_update_matches_torch_optimizer(optimizer):
    """pfc_update="dense" = arcface_torch v2: a full-matrix parameter with torch's SGD / AdamW."""
    # eps=1e-3: with eps=1e-8 Adam's update of a gradient component ~1e-8 (the normalisation projects the
    # gradient orthogonal to the center) depends on float rounding noise, in torch as in any implementation.
    head = _sampled_head(num_classes=200, sample_rate=0.25, pfc_update="dense", optimizer=optimizer, eps=1e-3)
    weight = torch.nn.Parameter(head.weight.clone())
    torch_optimizer = (torch.optim.SGD([weight], lr=0.1, momentum=0.9, weight_decay=5e-4) if optimizer == "sgd"
                       else torch.optim.AdamW([weight], lr=0.01, weight_decay=5e-4, eps=1e-3))
    lr = 0.1 if optimizer == "sgd" else 0.01
    for step in range(3):
        embeddings, labels = global_batch(total=12, seed=step, num_classes=200)
        index = _one_step(head, embeddings, labels, lr)
        # the same loss through the full matrix: the gradient of unsampled rows is zero
        rows = weight[index]
        logits = F.linear(F.normalize(embeddings), F.normalize(rows)).clamp(-1, 1)
        loss = F.cross_entropy(make_margin("arcface")(logits, torch.searchsorted(index, labels)),
                               torch.searchsorted(index, labels))
        torch_optimizer.zero_grad()
        loss.backward()
        torch_optimizer.step()
        # tolerance: 1e-4 of one update (Adam divides tiny gradients by tiny second moments)
        torch.testing.assert_close(head.weight, weight.detach(), rtol=1e-4,
                                   atol=max(1e-5 * weight.abs().max().item(), 1e-4 * lr))


def test_sparse_adamw_moves_only_sampled_rows_with_per_row_bias_correction():
    head = _sampled_head(num_classes=200, sample_rate=0.25, optimizer="adamw")
    before = head.weight.clone()
    embeddings, labels = global_batch(total=12, num_classes=200)
    index = _one_step(head, embeddings, labels, lr=0.01)
    moved = (head.weight != before).any(dim=1)
    assert torch.equal(moved.nonzero().view(-1), index)
    assert head.adam_steps[index].eq(1).all() and head.adam_steps.sum() == index.numel()
    # First AdamW step: |update| = lr * |g| / (|g| + eps) ~ lr for every sampled row element with g != 0.
    delta = (before[index] * (1 - 0.01 * 5e-4) - head.weight[index]).abs()
    assert delta.max().item() == pytest.approx(0.01, rel=1e-3)


def test_gradient_accumulation_sums_micro_steps():
    embeddings, labels = global_batch(total=12, num_classes=200)
    # r = 1: two half batches (loss / 2 each) give the same update as the whole batch.
    whole, halves = _sampled_head(200, 1.0), _sampled_head(200, 1.0)
    whole(embeddings, labels).backward()
    for part in (slice(0, 6), slice(6, 12)):
        (halves(embeddings[part], labels[part]) / 2).backward()
    whole_grad = whole.center_grad()[1]
    torch.testing.assert_close(halves.center_grad()[1], whole_grad, rtol=1e-5, atol=1e-5 * whole_grad.abs().max())
    # r < 1: the accumulated gradient is the sum of the micro-steps' rows on the union of their samples.
    # `single` (same seed: same samples) reads each micro-step's gradient alone; `head` accumulates both.
    head, single = _sampled_head(200, 0.1), _sampled_head(200, 0.1)
    parts = []
    for part in (slice(0, 6), slice(6, 12)):
        head(embeddings[part], labels[part]).backward()
        single(embeddings[part], labels[part]).backward()
        rows, rows_grad = single.center_grad()
        parts.append((rows, rows_grad.clone()))
        single.zero_grad()
    index, grad = head.center_grad()
    assert torch.equal(index, torch.unique(torch.cat([parts[0][0], parts[1][0]])))
    expected = torch.zeros(200, D)
    for rows, rows_grad in parts:
        expected[rows] += rows_grad
    torch.testing.assert_close(grad, expected[index])
    head.unscale_(0.5)
    torch.testing.assert_close(head.center_grad()[1], expected[index] * 0.5)
    assert head.grads_finite()
    head.center_grad()[1][0, 0] = float("inf")
    assert not head.grads_finite()
    head.zero_grad()
    assert head.grads_finite() and head.center_grad() is None


# ---------------------------------------------------------------- fused head path
def _generic(margin):
    """The same margin as a plain callable: PartialFC then takes the generic autograd path."""
    return lambda logits, labels: margin(logits, labels, norms=None)


@pytest.mark.parametrize("margin", [
    losses.CombinedMarginLoss(64.0, 1.0, 0.5, 0.0),
    losses.CombinedMarginLoss(32.0, 1.2, 0.3, 0.2, margin_grad="exact"),
    losses.CombinedMarginLoss(64.0, 1.0, 0.0, 0.4),
    losses.CombinedMarginLoss(64.0, 1.0, 0.5, 0.0, interclass_filtering_threshold=0.05),
], ids=["arcface", "combined_exact", "cosface", "interclass_filtering"])
def test_fused_path_equals_generic_autograd_path(margin):
    embeddings, labels = global_batch(total=40, num_classes=300)
    results = []
    for head_margin in (margin, _generic(margin)):
        head = PartialFC(head_margin, D, 300, sample_rate=0.3, seed=SEED)
        local = embeddings.clone().requires_grad_(True)
        loss = head(local, labels)
        loss.backward()
        results.append((loss.detach(), local.grad, *head.center_grad()))
    (fused_loss, fused_embedding_grad, fused_index, fused_grad), (loss, embedding_grad, index, grad) = results
    assert torch.equal(fused_index, index)
    assert fused_loss.item() == pytest.approx(loss.item(), rel=1e-6)
    torch.testing.assert_close(fused_embedding_grad, embedding_grad, rtol=1e-5, atol=1e-6 * embedding_grad.abs().max())
    torch.testing.assert_close(fused_grad, grad, rtol=1e-5, atol=1e-6 * grad.abs().max())


def test_workspace_buffers_are_reused_and_never_shared():
    embeddings, labels = global_batch(total=40, num_classes=300)
    head, generic = (PartialFC(margin, D, 300, sample_rate=0.3, seed=SEED)
                     for margin in (make_margin("arcface"), _generic(make_margin("arcface"))))
    for step in range(3):  # later steps reuse the first step's buffers
        for each in (head, generic):  # same calls, so both draw the same samples
            each(embeddings, labels).backward()
            each.zero_grad()
        if step == 0:
            buffers = {name: buffer.data_ptr() for name, buffer in head.workspace.buffers.items()}
    assert set(buffers) == {"centers", "logits", "center_grad"} and not head.workspace.busy
    assert {name: buffer.data_ptr() for name, buffer in head.workspace.buffers.items()} == buffers
    # Two graphs alive at once: the second forward must not overwrite the first one's saved buffers.
    first, second = head(embeddings[:20], labels[:20]), head(embeddings[20:], labels[20:])
    (first + 2 * second).backward()
    expected_first, expected_second = generic(embeddings[:20], labels[:20]), generic(embeddings[20:], labels[20:])
    (expected_first + 2 * expected_second).backward()
    assert (first + 2 * second).item() == pytest.approx((expected_first + 2 * expected_second).item(), rel=1e-6)
    (index, grad), (expected_index, expected_grad) = head.center_grad(), generic.center_grad()
    assert torch.equal(index, expected_index)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6 * expected_grad.abs().max())
    head.zero_grad()
    assert not head.workspace.busy
    # A graph dropped without backward (e.g. a loss logged under grad mode) releases its buffers.
    loss = head(embeddings, labels)
    assert head.workspace.busy == {"centers", "logits"}
    del loss
    assert not head.workspace.busy
    with torch.no_grad():
        head(embeddings, labels)
    assert not head.workspace.busy


# ---------------------------------------------------------------- inputs, precision, state
def test_label_and_input_errors():
    head = _sampled_head(num_classes=50, sample_rate=1.0)
    embeddings = torch.randn(4, D)
    with pytest.raises(PartialFCError, match=r"labels must be an integer tensor, got dtype torch.float32"):
        head(embeddings, torch.tensor([0.0, 1.0, 2.0, 3.0]))
    with pytest.raises(PartialFCError, match=r"label 50 is outside \[0, num_classes=50\)"):
        head(embeddings, torch.tensor([0, 1, 50, 3]))
    with pytest.raises(PartialFCError, match=r"label -2 is outside \[0, num_classes=50\)"):
        head(embeddings, torch.tensor([0, -2, 5, 3]))
    with pytest.raises(PartialFCError, match=r"embeddings must be \[B, embedding_size=8\], got shape \(4, 3\)"):
        head(torch.randn(4, 3), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(PartialFCError, match=r"3 labels for 4 embeddings"):
        head(embeddings, torch.tensor([0, 1, 2]))
    with pytest.raises(PartialFCError, match=r"sample_rate=1.5: expected 0 < sample_rate <= 1"):
        PartialFC(make_margin("arcface"), D, 50, sample_rate=1.5)
    with pytest.raises(PartialFCError, match=r"pfc_update='lazy': expected one of sparse, dense"):
        PartialFC(make_margin("arcface"), D, 50, pfc_update="lazy")
    with pytest.raises(PartialFCError, match=r"weight_dtype='float16' \(config key 'pfc_weight_dtype'\): "
                                             r"expected one of float32, bfloat16"):
        PartialFC(make_margin("arcface"), D, 50, weight_dtype="float16")
    with pytest.raises(PartialFCError, match=r"optimizer='lamb': expected one of sgd, adam, adamw"):
        head.configure_optimizer("lamb")
    with pytest.raises(PartialFCError, match=r"call configure_optimizer\(\) before step\(\)"):
        PartialFC(make_margin("arcface"), D, 50).step(0.1)
    with pytest.raises(PartialFCError, match=r"use full_state_dict\(\)"):
        head.state_dict()
    state = head.full_state_dict()
    with pytest.raises(PartialFCError, match=r"checkpoint head has num_classes=50, embedding_size=8; this head has 60, 8"):
        PartialFC(make_margin("arcface"), D, 60).load_full_state_dict(state)
    adam = PartialFC(make_margin("arcface"), D, 50)
    adam.configure_optimizer("adamw")
    with pytest.raises(PartialFCError, match=r"checkpoint optimizer is 'sgd', this head uses 'adamw'"):
        adam.load_full_state_dict(state)


def test_weight_is_a_buffer_outside_parameters():
    head = _sampled_head(num_classes=50)
    assert list(head.parameters()) == [] and "weight" in dict(head.named_buffers())
    head = _sampled_head(num_classes=50).to("cpu")
    assert head.weight.device.type == "cpu" and head.momentum_buffer.shape == (50, D)


def test_fp32_under_autocast():
    head = _sampled_head(num_classes=50, sample_rate=1.0)
    embeddings, labels = global_batch(total=6, num_classes=50)
    expected = head(embeddings.bfloat16().float(), labels)
    head.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head(embeddings.bfloat16(), labels)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("weight_dtype, state_dtype", [("bfloat16", "bfloat16"), ("float32", "int8")])
def test_reduced_precision_storage_keeps_results_on_a_synthetic_problem(weight_dtype, state_dtype):
    """Reduced-precision storage is opt-in; on a small separable problem it trains like fp32."""
    generator = torch.Generator().manual_seed(0)
    num_classes, per_class = 64, 4
    centers = torch.randn(num_classes, D, generator=generator)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    embeddings = centers[labels] + 0.3 * torch.randn(labels.numel(), D, generator=generator)
    results = {}
    for storage, (weight_storage, state_storage) in (("float32", ("float32", "float32")),
                                                     ("reduced", (weight_dtype, state_dtype))):
        head = PartialFC(losses.CombinedMarginLoss(16.0, 1.0, 0.2, 0.0), D, num_classes, sample_rate=0.5,
                         seed=1, weight_dtype=weight_storage, state_dtype=state_storage)
        head.configure_optimizer("sgd", momentum=0.9, weight_decay=5e-4)
        for _ in range(60):
            head(embeddings, labels).backward()
            head.step(0.05)
            head.zero_grad()
        with torch.no_grad():
            logits = F.normalize(embeddings) @ F.normalize(head.weight.float()).t()
            eval_loss = F.cross_entropy(16.0 * logits, labels).item()
            accuracy = (logits.argmax(1) == labels).float().mean().item()
        results[storage] = (eval_loss, accuracy)
    assert head.weight.dtype == partial_fc.WEIGHT_DTYPES[weight_dtype]
    assert head.momentum_buffer.dtype == partial_fc.STATE_DTYPES[state_dtype]
    assert results["float32"][1] > 0.9  # the problem is learnt ...
    assert results["reduced"][1] == pytest.approx(results["float32"][1], abs=0.02)  # ... equally well
    assert results["reduced"][0] == pytest.approx(results["float32"][0], rel=0.02)


def test_int8_momentum_steps_close_to_fp32_and_checkpoints_convert():
    embeddings, labels = global_batch(total=40, num_classes=300)
    heads = {}
    for state_dtype in ("float32", "int8"):
        head = PartialFC(make_margin("arcface"), D, 300, sample_rate=0.3, seed=SEED, state_dtype=state_dtype)
        head.configure_optimizer("sgd", momentum=0.9, weight_decay=5e-4)
        for step in range(3):
            _one_step(head, embeddings, labels)
            if step == 0:  # the first update uses the exact fp32 momentum, before it is stored
                first = head.weight.clone()
        heads[state_dtype] = (head, first)
    (exact, exact_first), (int8, int8_first) = heads["float32"], heads["int8"]
    assert torch.equal(int8_first, exact_first)
    assert int8.momentum_buffer.dtype == torch.int8 and int8.momentum_buffer_scale.shape == (300,)
    moved = (exact.weight - init_weight_rows(0, 300, D, SEED, 0.01)).abs().max()
    assert (int8.weight - exact.weight).abs().max() <= 0.02 * moved  # three steps: within 2% of the motion
    # Checkpoints: int8 -> fp32 head dequantizes; fp32 -> int8 head quantizes (within one int8 step per row).
    momentum = partial_fc.dequantize_rows_int8(int8.momentum_buffer, int8.momentum_buffer_scale)
    plain = PartialFC(make_margin("arcface"), D, 300, sample_rate=0.3)
    plain.configure_optimizer("sgd", momentum=0.9)
    plain.load_full_state_dict(int8.full_state_dict())
    torch.testing.assert_close(plain.momentum_buffer, momentum)
    back = PartialFC(make_margin("arcface"), D, 300, sample_rate=0.3, state_dtype="int8")
    back.configure_optimizer("sgd", momentum=0.9)
    back.load_full_state_dict(exact.full_state_dict())
    restored = partial_fc.dequantize_rows_int8(back.momentum_buffer, back.momentum_buffer_scale)
    step = exact.momentum_buffer.abs().amax(1, keepdim=True) / 127
    assert bool(((restored - exact.momentum_buffer).abs() <= step * 1.0001).all())
    with pytest.raises(PartialFCError, match=r"state_dtype='int8' holds SGD momentum only; optimizer='adamw'"):
        back.configure_optimizer("adamw")


def test_per_step_rounding_noise_is_unbiased_and_differs_between_chunks():
    head = PartialFC(make_margin("arcface"), D, 50, weight_dtype="bfloat16", update_chunk_rows=64)
    values = torch.full((64, D), 1.0 + 2.0 ** -10)  # a quarter of a bf16 ulp above 1.0
    means, windows = [], []
    for _ in range(400):
        head.storage.new_step()  # what step() does: one pool per step ...
        windows = [head.storage.rounding_noise(values) for _ in range(2)]  # ... and a window of it per chunk
        means.append(partial_fc.stochastic_round(values, torch.bfloat16, None, noise=windows[0]).float().mean())
    assert windows[0].shape == (64, D) and windows[0].min() >= 0 and windows[0].max() < 2 ** 16
    assert torch.stack(means).mean().item() == pytest.approx(1.0 + 2.0 ** -10, abs=5e-5)  # round-to-nearest: 1.0
    assert not torch.equal(windows[0], windows[1])
