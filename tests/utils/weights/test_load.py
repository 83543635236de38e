"""utils.weights.load.load_backbone: the checkpoint forms users have and readable key reports."""
import pytest
import torch

from backbones import get_model
from utils.weights.load import CheckpointError, load_backbone


# One intra-op thread for the whole module (see tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained():
    """An mbf whose weights and BN statistics differ from any fresh model."""
    torch.manual_seed(1)
    model = get_model("mbf", num_features=32)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.01)
        model.train()
        model(torch.rand(4, 3, 112, 112) * 2 - 1)  # moves the running statistics
    return model.eval()


def assert_same_weights(loaded, reference):
    loaded_state, reference_state = loaded.state_dict(), reference.state_dict()
    assert loaded_state.keys() == reference_state.keys()
    for key in reference_state:
        assert torch.equal(loaded_state[key], reference_state[key]), key


def test_bare_state_dict(tmp_path, trained):
    path = tmp_path / "model.pt"
    torch.save(trained.state_dict(), path)
    loaded = load_backbone(str(path), "mbf", num_features=32)
    assert_same_weights(loaded, trained)
    assert not loaded.training  # built here -> ready for inference
    images = torch.rand(2, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded(images), trained(images))


def test_ddp_prefixed_state_dict(tmp_path, trained):
    path = tmp_path / "ddp.pt"
    torch.save({f"module.{key}": value for key, value in trained.state_dict().items()}, path)
    assert_same_weights(load_backbone(str(path), "mbf", num_features=32), trained)


def test_training_checkpoint_and_network_from_its_config(tmp_path, trained):
    path = tmp_path / "checkpoint_step_100.pt"
    torch.save({"format": "arcscale-checkpoint", "version": 1, "backbone": trained.state_dict(),
                "head": {"weight": torch.zeros(3, 32)}, "optimizer": {}, "step": 100, "epoch": 1,
                "config": {"network": "mbf", "embedding_size": 32}}, path)
    assert_same_weights(load_backbone(str(path), "mbf", num_features=32), trained)
    assert_same_weights(load_backbone(str(path)), trained)  # name and size read from the config


def test_arcface_torch_training_checkpoint(tmp_path, trained):
    path = tmp_path / "checkpoint_gpu_0.pt"
    torch.save({"epoch": 3, "global_step": 10,
                "state_dict_backbone": {f"module.{k}": v for k, v in trained.state_dict().items()},
                "state_dict_softmax_fc": {"weight": torch.zeros(2, 2)}}, path)
    assert_same_weights(load_backbone(str(path), "mbf", num_features=32), trained)


def test_loads_into_a_given_model_and_keeps_its_mode(tmp_path, trained):
    path = tmp_path / "model.pt"
    torch.save(trained.state_dict(), path)
    target = get_model("mbf", num_features=32).train()
    returned = load_backbone(str(path), model=target)
    assert returned is target and target.training
    assert_same_weights(target, trained)


def test_bad_keys_are_reported_in_one_line(tmp_path, trained):
    state = dict(trained.state_dict())
    del state["features.layers.2.weight"], state["conv_sep.layers.0.weight"]
    state["extra.weight"] = torch.zeros(1)
    state["features.layers.3.weight"] = torch.zeros(256)
    path = tmp_path / "model.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        load_backbone(str(path), "mbf", num_features=32)
    message = str(info.value)
    assert "\n" not in message
    assert message == (f"{path}: 2 missing keys (conv_sep.layers.0.weight, features.layers.2.weight), "
                       f"1 unexpected key (extra.weight), 1 shape mismatch (features.layers.3.weight: "
                       f"file [256] vs model [32]) for network 'mbf'")


def test_many_missing_keys_are_counted_not_listed(tmp_path, trained):
    path = tmp_path / "r18_weights.pt"
    torch.save(trained.state_dict(), path)
    with torch.device("meta"):
        r18 = get_model("r18")
    with pytest.raises(CheckpointError, match=r"r18_weights.pt: 187 missing keys \(conv1.weight, bn1.weight, "
                                              r"bn1.bias, \.\.\. 184 more\), 333 unexpected keys .* for network 'r18'"):
        load_backbone(str(path), model=r18)


