"""utils/run/finetune.py: each backbone's stages, what freezing does to parameters and modes, the head-only
phase's forward (no autograd through the backbone, a head that still gets its gradient)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from backbones import get_model
from utils.config.rules import ConfigError
from utils.run import finetune


def cfg(**keys):
    return SimpleNamespace(**{**dict(freeze_stages=0, freeze_bn=False, head_only_epochs=0), **keys})


@pytest.mark.parametrize("network,count", [("r18", 4), ("mbf", 4), ("inception_resnet_v1", 4), ("tiny", 5)])
def test_each_backbone_states_its_stages_and_all_of_them_can_be_frozen(network, count):
    model = get_model(network, num_features=64)
    stages = model.finetune_stages()
    assert len(stages) == count
    first = [id(param) for module in stages[0] for param in module.parameters()]
    assert first  # the stem/first stage owns parameters
    finetune.prepare_backbone(model, cfg(freeze_stages=count))
    frozen = {id(param) for module in finetune.stage_modules(model, count) for param in module.parameters()}
    assert all(not param.requires_grad for param in model.parameters() if id(param) in frozen)
    assert any(param.requires_grad for param in model.parameters())  # the embedding layer still trains
    with pytest.raises(ConfigError, match=f"freeze_stages' is {count + 1} .* {count} stages"):
        finetune.stage_modules(model, count + 1)


def test_a_network_without_stages_is_refused_by_name():
    with pytest.raises(ConfigError, match="network 'vit_t' states no stages"):
        finetune.prepare_backbone(get_model("vit_t", num_features=64), cfg(freeze_stages=1))


def test_train_mode_keeps_frozen_batchnorm_and_stages_in_eval():
    model = get_model("tiny", num_features=64)
    finetune.prepare_backbone(model, cfg(freeze_bn=True, freeze_stages=1))
    finetune.train_mode(model)
    batchnorms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert batchnorms and not any(m.training for m in batchnorms)
    assert model.training and model.layers[1].training and not model.layers[0].training
    assert all(m.training for m in model.modules() if isinstance(m, torch.nn.Dropout))


def test_head_only_epochs_embed_without_touching_the_backbone():
    torch.manual_seed(0)
    model = get_model("tiny", num_features=64)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    finetune.enter_epoch(model, cfg(head_only_epochs=2), 1)
    finetune.train_mode(model)
    assert not any(module.training for module in model.modules())
    embeddings = finetune.embed(model, torch.randn(4, 3, 112, 112))
    assert embeddings.requires_grad and embeddings.grad_fn is None
    embeddings.square().sum().backward()
    assert embeddings.grad is not None and all(param.grad is None for param in model.parameters())
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    finetune.enter_epoch(model, cfg(head_only_epochs=2), 2)  # the phase is over: the backbone trains
    finetune.train_mode(model)
    finetune.embed(model, torch.randn(4, 3, 112, 112)).square().sum().backward()
    assert model.training and all(param.grad is not None for param in model.parameters())
