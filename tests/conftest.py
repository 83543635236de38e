"""Shared pytest fixtures: the InsightFace fixture folder and free TCP ports for gloo tests."""
import os
import socket

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(os.path.dirname(REPO_ROOT), "shared", "fixtures", "insightface")


@pytest.fixture(scope="session")
def insightface_fixtures() -> str:
    """``<repo>/../shared/fixtures/insightface``; CI always has it, so absence is a failure."""
    assert os.path.isdir(FIXTURES), f"missing shared fixtures at {FIXTURES}"
    return FIXTURES


def free_port() -> int:
    with socket.socket() as sock:
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
