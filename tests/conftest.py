"""Shared pytest fixtures: the InsightFace fixture folder and free TCP ports for gloo tests."""
import os
import random
import socket

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Copies of the reference libraries' own outputs (see each folder's README for provenance), kept in
# the repo so a user's fresh clone runs the suite without any sibling folder.
FIXTURES_ROOT = os.path.join(REPO_ROOT, "tests", "fixtures")
FIXTURES = os.path.join(FIXTURES_ROOT, "insightface")
FACENET_FIXTURES = os.path.join(FIXTURES_ROOT, "facenet")


@pytest.fixture(scope="session")
def insightface_fixtures() -> str:
    """``tests/fixtures/insightface``: RecordIO packs and .bin sets written by mxnet itself."""
    assert os.path.isdir(FIXTURES), f"missing fixtures at {FIXTURES} (part of the repository)"
    return FIXTURES


@pytest.fixture(scope="session")
def facenet_fixtures() -> str:
    """``tests/fixtures/facenet``: real photos and facenet-pytorch's own outputs on them."""
    assert os.path.isdir(FACENET_FIXTURES), f"missing fixtures at {FACENET_FIXTURES} (part of the repository)"
    return FACENET_FIXTURES


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as handle:
            low, high = (int(value) for value in handle.read().split())
            return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A free TCP port below the OS's ephemeral range: between this check and the launcher binding it,
    no outgoing connection (gloo's own pairs, other tests) can be handed the same port by the kernel."""
    low, _ = _ephemeral_range()
    candidates = random.Random().sample(range(20000, max(20001, low)), k=min(50, max(1, low - 20000)))
    for candidate in candidates:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            return candidate
    with socket.socket() as sock:  # no luck below the range: let the kernel choose
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core runner, 2 OpenMP threads per op are several times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