def test_embedding_size_hint(tmp_path, trained):
    path = tmp_path / "model.pt"
    torch.save(trained.state_dict(), path)
    with pytest.raises(CheckpointError, match=r"shape mismatches \(features.layers.2.weight: file \[32, 512\] vs "
                                              r"model \[512, 512\].*; the file's embedding size is 32: pass "
                                              r"num_features=32$"):
        load_backbone(str(path), "mbf")


def test_non_strict_loads_what_fits(tmp_path, trained, caplog):
    state = dict(trained.state_dict())
    del state["conv_sep.layers.0.weight"]
    path = tmp_path / "partial.pt"
    torch.save(state, path)
    fresh = get_model("mbf", num_features=32)
    before = fresh.conv_sep.layers[0].weight.clone()
    with caplog.at_level("WARNING", logger="utils.weights.load"):
        load_backbone(str(path), model=fresh, strict=False)
    assert "1 missing key (conv_sep.layers.0.weight)" in caplog.text
    assert torch.equal(fresh.conv_sep.layers[0].weight, before)
    assert torch.equal(fresh.features.layers[2].weight, trained.features.layers[2].weight)


class NotAllowed:
    pass


@pytest.mark.parametrize("content, message", [
    (None, r"checkpoint file not found"),
    # torch 2.1-2.3's weights_only unpickler calls the stray bytes a RuntimeError ("Unsupported operand").
    (b"definitely not a torch file", r"cannot read with torch.load\(weights_only=True\): (UnpicklingError: |RuntimeError: "
                                     r"Unsupported operand)"),
    (b"", r"cannot read with torch.load\(weights_only=True\): EOFError"),
], ids=["absent", "garbage", "empty"])
def test_unreadable_files(tmp_path, content, message):
    path = tmp_path / "bad.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"^{path}: {message}"):
        load_backbone(str(path), "mbf")


def test_arbitrary_objects_are_refused_by_weights_only(tmp_path):
    path = tmp_path / "object.pt"
    torch.save({"model": NotAllowed()}, path)  # would need full unpickling: never allowed
    # "Unsupported global: GLOBAL x" from torch 2.4, "Unsupported class x" before.
    with pytest.raises(CheckpointError, match=r"cannot read with torch.load\(weights_only=True\): Unsupported (global: "
                                              rf"GLOBAL|class) {__name__}.NotAllowed .*save model.state_dict"):
        load_backbone(str(path), "mbf")


@pytest.mark.parametrize("saved, message", [
    ({"epoch": 3, "lr": 0.1}, r"expected a backbone state_dict, a DDP state_dict or an ArcScale training "
                              r"checkpoint, found dict with keys \['epoch', 'lr'\]"),
    ({"format": "arcscale-checkpoint", "version": 1, "backbone": {}}, r"training checkpoint has no usable "
                                                                      r"'backbone' state_dict"),
    ([1, 2], r"found list"),
])
def test_wrong_contents(tmp_path, saved, message):
    path = tmp_path / "weird.pt"
    torch.save(saved, path)
    with pytest.raises(CheckpointError, match=message):
        load_backbone(str(path), "mbf")


def test_name_required_without_training_config(tmp_path, trained):
    path = tmp_path / "model.pt"
    torch.save(trained.state_dict(), path)
    with pytest.raises(CheckpointError, match=r"no network name given and the file has no training config"):
        load_backbone(str(path))
    with pytest.raises(CheckpointError, match=r"model keyword arguments \['num_features'\] are only used"):
        load_backbone(str(path), model=trained, num_features=32)


class _RunsShellOnLoad:
    """Unpickling this runs a shell command: what a crafted checkpoint would carry."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


def test_crafted_pickle_checkpoints_are_refused_without_running_code(tmp_path):
    from utils.weights.load import read_backbone_state
    from utils.run.checkpoint import CheckpointError as ResumeError
    from utils.run.checkpoint import load_checkpoint

    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": _RunsShellOnLoad(marker)}, path)
    for load, error in ((lambda p: load_backbone(p, "mbf"), CheckpointError), (read_backbone_state, CheckpointError),
                        (load_checkpoint, ResumeError)):
        with pytest.raises(error) as info:
            load(str(path))
        message = str(info.value)
        assert message.startswith(f"{path}: ") and "\n" not in message
    assert not marker.exists()
