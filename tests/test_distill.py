"""distill.py: each kd_loss against a hand-computed reference, the projection, the frozen teacher, the gradient share."""
from __future__ import annotations

import math

import pytest
import torch

from backbones import get_model
from backbones.common import FACENET_INPUT
from distill import Distiller, kd_term, seeded_projection
from utils.config.rules import ConfigError

# A fixed batch of three 2-d embeddings (student) and their teacher targets.
S = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
T = torch.tensor([[1.0, 1.0], [0.0, -1.0], [3.0, 4.0]])


def test_cosine_term_is_one_minus_the_mean_cosine():
    # cosines: 1/sqrt(2) (45 degrees), -1 (opposite), 1 (same direction)
    expected = ((1 - 1 / math.sqrt(2)) + (1 - (-1)) + (1 - 1)) / 3
    assert kd_term("cosine", S, T).item() == pytest.approx(expected, abs=1e-6)


def test_l2_term_is_the_mean_squared_euclidean_distance():
    # squared distances: (0^2 + 1^2) = 1, (0^2 + 3^2) = 9, 0
    assert kd_term("l2", S, T).item() == pytest.approx((1 + 9 + 0) / 3, abs=1e-6)


def test_relation_term_compares_the_pairwise_cosine_matrices():
    # student cosines: (e1, e2) = 0, (e1, [3,4]) = 0.6, (e2, [3,4]) = 0.8
    # teacher cosines: ([1,1], -e2) = -1/sqrt(2), ([1,1], [3,4]) = 7/(5 sqrt 2), (-e2, [3,4]) = -0.8
    r2 = math.sqrt(2)
    off = [(0 - (-1 / r2)) ** 2, (0.6 - 7 / (5 * r2)) ** 2, (0.8 - (-0.8)) ** 2]
    expected = 2 * sum(off) / 9  # symmetric off-diagonal pairs, diagonals equal (1 = 1), mean over 3 x 3
    assert kd_term("relation", S, T).item() == pytest.approx(expected, abs=1e-6)
    # sizes may differ: only the N x N matrices are compared
    assert kd_term("relation", S, torch.cat([T, T], dim=1)).item() == pytest.approx(expected, abs=1e-6)


def test_an_unknown_kind_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match="config key 'kd_loss'"):
        kd_term("kl", S, T)


def test_the_projection_exists_only_when_sizes_differ_and_is_the_same_on_every_rank():
    teacher = get_model("tiny", num_features=16)
    assert Distiller(teacher, 16, 32, "cosine", 1.0).projection.weight.shape == (16, 32)
    assert Distiller(teacher, 16, 16, "cosine", 1.0).projection is None
    assert Distiller(teacher, 16, 32, "relation", 1.0).projection is None
    torch.manual_seed(1)
    a = seeded_projection(32, 16, seed=5).weight
    torch.manual_seed(2)  # ranks seed torch differently: the projection does not depend on it
    assert torch.equal(a, seeded_projection(32, 16, seed=5).weight)
    assert not torch.equal(a, seeded_projection(32, 16, seed=6).weight)


def test_the_teacher_is_frozen_and_not_part_of_the_state():
    teacher = get_model("tiny", num_features=16).train()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    distiller = Distiller(teacher, 16, 32, "l2", 0.5)
    assert list(distiller.state_dict()) == ["projection.weight"]
    assert [p.shape for p in distiller.parameters()] == [(16, 32)]
    distiller.train()  # the trainer's .train() calls never reach the teacher
    images = torch.randint(0, 256, (4, 3, 112, 112), dtype=torch.uint8)
    student = torch.randn(4, 32, requires_grad=True)
    loss = distiller(images, student)
    loss.backward()
    assert not teacher.training
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    for key, value in teacher.state_dict().items():  # BatchNorm statistics included
        assert torch.equal(value, before[key]), key
    with torch.no_grad():
        target = teacher(images.float().div(255).sub(0.5).div(0.5))
        expected = 0.5 * (distiller.projection(student) - target).pow(2).sum(1).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert distiller.take_mean() == pytest.approx(expected.item() / 0.5, rel=1e-5)
    assert distiller.take_mean() is None  # read once per logging window


def test_a_teacher_of_another_input_convention_gets_its_own_size_and_normalisation():
    teacher = get_model("tiny", num_features=8)
    teacher.input_spec = FACENET_INPUT  # as inception_resnet_v1 declares: 160x160, (x - 127.5) / 128
    seen = []
    teacher.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    distiller = Distiller(teacher, 8, 8, "cosine", 1.0)
    images = torch.full((2, 3, 112, 112), 255, dtype=torch.uint8)
    with pytest.raises(Exception):  # the tiny network itself takes 112x112: the hook has seen the converted input
        distiller.teacher_embeddings(images)
    assert seen[0].shape == (2, 3, 160, 160)
    assert seen[0].max().item() == pytest.approx((255 - 127.5) / 128, abs=1e-5)


def test_the_gradient_is_this_ranks_share_and_the_value_its_own_term():
    teacher = get_model("tiny", num_features=16)
    images = torch.randint(0, 256, (4, 3, 112, 112), dtype=torch.uint8)
    student = torch.randn(4, 32)
    grads, values = [], []
    for world_size in (1, 4):
        distiller = Distiller(teacher, 16, 32, "cosine", 2.0, world_size=world_size)
        x = student.clone().requires_grad_(True)
        value = distiller(images, x)
        value.backward()
        grads.append(x.grad)
        values.append(value.item())
    assert values[0] == pytest.approx(values[1], rel=1e-6)
    assert torch.allclose(grads[1] * 4, grads[0], atol=1e-6)
