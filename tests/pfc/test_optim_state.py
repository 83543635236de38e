"""pfc/optim_state.py: a saved optimizer state laid onto other param groups by parameter name."""
import pytest
import torch

from pfc import PartialFCError
from pfc.optim import build_joint_optimizer


def groups(model: torch.nn.Sequential, split: bool) -> list[dict]:
    """The first layer as 'backbone', the second as 'head': one group (split=False) or two."""
    named = [(f"backbone.{key}", param) for key, param in model[0].named_parameters()]
    named += [(f"head.{key}", param) for key, param in model[1].named_parameters()]
    if not split:
        return [{"params": [param for _, param in named], "param_names": [name for name, _ in named], "lr_scale": 1.0}]
    return [{"params": [param for name, param in named if name.startswith(prefix)], "lr_scale": scale,
             "param_names": [name for name, _ in named if name.startswith(prefix)]}
            for prefix, scale in (("backbone.", 0.1), ("head.", 1.0))]


def stepped(name: str, split: bool) -> tuple[torch.nn.Sequential, object]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    optimizer = build_joint_optimizer(name, groups(model, split), None, 0.1)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(5, 4)).square().sum().backward()
        optimizer.step()
    return model, optimizer


@pytest.mark.parametrize("name", ["sgd", "adam"])
@pytest.mark.parametrize("split_before", [False, True])
def test_every_parameters_state_follows_it_into_another_grouping(name, split_before):
    model, optimizer = stepped(name, split_before)
    saved = optimizer.state_dict()
    other = build_joint_optimizer(name, groups(model, not split_before), None, 0.1)
    other.load_state_dict(saved)
    other.set_lr(1.0)
    assert [group["lr"] for group in other.param_groups] == ([0.1, 1.0] if not split_before else [1.0])
    for param in model.parameters():
        before, after = optimizer.backbone_optimizer.state[param], other.backbone_optimizer.state[param]
        assert sorted(before) == sorted(after) and before  # momentum_buffer; exp_avg, exp_avg_sq, step
        assert all(torch.equal(torch.as_tensor(before[key]), torch.as_tensor(after[key])) for key in before)


def test_a_state_of_another_shape_is_one_line():
    model, optimizer = stepped("sgd", True)
    saved = optimizer.state_dict()
    wider = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 5))
    other = build_joint_optimizer("sgd", groups(wider, True), None, 0.1)
    with pytest.raises(PartialFCError, match=r"optimizer state 'momentum_buffer' of head.weight has shape \[2, 3\], "
                                             r"the parameter \[5, 3\]"):
        other.load_state_dict(saved)
