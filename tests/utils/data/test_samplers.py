"""utils/data/samplers.py's P x K sampler: batch composition, determinism, rank split, mid-epoch resume on another
world size, errors, the labels of every dataset kind, and get_dataloader with sampler='pk'."""
import numpy as np
import pytest
import torch
from easydict import EasyDict

from dataset import get_dataloader
from utils.data.datasets import ImageFolderDataset, RandomTensorDataset, RecordDataset
from utils.data.samplers import PKSampler, ResumableDistributedSampler, build_sampler, dataset_labels
from utils.data.errors import DatasetError
from utils.data.synthetic import identity_set_labels, make_identity_set


def _labels(seed=0, identities=30):
    # Uneven identities: 1..12 images each, so some have fewer than K and are drawn with replacement.
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 13, identities)
    labels = np.repeat(np.arange(identities) * 3 + 7, counts)  # sparse, non-contiguous class ids
    return labels[rng.permutation(len(labels))]


def _global_batches(labels, k, batch_size, world_size, seed=1, epoch=0, state=None, make=PKSampler):
    """Per global batch, the concatenation of every rank's slice; checks len() on the way."""
    per_rank = []
    for rank in range(world_size):
        sampler = make(labels, k, batch_size, rank, world_size, seed)
        if state is not None:
            sampler.load_state_dict(state)
        sampler.set_epoch(epoch)
        out = list(sampler)
        assert len(out) == len(sampler)
        per_rank.append(np.asarray(out).reshape(-1, batch_size))
    return np.concatenate(per_rank, axis=1)


@pytest.mark.parametrize("k,batch_size,world_size", [(4, 16, 1), (4, 8, 2), (2, 6, 3), (3, 6, 2), (4, 6, 2)])
def test_every_global_batch_is_p_identities_times_k(k, batch_size, world_size):
    labels = _labels()
    batches = _global_batches(labels, k, batch_size, world_size)
    p = batch_size * world_size // k
    assert len(batches) == len(labels) // (batch_size * world_size)  # floor(N / global batch) batches
    for batch in batches:
        groups = labels[batch].reshape(p, k)
        assert (groups == groups[:, :1]).all()               # K consecutive samples of one identity
        assert len(set(groups[:, 0].tolist())) == p            # P different identities
        counts = np.bincount(labels)
        for group, indices in zip(groups[:, 0], batch.reshape(p, k)):
            # An identity with >= K images gives K different images; fewer: all of its images appear.
            assert len(set(indices.tolist())) == min(k, counts[group])
    if batch_size % k == 0:  # whole identities per rank
        rank_slices = batches.reshape(len(batches), world_size, batch_size)
        for batch in rank_slices:
            for part in batch:
                assert (labels[part].reshape(-1, k) == labels[part].reshape(-1, k)[:, :1]).all()


def test_deterministic_per_seed_and_epoch_and_covers_the_images():
    labels = _labels()
    first = _global_batches(labels, 4, 16, 1, seed=3, epoch=2)
    assert np.array_equal(first, _global_batches(labels, 4, 16, 1, seed=3, epoch=2))
    assert not np.array_equal(first, _global_batches(labels, 4, 16, 1, seed=3, epoch=3))
    assert not np.array_equal(first, _global_batches(labels, 4, 16, 1, seed=4, epoch=2))
    # Identities are drawn uniformly: every identity shows up in an epoch (30 identities, ~12 batches of 4).
    assert set(labels[first.reshape(-1)].tolist()) == set(labels.tolist())


def test_one_rank_and_two_ranks_give_the_same_global_batches():
    labels = _labels(seed=2)
    one = _global_batches(labels, 4, 16, 1)
    two = _global_batches(labels, 4, 8, 2)
    four = _global_batches(labels, 4, 4, 4)
    assert np.array_equal(one, two) and np.array_equal(one, four)


