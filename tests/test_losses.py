"""losses.py: margin values and gradients against closed forms, monotonic tails, AdaFace,
CurricularFace, inter-class filtering and the config builder's errors."""
import math

import pytest
import torch
from easydict import EasyDict

import losses
from losses import AdaFaceLoss, CombinedMarginLoss, CurricularFaceLoss, MarginLossError, build_margin_loss

S = 64.0


def _target_value_and_grad(margin, cos_target: float):
    """(scaled target logit, d logit / d cos) for a single row [cos_target, 0.1]."""
    logits = torch.tensor([[cos_target, 0.1]], requires_grad=True)
    out = margin(logits, torch.tensor([0]))
    out[0, 0].backward()
    return out[0, 0].item(), logits.grad[0, 0].item(), out, logits


@pytest.mark.parametrize("m1,m2,m3", [(1.0, 0.5, 0.0), (1.0, 0.0, 0.4), (1.0, 0.3, 0.2), (2.0, 0.0, 0.0),
                                      (1.35, 0.25, 0.1)])
@pytest.mark.parametrize("cos_target", [0.93, 0.4, 0.1])
def test_target_value_matches_closed_form(m1, m2, m3, cos_target):
    theta = math.acos(cos_target)
    assert m1 * theta + m2 <= math.pi  # inside the main branch for these points
    expected = S * (math.cos(m1 * theta + m2) - m3)
    for grad_mode in ("straight_through", "exact"):
        value, _, out, _ = _target_value_and_grad(CombinedMarginLoss(S, m1, m2, m3, margin_grad=grad_mode), cos_target)
        assert value == pytest.approx(expected, rel=1e-5, abs=1e-4)
        assert out[0, 1].item() == pytest.approx(S * 0.1, rel=1e-6)  # negatives are only scaled


@pytest.mark.parametrize("m1,m2", [(1.0, 0.5), (1.0, 0.3), (2.0, 0.0), (1.35, 0.25)])
@pytest.mark.parametrize("cos_target", [0.93, 0.4, 0.1])
def test_exact_and_straight_through_gradients(m1, m2, cos_target):
    theta = math.acos(cos_target)
    # d cos(m1*acos(x) + m2) / dx = m1 * sin(m1*theta + m2) / sin(theta)
    exact = S * m1 * math.sin(m1 * theta + m2) / math.sin(theta)
    _, grad, _, _ = _target_value_and_grad(CombinedMarginLoss(S, m1, m2, 0.0, margin_grad="exact"), cos_target)
    assert grad == pytest.approx(exact, rel=1e-4)
    x = torch.tensor(cos_target, dtype=torch.float64, requires_grad=True)
    torch.cos(m1 * torch.acos(x) + m2).backward()
    assert grad == pytest.approx(S * x.grad.item(), rel=1e-4)  # autograd of the formula agrees
    _, grad, _, _ = _target_value_and_grad(CombinedMarginLoss(S, m1, m2, 0.0), cos_target)
    assert grad == pytest.approx(S)  # arcface_torch: the margin carries no gradient


@pytest.mark.parametrize("grad_mode", ["straight_through", "exact"])
@pytest.mark.parametrize("cos_target", [1.0, 1.0 - 1e-7, 0.999999, -0.999999, -1.0 + 1e-7, -1.0])
def test_theta_near_zero_and_pi_is_finite(grad_mode, cos_target):
    for m1, m2, m3 in [(1.0, 0.5, 0.0), (1.0, 0.3, 0.2), (2.0, 0.0, 0.0), (1.0, 0.0, 0.4)]:
        value, grad, _, _ = _target_value_and_grad(CombinedMarginLoss(S, m1, m2, m3, margin_grad=grad_mode),
                                                   cos_target)
        assert math.isfinite(value) and math.isfinite(grad) and grad > 0
    # theta -> 0: ArcFace target -> cos(m); theta -> pi: continues below -1 instead of wrapping to cos(pi - m)
    value, _, _, _ = _target_value_and_grad(CombinedMarginLoss(S, 1.0, 0.5, 0.0, margin_grad=grad_mode), cos_target)
    cos_target = torch.tensor(cos_target).item()  # the float32 value the loss sees
    if cos_target > 0:
        assert value == pytest.approx(S * math.cos(0.5 + math.acos(cos_target)), abs=1e-3)
    else:
        assert value == pytest.approx(S * (cos_target - (1.0 - math.cos(0.5))), abs=1e-3)


