"""Sample order for training: the resumable seeded shuffle and the P x K identity sampler, each also weighted
per source (``rec_weights``).

Both split a global sample stream across ranks and keep their position as ``consumed`` global
samples, so a checkpoint continues mid-epoch on another world size. ``build_sampler`` picks the
one ``cfg.sampler`` names; ``dataset.get_dataloader`` links it to the dataset's flip epoch.
"""
from __future__ import annotations

import logging
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

from utils.data.datasets import RecordDataset
from utils.data.errors import DatasetError
from utils.run.plan import EpochShape, epoch_shape

logger = logging.getLogger(__name__)


class ResumableDistributedSampler(Sampler[int]):
    """Seeded per-epoch shuffle split across ranks, resumable mid-epoch on any world size.

    Rank r yields ``rest[r::world_size]`` of ``rest = perm[consumed:]``, cut so every rank yields
    the same count. ``consumed`` counts global samples, so a checkpoint taken with one world size
    continues exactly with another. Given ``batch_size`` (per rank) and ``accumulation``, an epoch is
    its whole global batches (drop_last), and an epoch resumed off that grid ends with a short step
    (:meth:`epoch_shape`): the loader then needs no drop_last.
    """

    def __init__(self, num_samples: int, rank: int, world_size: int, seed: int, shuffle: bool = True,
                 batch_size: int | None = None, accumulation: int = 1) -> None:
        if num_samples < 1:
            raise DatasetError(f"sampler: num_samples={num_samples}, expected at least 1 sample")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DatasetError(f"sampler: rank={rank} world_size={world_size}, expected 0 <= rank < world_size")
        self.num_samples, self.rank, self.world_size = int(num_samples), int(rank), int(world_size)
        self.seed, self.shuffle = int(seed), shuffle
        self.batch_size, self.accumulation = batch_size, int(accumulation)
        self.epoch, self.consumed = 0, 0
        self._resume_epoch: int | None = None
        self.shared_epoch: torch.Tensor | None = None  # get_dataloader links the dataset's flip epoch

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` (reshuffles); keeps the consumed count only when resuming into that epoch."""
        if self._resume_epoch is None or self._resume_epoch != epoch:
            self.consumed = 0
        self._resume_epoch = None
        self.epoch = int(epoch)
        if self.shared_epoch is not None:
            self.shared_epoch.fill_(self.epoch)

    def advance(self, num_global_samples: int) -> None:
        """Count ``num_global_samples`` more samples as consumed (all ranks together)."""
        self.consumed = min(self.consumed + int(num_global_samples), self.num_samples)

    def epoch_shape(self) -> EpochShape:
        """The optimizer steps left in this epoch from ``consumed`` (``batch_size`` must be set)."""
        if self.batch_size is None:
            raise DatasetError("sampler: epoch_shape() needs the sampler's batch_size")
        global_batch = self.batch_size * self.world_size * self.accumulation
        epoch_end = self.num_samples // global_batch * global_batch
        return epoch_shape(epoch_end - self.consumed, self.world_size, self.batch_size, self.accumulation)

    def _per_rank(self) -> int:
        if self.batch_size is None:
            return (self.num_samples - self.consumed) // self.world_size
        return self.epoch_shape().samples_per_rank

    def epoch_order(self) -> torch.Tensor:
        """This epoch's global sample order: a function of (seed, epoch) alone, so any world size continues it."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            return torch.randperm(self.num_samples, generator=generator)
        return torch.arange(self.num_samples)

    def _indices(self) -> torch.Tensor:
        rest = self.epoch_order()[self.consumed:]
        return rest[self.rank::self.world_size][:self._per_rank()]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices().tolist())

    def __len__(self) -> int:
        return self._per_rank()

    def state_dict(self) -> dict[str, int]:
        """Epoch, seed and samples consumed: enough to continue on any world size."""
        return {"epoch": self.epoch, "seed": self.seed, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from :meth:`state_dict`'s output; a missing key is a DatasetError."""
        missing = {"epoch", "seed", "consumed"} - set(state)
        if missing:
            raise DatasetError(f"sampler state: missing keys {sorted(missing)}, expected epoch, seed, consumed")
        if not 0 <= int(state["consumed"]) <= self.num_samples:
            raise DatasetError(f"sampler state: consumed={state['consumed']} does not fit a dataset of "
                               f"{self.num_samples} samples (was the data changed?)")
        if int(state["seed"]) != self.seed:
            logger.warning("sampler: checkpoint seed %s differs from config seed %s; keeping the checkpoint's "
                           "so the epoch continues in the same order", state["seed"], self.seed)
        self.epoch, self.seed, self.consumed = int(state["epoch"]), int(state["seed"]), int(state["consumed"])
        self._resume_epoch = self.epoch


def weighted_quotas(weights: Any, total: int) -> np.ndarray:
    """``total`` split in proportion to ``weights`` by largest remainders: the quotas add up to ``total`` exactly."""
    exact = np.asarray(weights, dtype=np.float64) / float(np.sum(weights)) * int(total)
    quotas = np.floor(exact).astype(np.int64)
    for extra in np.argsort(-(exact - quotas), kind="stable")[:int(total) - int(quotas.sum())]:
        quotas[extra] += 1
    return quotas


class WeightedSourceSampler(ResumableDistributedSampler):
    """``rec_weights``: an epoch of ``num_samples`` samples (the union's size) of which source i gives its
    weight's share (largest-remainder rounding, so the quotas add up exactly).

    Source i's samples come from an endless stream of its own shuffles (cycle c seeded by (seed, i, c)); epoch
    e takes positions [e*q_i, (e+1)*q_i) of it, so a down-weighted source still shows every image over the
    epochs and an up-weighted one repeats whole shuffles. The quotas are then shuffled together with (seed,
    epoch): the order is a function of (seed, epoch) alone, and the position (``consumed``, in global
    samples) continues on any world size, as for the plain shuffle.
    """

    def __init__(self, source_starts: Any, weights: list[float], rank: int, world_size: int, seed: int,
                 batch_size: int | None = None, accumulation: int = 1) -> None:
        starts = np.asarray(source_starts, dtype=np.int64)
        super().__init__(int(starts[-1]), rank, world_size, seed, batch_size=batch_size, accumulation=accumulation)
        self.starts, self.sizes = starts[:-1], np.diff(starts)
        self.quotas = weighted_quotas(weights, self.num_samples)

    def _source_samples(self, source: int) -> np.ndarray:
        size, quota = int(self.sizes[source]), int(self.quotas[source])
        first, last = self.epoch * quota, (self.epoch + 1) * quota  # positions in the source's stream
        cycles = [np.random.default_rng([self.seed, source, cycle, 0x5753]).permutation(size)
                  for cycle in range(first // size, -(-last // size))]
        stream = np.concatenate(cycles) if cycles else np.zeros(0, np.int64)
        offset = (first // size) * size
        return self.starts[source] + stream[first - offset:last - offset]

    def epoch_order(self) -> torch.Tensor:
        """The quotas of every source, shuffled together with (seed, epoch)."""
        chosen = np.concatenate([self._source_samples(i) for i in range(len(self.sizes))])
        order = np.random.default_rng([self.seed, self.epoch, 0x5745]).permutation(len(chosen))
        return torch.from_numpy(chosen[order])


# ---------------------------------------------------------------- P x K identity sampler (triplet loss)
def dataset_labels(dataset: Any) -> np.ndarray:
    """int64 class of every sample of ``dataset`` (its ``labels()``; a generated identity set's from its
    synthetic.json without reading the records)."""
    labels = None
    root = getattr(dataset, "root", None)
    if isinstance(dataset, RecordDataset) and root:
        from utils.data.synthetic import identity_set_labels

        labels = identity_set_labels(root)
    if labels is None:
        if not callable(getattr(dataset, "labels", None)):
            raise DatasetError(f"config key 'sampler'='pk': {type(dataset).__name__} cannot list its labels")
        logger.info("pk sampler: reading the label of every sample of %s", root or type(dataset).__name__)
        labels = dataset.labels()
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (len(dataset),):
        raise DatasetError(f"{root or type(dataset).__name__}: {labels.shape[0]} labels for {len(dataset)} samples")
    return labels


def identity_groups(rng: np.random.Generator, labels: np.ndarray, k: int, num_groups: int) -> np.ndarray:
    """Groups of K positions into ``labels``, one identity each, at least ``num_groups`` of them (whole rounds).

    Rounds, each a shuffled order of all identities; identity i's r-th appearance takes the next K of its images in
    a shuffled cycle (fewer than K images: some repeat, drawn with replacement). Round r+1 starts with M = n // 2
    identities absent from round r's last M, so ANY M consecutive groups hold M distinct identities.
    """
    identities, image_counts = np.unique(labels, return_counts=True)
    n, half = len(identities), len(identities) // 2
    # Images grouped by identity (np.unique's order), shuffled within each identity.
    images = np.lexsort((rng.random(len(labels)), labels))
    starts = np.concatenate([[0], np.cumsum(image_counts)[:-1]])
    num_rounds = -(-int(num_groups) // n)
    rounds, recent = [], np.zeros(n, dtype=bool)
    for r in range(num_rounds):
        order = rng.permutation(n)
        if r:
            # Keep the previous round's last M identities out of this round's first M.
            fresh, stale = order[~recent[order]], order[recent[order]]
            rest = np.concatenate([fresh[half:], stale])
            order = np.concatenate([fresh[:half], rng.permutation(rest)])
            recent[:] = False
        recent[order[n - half:]] = True
        rounds.append(order)
    groups = np.concatenate(rounds)                              # identity slot of each group
    appearance = np.repeat(np.arange(num_rounds), n)             # = round: once per round
    offsets = (appearance[:, None] * k + np.arange(k)[None, :]) % image_counts[groups][:, None]
    return images[starts[groups][:, None] + offsets]


class PKSampler(ResumableDistributedSampler):
    """Global batches of P identities x K images (P = batch_size * world_size / K), for triplet mining.

    The epoch's sample stream depends only on (labels, K, seed, epoch), never on the batch size or the
    world size: rounds, each a shuffled order of all identities, and identity i's r-th appearance takes
    the next K of its images in an epoch-shuffled cycle (an identity with fewer than K images repeats
    some: drawn with replacement). Round r+1 starts with M = n_identities // 2 identities absent from
    round r's last M, so ANY P <= M consecutive groups hold P distinct identities; hence a checkpoint
    (``consumed`` global samples, always a multiple of K) resumes the same stream on another world
    size or batch size. An epoch is floor(num_images / global_batch) global batches, as for the
    random sampler (about one pass's worth of samples; identities are drawn uniformly, as in
    Hermans et al.'s P x K batches, not in proportion to their image counts).
    Rank r yields samples [r*B, (r+1)*B) of every global batch: whole identities when K divides
    batch_size, otherwise the identity at a rank boundary is split between two ranks (the triplet
    loss gathers the global batch, so the mining is the same either way).
    """

    def __init__(self, labels: Any, images_per_identity: int, batch_size: int, rank: int, world_size: int,
                 seed: int) -> None:
        labels = np.asarray(labels, dtype=np.int64)
        super().__init__(len(labels), rank, world_size, seed)
        k, batch_size = int(images_per_identity), int(batch_size)
        global_batch = batch_size * self.world_size
        if k < 2:
            raise DatasetError(f"config key 'images_per_identity'={images_per_identity!r}: sampler='pk' needs "
                               f"K >= 2 images per identity (positive pairs)")
        if batch_size < 1 or global_batch % k:
            raise DatasetError(f"config keys 'images_per_identity'={k} and 'batch_size'={batch_size}: the global "
                               f"batch {global_batch} (batch_size x {self.world_size} ranks) must be a multiple of K")
        self.identities, self.image_counts = np.unique(labels, return_counts=True)
        n = len(self.identities)
        if n < 2:
            raise DatasetError(f"config key 'sampler'='pk': the data has {n} identity, need at least 2")
        self.k, self.batch_size, self.global_batch = k, batch_size, global_batch
        self.p = global_batch // k
        if self.p > n // 2:
            raise DatasetError(f"config keys 'images_per_identity'={k} and 'batch_size'={batch_size}: P={self.p} "
                               f"identities per global batch needs at least {2 * self.p} identities, the data has {n}")
        self.labels = labels
        self.epoch_samples = (len(labels) // global_batch) * global_batch
        if self.epoch_samples == 0:
            raise DatasetError(f"config key 'batch_size'={batch_size}: the global batch {global_batch} is larger "
                               f"than the {len(labels)} images")
        few = int((self.image_counts < k).sum())
        if few:
            logger.info("pk sampler: %d of %d identities have fewer than K=%d images; their images repeat "
                        "(drawn with replacement)", few, n, k)
        self._cache: tuple[tuple[int, int], np.ndarray] | None = None

    def stream(self) -> np.ndarray:
        """This epoch's global sample order (at least ``epoch_samples`` indices; cached per epoch/seed)."""
        key = (self.seed, self.epoch)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self._build_stream())
        return self._cache[1]

    def _build_stream(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch, 0x504B])
        return identity_groups(rng, self.labels, self.k, -(-len(self.labels) // self.k)).reshape(-1)

    def _indices(self) -> torch.Tensor:
        rest = self.stream()[self.consumed:self.epoch_samples]
        batches = len(rest) // self.global_batch
        rest = rest[:batches * self.global_batch].reshape(batches, self.global_batch)
        mine = rest[:, self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        return torch.from_numpy(np.ascontiguousarray(mine).reshape(-1))

    def __len__(self) -> int:
        return max(0, self.epoch_samples - self.consumed) // self.global_batch * self.batch_size

    def epoch_shape(self) -> EpochShape:
        """Whole P x K global batches only (a short step would break the identity groups)."""
        micro_batches = len(self) // self.batch_size
        return EpochShape(micro_batches // self.accumulation, self.batch_size, self.accumulation)

    def state_dict(self) -> dict[str, int]:
        """epoch/seed/consumed like the random sampler, plus K (a different K changes the stream)."""
        return {**super().state_dict(), "images_per_identity": self.k}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue the checkpoint's epoch; ``consumed`` is in global samples, so any world size works."""
        super().load_state_dict(state)
        if state.get("images_per_identity", self.k) != self.k:
            logger.warning("pk sampler: checkpoint has images_per_identity=%s, config %s; the rest of the epoch "
                           "follows a different order", state["images_per_identity"], self.k)


class WeightedPKSampler(PKSampler):
    """``sampler="pk"`` with ``rec_weights``: P x K global batches in which source i gives its weight's share of
    the identity groups, hence of the samples (every group is K samples).

    The stream covers ceil(num_images / K) groups, split over the sources by largest remainders. Source i's
    groups are its own P x K stream (:func:`identity_groups` over the identities of its samples, seeded by
    (seed, epoch, i)); its j-th group gets the key (j + u) / q_i, u uniform in [0, 1), and the sources' groups are
    merged in key order. So every prefix of the stream, an epoch's or a resumed one's, holds each source's share
    to within two groups, the mix is random, and the order depends only on (labels, sources, weights, K, seed,
    epoch): ranks, world size and resume work as for :class:`PKSampler`. A global batch of P groups holds at most
    min(P, (P + 2S) q_i / Q + 2) of source i's (S sources, Q groups): its identities are distinct while that is at
    most half of the source's identities, which the constructor checks. A group holds images of one source only:
    an identity that ``rec_identity_map`` merges across sources is drawn by each source that holds it, from that
    source's images, and those samples count toward that source's share (two of its groups may meet in one
    batch: the triplet loss sees one identity with 2K images).
    """

    def __init__(self, labels: Any, source_starts: Any, weights: list[float], images_per_identity: int,
                 batch_size: int, rank: int, world_size: int, seed: int, names: list[str] | None = None) -> None:
        super().__init__(labels, images_per_identity, batch_size, rank, world_size, seed)
        self.starts = np.asarray(source_starts, dtype=np.int64)
        if len(self.starts) != len(weights) + 1 or self.starts[-1] != len(self.labels):
            raise DatasetError(f"pk sampler: source starts {self.starts.tolist()} do not cover {len(self.labels)} "
                               f"samples in {len(weights)} sources")
        total = -(-len(self.labels) // self.k)
        self.group_quotas = weighted_quotas(weights, total)
        names = names or [f"source {i}" for i in range(len(weights))]
        for i, quota in enumerate(self.group_quotas.tolist()):
            identities = len(np.unique(self.labels[self.starts[i]:self.starts[i + 1]]))
            most = min(self.p, (self.p + 2 * len(weights)) * quota // total + 2)
            if quota and most > identities // 2:
                share = weights[i] / sum(weights)
                raise DatasetError(f"config keys 'rec_weights' and 'sampler'='pk': {names[i]} has {identities} "
                                   f"identities; at a share of {share:.2%} a global batch of P={self.p} identities "
                                   f"holds up to {most} of them, which needs at least {2 * most} (lower its weight, "
                                   f"K or the batch size)")

    def _build_stream(self) -> np.ndarray:
        mix = np.random.default_rng([self.seed, self.epoch, 0x574B])
        keys, groups = [], []
        for i, quota in enumerate(self.group_quotas.tolist()):
            if quota:
                rng = np.random.default_rng([self.seed, self.epoch, i, 0x5750])
                low, high = self.starts[i], self.starts[i + 1]
                groups.append(low + identity_groups(rng, self.labels[low:high], self.k, quota)[:quota])
                keys.append((np.arange(quota) + mix.random(quota)) / quota)
        order = np.argsort(np.concatenate(keys), kind="stable")
        return np.concatenate(groups)[order].reshape(-1)


SAMPLERS = ("random", "pk")


def build_sampler(cfg: Any, dataset: Any, rank: int, world_size: int) -> ResumableDistributedSampler:
    """The sampler ``cfg.sampler`` names: "random" (seeded shuffle) or "pk" (P identities x K images), each
    weighted per source when the dataset has ``rec_weights``."""
    kind = cfg.get("sampler", "random")
    weights = getattr(dataset, "source_weights", None)
    if kind == "random":
        steps = dict(batch_size=int(cfg.batch_size), accumulation=int(cfg.get("gradient_acc", 1)))
        if weights is not None:
            return WeightedSourceSampler(dataset.source_starts, weights, rank, world_size, cfg.seed, **steps)
        return ResumableDistributedSampler(len(dataset), rank, world_size, cfg.seed, **steps)
    if kind == "pk":
        pk = (cfg.get("images_per_identity", 0), int(cfg.batch_size), rank, world_size, int(cfg.seed))
        if weights is not None:
            names = [source.name for source in dataset.sources]
            sampler = WeightedPKSampler(dataset_labels(dataset), dataset.source_starts, weights, *pk, names=names)
        else:
            sampler = PKSampler(dataset_labels(dataset), *pk)
        sampler.accumulation = int(cfg.get("gradient_acc", 1))
        return sampler
    raise DatasetError(f"config key 'sampler'={kind!r}: expected one of {', '.join(SAMPLERS)}")