def test_resume_mid_epoch_on_another_world_size_continues_the_stream():
    labels = _labels(seed=4, identities=40)
    runners = [PKSampler(labels, 4, 8, rank, 2, seed=9) for rank in range(2)]
    for sampler in runners:
        sampler.set_epoch(1)
        for _ in range(3):
            sampler.advance(8 * 2)
    state = runners[0].state_dict()
    assert state == {"epoch": 1, "seed": 9, "consumed": 48, "images_per_identity": 4}
    uninterrupted = _global_batches(labels, 4, 8, 2, seed=9, epoch=1).reshape(-1)
    # Resume on 3 ranks of 8 (global batch 24, P = 6): the same sample stream from sample 48 on,
    # still P distinct identities x K per batch although the batch boundaries moved.
    resumed = _global_batches(labels, 4, 8, 3, seed=123, epoch=1, state=state)
    stream = PKSampler(labels, 4, 8, 0, 1, seed=9)
    stream.set_epoch(1)
    assert np.array_equal(uninterrupted, stream.stream()[:len(uninterrupted)])
    assert np.array_equal(resumed.reshape(-1), stream.stream()[48:48 + resumed.size])
    assert len(resumed) == (len(labels) // 24 * 24 - 48) // 24
    for batch in resumed:
        groups = labels[batch].reshape(6, 4)
        assert (groups == groups[:, :1]).all() and len(set(groups[:, 0].tolist())) == 6
    # The next epoch starts from the beginning.
    sampler = PKSampler(labels, 4, 8, 0, 3, seed=9)
    sampler.load_state_dict(state)
    sampler.set_epoch(2)
    assert sampler.consumed == 0 and len(sampler) == len(labels) // 24 * 8


def test_errors_name_the_config_keys():
    labels = _labels()
    with pytest.raises(DatasetError, match=r"'images_per_identity'=3 and 'batch_size'=8"):
        PKSampler(labels, 3, 8, 0, 1, 0)
    with pytest.raises(DatasetError, match=r"images_per_identity'=1"):
        PKSampler(labels, 1, 8, 0, 1, 0)
    with pytest.raises(DatasetError, match=r"1 identity, need at least 2"):
        PKSampler(np.zeros(20, dtype=np.int64), 2, 4, 0, 1, 0)
    with pytest.raises(DatasetError, match=r"P=16 identities per global batch needs at least 32"):
        PKSampler(labels, 2, 16, 0, 2, 0)
    with pytest.raises(DatasetError, match=r"'sampler'='balanced'"):
        build_sampler(EasyDict(sampler="balanced", seed=0, batch_size=8), RandomTensorDataset(16, 4, 32), 0, 1)
    with pytest.raises(DatasetError, match=r"images_per_identity'=0"):
        build_sampler(EasyDict(sampler="pk", seed=0, batch_size=8), RandomTensorDataset(16, 4, 32), 0, 1)


def test_labels_of_every_dataset_kind(tmp_path):
    synthetic = RandomTensorDataset(num_image=10, num_classes=4, image_size=32)
    assert dataset_labels(synthetic).tolist() == [synthetic[i][1] for i in range(10)]
    import cv2

    for name, count in (("bob", 2), ("alice", 3)):
        (tmp_path / "folder" / name).mkdir(parents=True)
        for i in range(count):
            cv2.imwrite(str(tmp_path / "folder" / name / f"{i}.jpg"), np.zeros((8, 8, 3), np.uint8))
    folder = ImageFolderDataset(str(tmp_path / "folder"), image_size=8)
    assert dataset_labels(folder).tolist() == [folder.load(i)[1] for i in range(5)] == [0, 0, 0, 1, 1]
    generated = make_identity_set(str(tmp_path / "ids"), 3, 2, 0, 0, seed=0, image_size=32)
    record = RecordDataset(generated, image_size=32)
    assert identity_set_labels(generated).tolist() == record.labels().tolist() == [0, 0, 1, 1, 2, 2]
    assert identity_set_labels(str(tmp_path / "folder")) is None
    assert dataset_labels(record).tolist() == [0, 0, 1, 1, 2, 2]


def test_get_dataloader_with_pk_batches():
    cfg = EasyDict(rec="synthetic", image_size=(32, 32), num_image=96, num_classes=12, seed=0, batch_size=8,
                   num_workers=0, sampler="pk", images_per_identity=4, skip_bad_records=True)
    loader = get_dataloader(cfg, 0, 1)
    assert isinstance(loader.sampler, PKSampler) and len(loader) == 12
    for images, labels in loader:
        assert images.dtype == torch.uint8 and labels.shape == (8,)
        assert labels[:4].unique().numel() == 1 and labels[4:].unique().numel() == 1 and labels[0] != labels[4]
    cfg.sampler = "random"
    assert type(get_dataloader(cfg, 0, 1).sampler) is ResumableDistributedSampler


def test_any_window_of_half_the_identities_is_distinct():
    # The property that lets a resume with another batch size keep P distinct identities per batch.
    for identities in (2, 3, 5, 8):
        for seed in range(5):
            rng = np.random.default_rng(seed)
            labels = np.repeat(np.arange(identities), rng.integers(1, 30, identities))
            sampler = PKSampler(labels, 2, 2, 0, 1, seed)
            sampler.set_epoch(seed)
            groups = labels[sampler.stream()].reshape(-1, 2)
            assert (groups[:, 0] == groups[:, 1]).all()
            half = identities // 2
            windows = np.lib.stride_tricks.sliding_window_view(groups[:, 0], half)
            assert all(len(set(window.tolist())) == half for window in windows)


def test_a_random_sampler_resumed_off_the_batch_grid_yields_the_short_step():
    # 96 samples, 1 rank at 8 consumed 200 - 192 = 8 of epoch 2; on 2 ranks of 8 the epoch's 88 samples left are
    # 5 steps of 16 and a short one of 2 x 4: every sample of the epoch is trained exactly once.
    from utils.data.samplers import ResumableDistributedSampler

    runners = [ResumableDistributedSampler(96, rank, 2, seed=3, batch_size=8) for rank in range(2)]
    for sampler in runners:
        sampler.load_state_dict({"epoch": 2, "seed": 3, "consumed": 8})
        sampler.set_epoch(2)
    yielded = [list(sampler) for sampler in runners]
    assert [len(part) for part in yielded] == [44, 44] and runners[0].epoch_shape().short_step == (4,)
    whole = ResumableDistributedSampler(96, 0, 1, seed=3)
    whole.set_epoch(2)
    assert sorted(yielded[0] + yielded[1]) == sorted(list(whole)[8:])
    # an epoch from its start is whole global batches only (what drop_last gave)
    fresh = ResumableDistributedSampler(100, 0, 2, seed=3, batch_size=8)
    fresh.set_epoch(0)
    assert len(list(fresh)) == 48 and fresh.epoch_shape().short_step == ()


# ---------------------------------------------------------------- rec_weights: each source's share of an epoch

def _weighted_epoch(starts, weights, world_size, epoch, seed=3, state=None):
    """Every rank's indices of one epoch, in the global order they are drawn (rank r holds rest[r::W])."""
    from utils.data.samplers import WeightedSourceSampler

    per_rank = []
    for rank in range(world_size):
        sampler = WeightedSourceSampler(starts, weights, rank, world_size, seed)
        if state is not None:
            sampler.load_state_dict(state)
        sampler.set_epoch(epoch)
        per_rank.append(list(sampler))
        assert len(per_rank[-1]) == len(sampler)
    return np.array(per_rank).T.reshape(-1)  # interleave back into the global order


@pytest.mark.parametrize("weights", [[1, 1], [3, 1, 1], [0.05, 0.9, 0.05]])
def test_each_source_gets_its_weight_of_every_epoch(weights):
    starts = [0, 480, 492, 1000][:len(weights) + 1]  # sizes 480, 12 (, 508): weights far from the sizes
    shares = np.asarray(weights, float) / sum(weights)
    drawn = np.concatenate([_weighted_epoch(starts, weights, 2, epoch) for epoch in range(4)])
    counts = np.array([((drawn >= lo) & (drawn < hi)).sum() for lo, hi in zip(starts[:-1], starts[1:])])
    assert len(drawn) == 4 * (starts[-1] // 2 * 2)  # an epoch is the union's size in samples
    assert np.abs(counts / len(drawn) - shares).max() < 0.01, (counts / len(drawn), shares)
    # a source's images come from back-to-back shuffles of it: a down-weighted source shows a new image before
    # any repeats, an up-weighted one repeats whole shuffles; either way no image is drawn 2 more times than another
    for lo, hi in zip(starts[:-1], starts[1:]):
        assert np.ptp(np.bincount(drawn[(drawn >= lo) & (drawn < hi)] - lo, minlength=hi - lo)) <= 1


def test_a_weighted_epoch_is_a_function_of_seed_and_epoch_and_resumes_on_any_world_size():
    from utils.data.samplers import WeightedSourceSampler

    starts, weights = [0, 480, 492], [1, 1]
    whole = WeightedSourceSampler(starts, weights, 0, 1, 3)
    whole.set_epoch(2)
    order = whole.epoch_order().numpy()
    assert np.array_equal(_weighted_epoch(starts, weights, 1, 2), order)
    assert np.array_equal(_weighted_epoch(starts, weights, 4, 2), order[:492 // 4 * 4])
    assert not np.array_equal(_weighted_epoch(starts, weights, 1, 3), order)  # another epoch, another draw
    # 96 global samples drawn on 2 ranks, the rest of the epoch on 3: exactly what was left
    state = {"epoch": 2, "seed": 3, "consumed": 96}
    rest = _weighted_epoch(starts, weights, 3, 2, state=state)
    assert np.array_equal(rest, order[96:96 + (492 - 96) // 3 * 3])


def test_loader_over_weighted_sources_draws_each_within_one_percent(insightface_fixtures):
    # Measured on the mxnet-written packs A (480 images) and D (12): rec_weights=[1, 1] on 2 ranks, 3 epochs.
    cfg = EasyDict(rec=[f"{insightface_fixtures}/A", f"{insightface_fixtures}/D"], rec_weights=[1, 1],
                   rec_identity_map=None, image_size=(112, 112), skip_bad_records=True, seed=0, num_classes=None,
                   num_image=None, sampler="random", batch_size=16, num_workers=0)
    labels = []
    for rank in range(2):
        loader = get_dataloader(cfg, rank, 2)
        for epoch in range(3):
            loader.sampler.set_epoch(epoch)
            labels += [batch_labels.numpy() for _, batch_labels in loader]
    labels = np.concatenate(labels)
    share_d = float((labels >= 40).mean())  # D's classes follow A's 40
    assert len(labels) == 3 * 2 * (246 // 16) * 16 and abs(share_d - 0.5) < 0.01, share_d
    # P x K over the same weights: D's 3 identities cannot fill half of every batch of P=4 distinct identities
    cfg.sampler, cfg.images_per_identity = "pk", 4
    with pytest.raises(DatasetError, match=f"'rec_weights' and 'sampler'='pk': {cfg.rec[1]} has 3 identities"):
        get_dataloader(cfg, 0, 1)


# ---------------------------------------------------------------- rec_weights with sampler="pk"

def _three_sources(seed=0, shared=0):
    """Labels of 3 sources back to back (40, 24, 60 identities; about 400, 80, 130 images), their starts.
    ``shared``: the first identities of source 1 carry source 0's ids (merged by an identity map)."""
    rng = np.random.default_rng(seed)
    labels, starts, first = [], [0], 0
    for identities, most in ((40, 20), (24, 6), (60, 4)):
        ids = first + np.arange(identities)
        if shared and len(labels) == 1:
            ids[:shared] = np.arange(shared)
        labels.append(rng.permutation(np.repeat(ids, rng.integers(1, most, identities))))
        starts.append(starts[-1] + len(labels[-1]))
        first += identities
    return np.concatenate(labels), starts


def _weighted_pk(starts, weights):
    from utils.data.samplers import WeightedPKSampler

    return lambda labels, *args: WeightedPKSampler(labels, starts, weights, *args)


def _check_pk_batches(labels, starts, batches, k):
    """Every global batch is P distinct identities x K images, each group of one identity from one source."""
    counts = {(int(source), int(label)): 0 for source, label in zip(np.searchsorted(starts, np.arange(len(labels)),
                                                                                    side="right") - 1, labels)}
    for source, label in zip(np.searchsorted(starts, np.arange(len(labels)), side="right") - 1, labels):
        counts[(int(source), int(label))] += 1
    for batch in batches:
        groups = batch.reshape(-1, k)
        assert (labels[groups] == labels[groups[:, :1]]).all()
        sources = np.searchsorted(starts, groups, side="right") - 1
        assert (sources == sources[:, :1]).all()                               # a group never mixes sources
        for group, source in zip(groups, sources[:, 0]):
            assert len(set(group.tolist())) == min(k, counts[(int(source), int(labels[group[0]]))])
    return np.searchsorted(starts, batches.reshape(-1), side="right") - 1


def test_weighted_pk_gives_each_source_its_share_in_p_times_k_batches():
    labels, starts = _three_sources()
    weights = [0.2, 0.5, 0.3]  # the 80-image source gets half of every epoch
    drawn = []
    for epoch in range(3):
        batches = _global_batches(labels, 4, 8, 2, seed=5, epoch=epoch, make=_weighted_pk(starts, weights))
        assert len(batches) == len(labels) // 16                  # an epoch is the union's size in samples
        for batch in batches:
            assert len(set(labels[batch.reshape(-1, 4)[:, 0]].tolist())) == 4   # P distinct identities
        sources = _check_pk_batches(labels, starts, batches, 4)
        shares = np.bincount(sources, minlength=3) / len(sources)
        assert np.abs(shares - weights).max() < 0.01, shares      # within 1% in every epoch
        drawn.append(batches)
    assert not np.array_equal(drawn[0], drawn[1])
    assert np.array_equal(drawn[2], _global_batches(labels, 4, 8, 2, seed=5, epoch=2,
                                                    make=_weighted_pk(starts, weights)))
    assert not np.array_equal(drawn[2], _global_batches(labels, 4, 8, 2, seed=6, epoch=2,
                                                        make=_weighted_pk(starts, weights)))
    # the down-weighted 400-image source's ~30 groups an epoch are one round: that many of its 40 identities
    firsts = labels[drawn[0].reshape(-1, 4)[:, 0]]
    assert 25 <= (firsts < 40).sum() == len(set(firsts[firsts < 40].tolist())) <= 40


def test_weighted_pk_is_the_same_stream_on_any_world_size_and_resumes_mid_epoch():
    labels, starts = _three_sources(seed=1)
    make = _weighted_pk(starts, [1, 3, 2])
    one = _global_batches(labels, 4, 16, 1, seed=9, epoch=1, make=make)
    assert np.array_equal(one, _global_batches(labels, 4, 8, 2, seed=9, epoch=1, make=make))
    assert np.array_equal(one, _global_batches(labels, 4, 4, 4, seed=9, epoch=1, make=make))
    # 3 global batches of 16 drawn on 2 ranks; the rest of the epoch on 2 ranks again, and on 3 ranks of 8
    runners = [make(labels, 4, 8, rank, 2, 9) for rank in range(2)]
    for sampler in runners:
        sampler.set_epoch(1)
        for _ in range(3):
            sampler.advance(16)
    state = runners[0].state_dict()
    assert state == {"epoch": 1, "seed": 9, "consumed": 48, "images_per_identity": 4}
    again = _global_batches(labels, 4, 8, 2, seed=0, epoch=1, state=state, make=make)
    assert np.array_equal(again, one.reshape(-1, 16)[3:])
    resumed = _global_batches(labels, 4, 8, 3, seed=0, epoch=1, state=state, make=make)
    assert len(resumed) == (len(labels) // 24 * 24 - 48) // 24
    assert np.array_equal(resumed.reshape(-1), one.reshape(-1)[48:48 + resumed.size])
    _check_pk_batches(labels, starts, resumed, 4)
    for batch in resumed:
        assert len(set(labels[batch.reshape(-1, 4)[:, 0]].tolist())) == 6


def test_weighted_pk_draws_a_merged_identity_from_each_source_s_own_images():
    # source 1's first 10 identities are source 0's (an identity map merged them): a group still takes one
    # source's images, so each source's samples keep its weight
    labels, starts = _three_sources(seed=2, shared=10)
    weights = [1, 1, 1]
    batches = _global_batches(labels, 2, 8, 1, seed=3, epoch=0, make=_weighted_pk(starts, weights))
    sources = _check_pk_batches(labels, starts, batches, 2)
    assert np.abs(np.bincount(sources, minlength=3) / len(sources) - 1 / 3).max() < 0.01
    merged = np.isin(labels[batches.reshape(-1)], np.arange(10))
    assert set(sources[merged].tolist()) == {0, 1}                  # the merged identities come from both


def test_weighted_pk_refuses_a_source_too_small_for_its_share():
    labels, starts = _three_sources()
    with pytest.raises(DatasetError, match=r"'rec_weights' and 'sampler'='pk': source 1 has 24 identities; at a "
                                           r"share of 80.\d+% a global batch of P=16 identities holds up to 16"):
        _weighted_pk(starts, [1, 8, 1])(labels, 4, 64, 0, 1, 0)


def test_weighted_pk_every_prefix_holds_the_shares_and_every_window_of_p_is_distinct():
    # What lets a resume at any position, with any batch size the constructor accepts, keep both promises.
    from utils.data.samplers import WeightedPKSampler

    checked = 0
    for seed in range(20):
        rng = np.random.default_rng(seed)
        sizes = [rng.integers(1, 15, int(n)) for n in rng.integers(6, 40, int(rng.integers(2, 5)))]
        labels = np.concatenate([first + np.repeat(np.arange(len(c)), c)
                                 for first, c in zip(np.cumsum([0] + [len(c) for c in sizes[:-1]]), sizes)])
        starts = np.cumsum([0] + [int(c.sum()) for c in sizes])
        k = int(rng.choice([2, 3, 4]))
        try:
            sampler = WeightedPKSampler(labels, starts, list(rng.random(len(sizes)) + 0.05), k,
                                        k * int(rng.integers(2, 7)), 0, 1, seed)
        except DatasetError:
            continue
        checked += 1
        sampler.set_epoch(seed)
        groups = sampler.stream().reshape(-1, k)
        sources = np.searchsorted(starts, groups[:, 0], side="right") - 1
        drawn = np.cumsum(np.eye(len(sizes))[sources], axis=0)
        due = np.arange(1, len(groups) + 1)[:, None] * sampler.group_quotas / len(groups)
        assert np.abs(drawn - due).max() <= 2
        assert (drawn[-1] == sampler.group_quotas).all()
        firsts = labels[groups[:, 0]]
        windows = np.lib.stride_tricks.sliding_window_view(firsts, sampler.p)
        assert all(len(set(window.tolist())) == sampler.p for window in windows)
    assert checked >= 12