@pytest.mark.parametrize("m1,m2", [(1.0, 0.5), (1.0, 1.2), (2.0, 0.0), (3.0, 0.4)])
def test_target_is_continuous_and_monotonic_past_pi(m1, m2):
    x = torch.linspace(-1.0, 1.0, 200001, dtype=torch.float64)
    y = losses.margin_curve(x, m1, m2)
    steps = y[1:] - y[:-1]
    assert bool((steps >= -1e-12).all())  # non-decreasing in cos(theta): no wrap-around past pi
    # continuous: no jump where m1*theta + m2 crosses pi (the slope only diverges at cos -> 1)
    assert steps[x[1:] < 0.9].abs().max() < 1e-3
    junction = torch.tensor([math.cos((math.pi - m2) / m1)], dtype=torch.float64)
    around = losses.margin_curve(torch.cat([junction - 1e-9, junction + 1e-9]), m1, m2)
    assert around[0].item() == pytest.approx(-1.0, abs=1e-6) and around[1].item() == pytest.approx(-1.0, abs=1e-6)
    assert bool((y <= x + 1e-12).all())  # a margin never helps the target
    naive = torch.cos(m1 * torch.acos(x) + m2)  # what arcface_torch computes
    assert bool(((naive[1:] - naive[:-1]) < -1e-6).any())  # ... which does wrap around
    slope = losses.margin_curve_slope(x, m1, m2)
    assert bool(torch.isfinite(slope).all()) and bool((slope >= 0).all())


def test_label_minus_one_rows_and_inplace():
    logits = torch.tensor([[0.2, 0.5, -0.3], [0.7, 0.1, 0.0]])
    original = logits.clone()
    out = CombinedMarginLoss(S, 1.0, 0.5, 0.0)(logits, torch.tensor([-1, 0]))
    assert torch.equal(logits, original)  # not modified unless inplace=True
    assert torch.allclose(out[0], S * original[0])
    assert out[1, 0].item() == pytest.approx(S * math.cos(math.acos(0.7) + 0.5), rel=1e-5)
    same = CombinedMarginLoss(S, 1.0, 0.5, 0.0)(logits, torch.tensor([-1, 0]), inplace=True)
    assert same.data_ptr() == logits.data_ptr() and torch.allclose(same, out)


def test_interclass_filtering_zeroes_high_negatives_only():
    logits = torch.tensor([[0.9, 0.5, 0.1], [0.2, 0.8, 0.05]], requires_grad=True)
    margin = CombinedMarginLoss(S, 1.0, 0.0, 0.4, interclass_filtering_threshold=0.3)
    out = margin(logits, torch.tensor([0, -1]))
    expected = torch.tensor([[0.9 - 0.4, 0.0, 0.1], [0.2, 0.0, 0.05]]) * S
    assert torch.allclose(out, expected, atol=1e-5)
    out.sum().backward()
    assert torch.equal(logits.grad == 0, torch.tensor([[False, True, False], [False, True, False]]))


def test_adaface_closed_form_and_ema():
    margin = AdaFaceLoss(s=S, m=0.4, h=0.333, t_alpha=0.01)
    cos = torch.tensor([[0.6, 0.1], [0.2, 0.5], [0.3, -0.4]])
    norms = torch.tensor([10.0, 30.0, 25.0])
    out = margin(cos, torch.tensor([0, 1, -1]), norms=norms)
    mean = 0.99 * 20.0 + 0.01 * norms.mean().item()
    std = 0.99 * 100.0 + 0.01 * norms.std().item()
    assert margin.batch_mean.item() == pytest.approx(mean, rel=1e-6)
    assert margin.batch_std.item() == pytest.approx(std, rel=1e-6)
    for row, column in ((0, 0), (1, 1)):
        z = max(-1.0, min(1.0, 0.333 * (norms[row].item() - mean) / (std + 1e-3)))
        expected = math.cos(math.acos(cos[row, column].item()) - 0.4 * z) - (0.4 + 0.4 * z)
        assert out[row, column].item() == pytest.approx(S * expected, rel=1e-5)
    assert torch.allclose(out[2], S * cos[2])
    with pytest.raises(MarginLossError, match=r"AdaFaceLoss needs norms=\[N=3\]"):
        margin(cos, torch.tensor([0, 1, -1]))


def test_curricularface_closed_form():
    margin = CurricularFaceLoss(s=S, m=0.5)
    cos = torch.tensor([[0.6, 0.5, 0.1], [0.3, 0.9, 0.2], [-0.95, 0.0, -0.99]], requires_grad=True)
    out = margin(cos, torch.tensor([0, 0, 0]))
    t = 0.01 * (0.6 + 0.3 - 0.95) / 3  # EMA from 0 of the mean target cosine
    assert margin.t.item() == pytest.approx(t, rel=1e-5)
    target0 = math.cos(math.acos(0.6) + 0.5)  # 0.143: 0.5 is hard, 0.1 is not
    target1 = math.cos(math.acos(0.3) + 0.5)  # -0.194: both negatives are hard
    target2 = -0.95 - (1 - math.cos(0.5))  # theta + m > pi: monotonic tail
    expected = [[target0, 0.5 * (t + 0.5), 0.1],
                [target1, 0.9 * (t + 0.9), 0.2 * (t + 0.2)],
                [target2, 0.0, -0.99 * (t - 0.99)]]
    assert torch.allclose(out, S * torch.tensor(expected), rtol=1e-5, atol=1e-5)
    out[0, 1].backward()
    assert cos.grad[0, 1].item() == pytest.approx(S * (t + 2 * 0.5), rel=1e-5)


