"""utils/devices/elastic.py: rank 0 hands every rank of an attempt the same generation through a real
TCPStore (torchrun's store stands in), whatever order the ranks arrive in and whatever an earlier attempt
left in the store; a rank that never comes makes rank 0 stop with one line."""
from __future__ import annotations

import datetime
import threading
import time

import pytest
import torch.distributed as dist

from tests.conftest import free_port
from utils.devices.elastic import GenerationTimeout, KEY, agree_on_generation

TIMEOUT = datetime.timedelta(seconds=30)


@pytest.fixture
def server():
    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=TIMEOUT, wait_for_workers=False)
    yield store, port


def attempt(port: int, world_size: int, delays: dict[int, float]) -> dict[int, int]:
    """One attempt: every rank (a thread with a store client of its own) arrives after its delay."""
    results: dict[int, int] = {}

    def rank_main(rank: int) -> None:
        time.sleep(delays.get(rank, 0.0))
        client = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=TIMEOUT)
        results[rank] = agree_on_generation(client, rank, world_size, TIMEOUT, poll_seconds=0.005)

    threads = [threading.Thread(target=rank_main, args=(rank,)) for rank in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


def test_every_rank_of_an_attempt_gets_the_generation_rank_0_hands_out(server):
    store, port = server
    assert attempt(port, 3, {}) == {0: 1, 1: 1, 2: 1}
    # The next attempt: rank 0 comes last, and rank 2's token of the first attempt is still in the store.
    assert store.check([f"{KEY}/waiting/2"])
    assert attempt(port, 3, {0: 0.3}) == {0: 2, 1: 2, 2: 2}
    # Rank 0 first, a rank arriving late: rank 0 answers the stale token, then the fresh one.
    assert attempt(port, 3, {2: 0.5}) == {0: 3, 1: 3, 2: 3}


def test_a_rank_that_never_comes_stops_rank_0_with_one_line(server):
    _, port = server
    joined = {}
    rank_1 = threading.Thread(target=lambda: joined.update(rank_1=agree_on_generation(
        dist.TCPStore("127.0.0.1", port, is_master=False, timeout=TIMEOUT), 1, 3, TIMEOUT)))
    rank_1.start()
    client = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=TIMEOUT)
    with pytest.raises(GenerationTimeout, match=r"^rank 0: 1 of 2 other ranks did not join elastic generation 1 "
                                                r"within 0:00:01$"):
        agree_on_generation(client, 0, 3, datetime.timedelta(seconds=1), poll_seconds=0.01)
    rank_1.join(timeout=30)
    assert joined == {"rank_1": 1}
    # Rank 2 comes after rank 0 gave up: nobody hands out a generation any more, and it says so.
    with pytest.raises(GenerationTimeout, match=r"^rank 2: rank 0 did not hand out the elastic generation"):
        agree_on_generation(client, 2, 3, datetime.timedelta(seconds=0.3))
