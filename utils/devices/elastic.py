"""Which attempt of an elastic run this is, agreed by every rank on every node.

torchrun's ``TORCHELASTIC_RESTART_COUNT`` is per node: only the agent whose worker failed counts the
failure, and a node that restarts because another node re-joined the rendezvous (a membership change)
counts nothing. Keyed on it, the process group's store prefix and the resume decision differ between
nodes after one node restarts (a hang in the rendezvous, or one node starting fresh while the other
resumes). Here rank 0 of each attempt takes the next generation number from the store torchrun keeps
for the whole job and hands it to the other ranks of its attempt; no per-node counter is involved.

Hand-over, through the store: every other rank posts a fresh token under its rank, rank 0 answers every
token it sees with the generation until all ranks of its attempt have confirmed. A token a dead rank of
an earlier attempt left behind is answered too, harmlessly: nobody confirms it.
"""
from __future__ import annotations

import datetime
import time
import uuid

import torch.distributed as dist

KEY = "arcscale/elastic"


class GenerationTimeout(RuntimeError):
    """The ranks of this attempt did not all arrive within the process-group timeout."""


def agree_on_generation(store: dist.Store, rank: int, world_size: int, timeout: datetime.timedelta,
                        poll_seconds: float = 0.02) -> int:
    """This attempt's generation (1 for the job's first process group, then 2, 3, ...), the same on every
    rank. Every rank calls it once per process, before joining the process group."""
    if rank != 0:
        token = uuid.uuid4().hex
        store.set(f"{KEY}/waiting/{rank}", token)
        answer = f"{KEY}/answer/{token}"
        try:
            store.wait([answer], timeout)
        except Exception as exc:  # torch raises DistStoreError (a RuntimeError) on a timeout
            raise GenerationTimeout(f"rank {rank}: rank 0 did not hand out the elastic generation within "
                                    f"{timeout} ({type(exc).__name__})") from None
        generation = int(store.get(answer))
        store.add(f"{KEY}/confirmed/{generation}", 1)
        return generation
    generation = store.add(f"{KEY}/generation", 1)
    confirmed, answered = f"{KEY}/confirmed/{generation}", {}
    deadline = time.monotonic() + timeout.total_seconds()
    while store.add(confirmed, 0) < world_size - 1:
        for peer in range(1, world_size):
            waiting = f"{KEY}/waiting/{peer}"
            if store.check([waiting]):
                token = store.get(waiting)
                if answered.get(peer) != token:
                    store.set(f"{KEY}/answer/{token.decode()}", str(generation))
                    answered[peer] = token
        if time.monotonic() > deadline:
            missing = world_size - 1 - store.add(confirmed, 0)
            raise GenerationTimeout(f"rank 0: {missing} of {world_size - 1} other ranks did not join elastic "
                                    f"generation {generation} within {timeout}")
        time.sleep(poll_seconds)
    return generation