def _cfg(**overrides):
    cfg = EasyDict(head="combined", scale=64.0, margin_list=(1.0, 0.5, 0.0), margin_grad="straight_through",
                   interclass_filtering_threshold=0.0)
    cfg.update(overrides)
    return cfg


def test_build_margin_loss_presets():
    arc = build_margin_loss(_cfg())
    assert isinstance(arc, CombinedMarginLoss) and (arc.m1, arc.m2, arc.m3) == (1.0, 0.5, 0.0)
    combined = build_margin_loss(_cfg(margin_list=(1.0, 0.3, 0.2), margin_grad="exact"))
    assert combined.margin_grad == "exact" and combined.m3 == 0.2
    ada = build_margin_loss(_cfg(head="adaface", margin_list=(1.0, 0.4, 0.0)))
    assert isinstance(ada, AdaFaceLoss) and ada.m == 0.4 and ada.needs_norms
    curricular = build_margin_loss(_cfg(head="curricularface"))
    assert isinstance(curricular, CurricularFaceLoss) and curricular.m == 0.5


@pytest.mark.parametrize("overrides,message", [
    (dict(head="arcface"), r"config key 'head'='arcface': expected one of combined, adaface, curricularface"),
    (dict(margin_list=(1.0, 0.5)), r"config key 'margin_list'=\(1.0, 0.5\): expected three numbers"),
    (dict(margin_list=(0.5, 0.5, 0.0)), r"margin m1=0.5: expected >= 1"),
    (dict(margin_list=(1.0, 4.0, 0.0)), r"margin m2=4.0: expected 0 <= m2 < pi"),
    (dict(margin_list=(1.0, 0.0, -0.1)), r"margin m3=-0.1: expected 0 <= m3 < 2"),
    (dict(margin_grad="analytic"), r"margin_grad='analytic': expected one of straight_through, exact"),
    (dict(scale=0), r"scale=0: expected a finite number > 0"),
    (dict(interclass_filtering_threshold=1.5), r"interclass_filtering_threshold=1.5: expected 0 \(off\)"),
    (dict(head="adaface", margin_list=(1.0, 0.0, 0.4)), r"with head='adaface': expected \(1.0, m, 0.0\)"),
    (dict(head="curricularface", interclass_filtering_threshold=0.2), r"only head='combined' supports"),
])
def test_build_margin_loss_errors(overrides, message):
    with pytest.raises(MarginLossError, match=message):
        build_margin_loss(_cfg(**overrides))


@pytest.mark.parametrize("margin", [CombinedMarginLoss(32.0, 1.2, 0.3, 0.2, margin_grad="exact"),
                                    CombinedMarginLoss(32.0, 1.0, 0.5, 0.0, interclass_filtering_threshold=0.2),
                                    AdaFaceLoss(s=32.0, m=0.4)], ids=["combined_exact", "filtering", "adaface"])
def test_fused_margin_protocol_equals_autograd(margin):
    """The public FusedMarginLoss protocol: fused_ gives forward()'s logits, and FusedMargin.backward_
    maps a logits gradient back to the cosines exactly as autograd through forward() does."""
    generator = torch.Generator().manual_seed(0)
    cos = torch.rand(6, 5, generator=generator) * 1.8 - 0.9
    labels = torch.tensor([0, 3, -1, 4, 1, 3])
    norms = torch.rand(6, generator=generator) * 30 + 5
    upstream = torch.randn(6, 5, generator=generator)
    assert isinstance(margin, losses.FusedMarginLoss) and isinstance(margin, losses.MarginLoss)
    margin.eval()  # AdaFace: the same statistics for both calls
    leaf = cos.clone().requires_grad_(True)
    expected = margin(leaf, labels, norms=norms)
    expected.backward(upstream)
    rows = torch.nonzero(labels != -1, as_tuple=True)[0]
    fused_logits = cos.clone()
    fused = margin.fused_(fused_logits, rows, labels[rows], norms=norms)
    torch.testing.assert_close(fused_logits, expected.detach())
    grad = fused.backward_(upstream.clone(), rows, labels[rows], fused.scale)
    torch.testing.assert_close(grad, leaf.grad)


def test_curricularface_is_not_fused():
    assert not isinstance(CurricularFaceLoss(), losses.FusedMarginLoss)
    assert isinstance(CurricularFaceLoss(), losses.MarginLoss) and not CurricularFaceLoss().needs_norms
