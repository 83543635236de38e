"""metric_losses.py (TripletLoss, re-exported by losses.py): the three mining rules against brute-force
loops, values and gradients, the sqrt at 0, no-triplet batches, errors, and 1 vs 2 gloo ranks."""

import pytest
import torch
import torch.nn.functional as F
from easydict import EasyDict

from losses import MarginLossError
from metric_losses import TripletLoss, build_triplet_loss
from tests.spawn_helpers import run_ranks

MARGIN = 0.2


def _batch(seed=0, identities=4, per_identity=3, dim=8):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(identities).repeat_interleave(per_identity)
    labels = labels[torch.randperm(len(labels), generator=generator)]
    # Rows near their identity's centre, so all three cases (easy, semi-hard, hard) occur.
    centres = torch.randn(identities, dim, generator=generator)
    embeddings = centres[labels] + 0.8 * torch.randn(len(labels), dim, generator=generator)
    return embeddings.double(), labels


def _reference(embeddings, labels, mining, margin=MARGIN, squared=True):
    """Direct loops over (a, p, n) on ||a - b||^2 of the normalised rows, in float64."""
    x = F.normalize(embeddings.double(), dim=1)
    n = len(labels)

    def d(i, j):
        value = ((x[i] - x[j]) ** 2).sum()
        return value if squared else (value.sqrt() if i != j and value > 0 else value * 0)

    lab = labels.tolist()
    terms = []
    for a in range(n):
        pos = [p for p in range(n) if p != a and lab[p] == lab[a]]
        neg = [k for k in range(n) if lab[k] != lab[a]]
        if not pos or not neg:
            continue
        if mining == "batch_hard":
            hardest_p = max((d(a, p) for p in pos), key=lambda t: t.item())
            hardest_n = min((d(a, k) for k in neg), key=lambda t: t.item())
            terms.append(torch.clamp(hardest_p - hardest_n + margin, min=0))
            continue
        for p in pos:
            d_ap = d(a, p)
            if mining == "semihard":
                farther = [d(a, k) for k in neg if d(a, k).item() > d_ap.item()]
                d_an = min(farther, key=lambda t: t.item()) if farther else max((d(a, k) for k in neg), key=lambda t: t.item())
                terms.append(torch.clamp(d_ap - d_an + margin, min=0))
            else:
                terms.extend(d_ap - d(a, k) + margin for k in neg)
    if mining == "all":
        terms = [t for t in terms if t.item() > 0]
    if not terms:
        return embeddings.sum() * 0
    return torch.stack(terms).mean()


@pytest.mark.parametrize("mining", ["semihard", "batch_hard", "all"])
@pytest.mark.parametrize("squared", [True, False])
def test_value_and_gradient_match_brute_force(mining, squared):
    for seed in range(3):
        embeddings, labels = _batch(seed)
        mine = embeddings.clone().requires_grad_(True)
        loss = TripletLoss(MARGIN, mining, squared)(mine, labels)
        loss.backward()
        ref_input = embeddings.clone().requires_grad_(True)
        ref = _reference(ref_input, labels, mining, squared=squared)
        ref.backward()
        assert loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
        assert loss.item() > 0  # the batch is built so every rule has active triplets
        assert torch.allclose(mine.grad, ref_input.grad, rtol=1e-4, atol=1e-6)


def test_semihard_picks_the_nearest_farther_negative_else_the_farthest():
    # 1-D angles on the unit circle make every distance easy to read: d = 2 - 2 cos(angle difference).
    angles = torch.tensor([0.0, 0.3, 0.5, 0.9, 0.05])
    labels = torch.tensor([0, 0, 1, 1, 2])
    x = torch.stack([angles.cos(), angles.sin()], dim=1).double()
    loss_fn = TripletLoss(0.5, "semihard")
    loss = loss_fn(x, labels)
    dist = lambda i, j: 2 - 2 * torch.cos(angles[i] - angles[j]).double()  # noqa: E731
    # (anchor, positive, chosen negative), by angle gaps: a0 p1 gap 0.3, negatives 0.5/0.9/0.05 -> idx 2;
    # a1 p0 gap 0.3, negatives 0.2/0.6/0.25 -> idx 3; a2 p3 gap 0.4, negatives 0.5/0.2/0.45 -> idx 4;
    # a3 p2 gap 0.4, negatives 0.9/0.6/0.85 -> idx 1.
    expected = [dist(a, p) - dist(a, n) + 0.5 for a, p, n in ((0, 1, 2), (1, 0, 3), (2, 3, 4), (3, 2, 1))]
    expected = torch.stack([e.clamp_min(0) for e in expected]).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # No farther negative: the anchor falls back to its farthest negative (a hard triplet).
    y = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    fallback = TripletLoss(0.2, "semihard")(y, torch.tensor([0, 0, 1]))
    assert fallback.item() == pytest.approx(4.0 - 2.0 + 0.2, rel=1e-6)  # both pairs: d_ap 4, d_an 2
    stats = loss_fn.last_stats
    assert stats["triplets"] == 4.0 and 0 < stats["active_fraction"] <= 1


@pytest.mark.parametrize("mining", ["semihard", "batch_hard", "all"])
def test_no_valid_triplet_is_a_connected_zero(mining):
    for labels in (torch.tensor([3, 3, 3, 3]), torch.tensor([0, 1, 2, 3])):
        x = torch.randn(4, 5, requires_grad=True)
        loss = TripletLoss(0.2, mining)(x, labels)
        loss.backward()
        assert loss.item() == 0.0
        assert x.grad is not None and torch.count_nonzero(x.grad) == 0


def test_euclidean_sqrt_at_zero_distance_is_finite():
    # Duplicate rows give d(a, p) = 0: the Euclidean form must not produce inf * 0 = nan.
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], requires_grad=True)
    for mining in ("semihard", "batch_hard", "all"):
        loss = TripletLoss(0.2, mining, squared=False)(x, torch.tensor([0, 0, 1, 1]))
        loss.backward()
        assert torch.isfinite(x.grad).all()
        assert loss.item() == 0.0  # d_an = sqrt(2) > 0 + 0.2: all easy
        x.grad = None


def test_all_mining_averages_only_active_triplets_and_stats():
    angles = torch.tensor([0.0, 0.2, 1.0, 3.0])
    x = torch.stack([angles.cos(), angles.sin()], dim=1)
    loss_fn = TripletLoss(0.2, "all")
    loss = loss_fn(x, torch.tensor([0, 0, 1, 2]))
    d = lambda i, j: 2 - 2 * torch.cos(angles[i] - angles[j])  # noqa: E731
    hinges = [d(a, p) - d(a, n) + 0.2 for a, p in ((0, 1), (1, 0)) for n in (2, 3)]
    active = [h for h in hinges if h > 0]
    assert len(active) == 0 or loss.item() == pytest.approx(torch.stack(active).mean().item(), rel=1e-5)
    assert loss_fn.last_stats["triplets"] == 4.0
    assert loss_fn.last_stats["active_fraction"] == pytest.approx(len(active) / 4)
    assert loss_fn.last_stats["mean_ap"] == pytest.approx(d(0, 1).item(), rel=1e-5)


def test_bad_settings_name_the_config_keys():
    with pytest.raises(MarginLossError, match="triplet_mining.*hardest"):
        TripletLoss(0.2, "hardest")
    for margin in (0.0, -0.1, True):
        with pytest.raises(MarginLossError, match="triplet_margin"):
            TripletLoss(margin)
    with pytest.raises(MarginLossError, match="triplet_margin"):
        build_triplet_loss(EasyDict(triplet_margin=0, triplet_mining="all"))
    built = build_triplet_loss(EasyDict(triplet_margin=0.3, triplet_mining="batch_hard", triplet_squared=False))
    assert (built.margin, built.mining, built.squared) == (0.3, "batch_hard", False)
    with pytest.raises(MarginLossError, match="labels"):
        TripletLoss()(torch.randn(4, 3), torch.zeros(3, dtype=torch.long))


def _distributed_worker(rank, world_size, embeddings, labels, sizes):
    start = sum(sizes[:rank])
    out = {}
    for mining in ("semihard", "batch_hard", "all"):
        mine = embeddings[start:start + sizes[rank]].clone().requires_grad_(True)
        loss_fn = TripletLoss(MARGIN, mining)
        loss = loss_fn(mine, labels[start:start + sizes[rank]])
        loss.backward()
        # numpy, not a tensor: torch's queue would share the tensor through this (exiting) process's fds
        out[mining] = (loss.item(), mine.grad.numpy(), loss_fn.last_stats)
    return out


def test_two_ranks_equal_one_process_with_the_global_batch(port):
    embeddings, labels = _batch(seed=5, identities=5, per_identity=4)
    embeddings = embeddings.float()
    sizes = [11, 9]  # unequal local batches (a short last batch)
    results = run_ranks(_distributed_worker, 2, port, embeddings, labels, sizes, timeout=90)
    for mining in ("semihard", "batch_hard", "all"):
        one = embeddings.clone().requires_grad_(True)
        loss_fn = TripletLoss(MARGIN, mining)
        expected = loss_fn(one, labels)
        expected.backward()
        for result in results:
            value, _, stats = result[mining]
            assert value == pytest.approx(expected.item(), rel=1e-5)  # every rank reports the global loss
            assert stats == pytest.approx(loss_fn.last_stats, rel=1e-5)
        # Each rank's gradient w.r.t. its own rows; the trainer's DDP hook SUMS parameter gradients, which
        # for per-sample contributions is the concatenation: it must be the one-process gradient.
        grads = torch.cat([torch.from_numpy(result[mining][1]) for result in results])
        assert torch.allclose(grads, one.grad, rtol=1e-4, atol=1e-7), mining
        assert one.grad.abs().sum() > 0
