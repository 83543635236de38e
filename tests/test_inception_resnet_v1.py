"""inception_resnet_v1 against facenet-pytorch: state_dict layout, outputs, released-file loading, export."""
import json
import logging
import math
import os

import numpy as np
import pytest
import torch
from torch import nn

from backbones import FACENET_INPUT, BackboneError, get_model, input_spec, normalize
from backbones.inception_resnet_v1 import ResidualInception
from utils.weights.load import CheckpointError, load_backbone

# One intra-op thread for the whole module (see tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")

NAME = "inception_resnet_v1"


@pytest.fixture(scope="module")
def expected(facenet_fixtures):
    with open(os.path.join(facenet_fixtures, "expected.json")) as handle:
        return json.load(handle)["inception_resnet_v1"]


def seeded_state(state):
    """The fixture README's deterministic weights: one generator over the keys in sorted order."""
    generator = torch.Generator().manual_seed(0)
    out = {}
    for key in sorted(state):
        shape = state[key].shape
        if key.endswith("num_batches_tracked"):
            out[key] = torch.zeros(shape, dtype=state[key].dtype)
        elif key.endswith("running_var"):
            out[key] = torch.rand(shape, generator=generator) + 0.5
        elif key.endswith("running_mean"):
            out[key] = torch.randn(shape, generator=generator) * 0.1
        elif key.endswith("bias"):
            out[key] = torch.randn(shape, generator=generator) * 0.05
        elif len(shape) == 1:
            out[key] = torch.rand(shape, generator=generator) * 0.4 + 0.8
        else:
            out[key] = torch.randn(shape, generator=generator) / math.sqrt(math.prod(shape[1:]))
    return out


def fixture_input():
    return torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def seeded():
    """(714-key model, 716-key model with 10 classes), each with its own seeded_state, in eval mode."""
    plain = get_model(NAME)
    plain.load_state_dict(seeded_state(plain.state_dict()))
    classifier = get_model(NAME, num_classes=10)
    classifier.load_state_dict(seeded_state(classifier.state_dict()))
    return plain.eval(), classifier.eval()


def layout(model):
    return [[key, list(value.shape)] for key, value in model.state_dict().items()]


def test_state_dict_is_facenet_pytorch_layout(expected):
    with torch.device("meta"):
        plain, classifier = get_model(NAME), get_model(NAME, num_classes=10)
    assert layout(plain) == expected["keys"]  # names, shapes and order
    assert len(expected["keys"]) == 714
    assert sum(p.numel() for p in plain.parameters()) == expected["num_parameters"] == 23_482_624
    assert layout(classifier) == expected["keys"] + expected["logits_keys"]


def test_architecture_constants():
    with torch.device("meta"):
        model = get_model(NAME)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(norms) > 100 and {m.eps for m in norms} == {1e-3}
    assert [block.scale for block in model.repeat_1] == [0.17] * 5
    assert [block.scale for block in model.repeat_2] == [0.10] * 10
    assert [block.scale for block in model.repeat_3] == [0.20] * 5
    assert isinstance(model.block8, ResidualInception) and model.block8.scale == 1.0
    assert isinstance(model.block8.relu, nn.Identity) and isinstance(model.repeat_3[0].relu, nn.ReLU)
    assert model.dropout.p == 0.6 and model.last_linear.bias is None
    with torch.device("meta"):
        assert get_model(NAME, dropout=0.2).dropout.p == 0.2 and get_model(NAME, dropout=0.0).dropout.p == 0.0


def test_embedding_and_logits_match_facenet_pytorch(expected, seeded):
    plain, classifier = seeded
    x = fixture_input()
    with torch.no_grad():
        embedding = plain(x)
        logits = classifier.classify(x)
    assert embedding.shape == (2, 512) and embedding.dtype == torch.float32
    assert not torch.allclose(embedding.norm(dim=1), torch.ones(2))  # forward is unnormalised
    reference = torch.tensor(expected["embedding_l2_normalized"])
    assert (nn.functional.normalize(embedding) - reference).abs().max() < 1e-5
    reference_logits = torch.tensor(expected["logits_num_classes_10"])
    assert logits.shape == (2, 10)
    assert (logits - reference_logits).abs().max() < 1e-5


def test_input_convention_and_errors(seeded):
    plain, _ = seeded
    assert input_spec(plain) == FACENET_INPUT and FACENET_INPUT.image_size == (160, 160)
    assert input_spec(nn.DataParallel(plain)) == FACENET_INPUT  # wrappers are looked through
    compiled = nn.Module()
    compiled._orig_mod = plain  # what torch.compile's OptimizedModule holds (compiling costs seconds here)
    assert input_spec(nn.DataParallel(compiled)) == FACENET_INPUT
    pixels = torch.tensor([0, 255, 128], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 160, 160).contiguous()
    assert normalize(pixels, input_spec(plain))[0, :, 0, 0].tolist() == [-127.5 / 128, 127.5 / 128, 0.5 / 128]
    with pytest.raises(BackboneError, match=r"network 'inception_resnet_v1': expected input \[N, 3, 160, 160\], "
                                            r"got \[1, 3, 112, 112\]"):
        plain(torch.zeros(1, 3, 112, 112))
    with pytest.raises(BackboneError, match=r"built without num_classes, so it has no logits layer"):
        plain.classify(fixture_input())
    with pytest.raises(BackboneError, match=r"num_classes must be a positive integer or None, got 0"):
        get_model(NAME, num_classes=0)


def test_gradient_checkpointing_wraps_every_stage(monkeypatch, seeded):
    # A full backward of this network costs ~15 s on the CI's one thread; the recompute mechanics are
    # tested on the small nets in test_backbones.py. Here: every trunk stage goes through checkpoint(),
    # and the checkpointed forward gives the same output and BN statistics as the plain one.
    import copy

    from backbones import common

    calls = []
    real = common.checkpoint
    monkeypatch.setattr(common, "checkpoint", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    model = copy.deepcopy(seeded[0]).train()
    start = {key: value.clone() for key, value in model.state_dict().items()}
    torch.manual_seed(3)
    with torch.no_grad():  # no autograd, so no checkpointing even when switched on
        expected = model(fixture_input())
    after_plain = {key: value.clone() for key, value in model.state_dict().items()}
    assert calls == []
    model.load_state_dict(start)
    model.gradient_checkpointing = True
    torch.manual_seed(3)  # same dropout mask
    got = model(fixture_input())
    assert len(calls) == len(model.stages()) == 30 and got.requires_grad
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for key, value in model.state_dict().items():  # BN statistics moved once, as without checkpointing
        assert torch.equal(value, after_plain[key]), key
    assert not torch.equal(after_plain["last_bn.running_mean"], start["last_bn.running_mean"])


def facenet_release(tmp_path, num_classes=10):
    """A file shaped like facenet-pytorch's vggface2.pt: a bare 716-key state_dict, classifier included."""
    with torch.device("meta"):
        shapes = get_model(NAME, num_classes=num_classes).state_dict()
    seeded_values = seeded_state(shapes)
    state = {key: seeded_values[key] for key in shapes}  # the file's order: logits.* last
    path = tmp_path / "20180402-114759-vggface2.pt"
    torch.save(state, path)
    return str(path), state


def test_load_released_file_embedding_strict_and_classifier_separate(tmp_path, seeded, caplog):
    path, state = facenet_release(tmp_path)
    _, classifier_model = seeded
    with caplog.at_level(logging.INFO, logger="utils.weights.load"):
        model = load_backbone(path, NAME)
    dropped = [r.getMessage() for r in caplog.records if "dropped the file's classifier" in r.getMessage()]
    assert dropped == [f"{path}: dropped the file's classifier (logits.weight [10, 512], logits.bias [10]): "
                       "not part of the embedding network"]
    assert len(model.state_dict()) == 714 and not model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    model, classifier = load_backbone(path, NAME, return_classifier=True)
    assert torch.equal(classifier["weight"], state["logits.weight"])
    assert torch.equal(classifier["bias"], state["logits.bias"])
    x = fixture_input()
    with torch.no_grad():  # the separated classifier on the embedding = facenet-pytorch's classify=True output
        logits = nn.functional.linear(model(x), classifier["weight"], classifier["bias"])
        torch.testing.assert_close(logits, classifier_model.classify(x), rtol=0, atol=0)
    # A model built with a matching classifier takes all 716 keys; the embedding network alone has none left.
    full, none_left = load_backbone(path, NAME, num_classes=10, return_classifier=True)
    assert none_left is None and torch.equal(full.logits.weight, state["logits.weight"])
    del state["last_bn.num_batches_tracked"]
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"1 missing key \(last_bn.num_batches_tracked\) for network "
                                              r"'inception_resnet_v1'$"):
        load_backbone(path, NAME)  # the embedding network itself is loaded strictly


def test_embed_images_reads_the_model_convention(seeded, caplog):
    from eval import embed

    plain, _ = seeded
    small = torch.randint(0, 256, (3, 3, 112, 112), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    embed._RESIZES_LOGGED.clear()
    with caplog.at_level(logging.INFO, logger="eval.embed"):
        got, flipped = embed.embed_images(plain, small, torch.device("cpu"), batch_size=2, flip=True)
        embed.embed_images(plain, small, torch.device("cpu"), batch_size=2, flip=False)
    resized = [r.getMessage() for r in caplog.records if "resizing" in r.getMessage()]
    assert resized == ["images are 112x112, the model takes 160x160, (x - 127.5) / 128: resizing them (bilinear)"]
    x = nn.functional.interpolate((small.float() - 127.5) / 128, size=(160, 160), mode="bilinear",
                                  align_corners=False)
    with torch.no_grad():
        torch.testing.assert_close(got, plain(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(flipped, plain(torch.flip(x, dims=[3])), rtol=1e-5, atol=1e-5)


def test_ijb_aligns_at_a_template_size():
    from eval.ijb import alignment_size

    with torch.device("meta"):
        assert alignment_size(get_model(NAME)) == 112  # 160 is no multiple of 112/128: resized when embedding
        assert alignment_size(get_model("r18")) == 112


def test_onnx_export_parity_and_metadata(tmp_path, seeded):
    pytest.importorskip("onnxruntime")
    import onnx

    from eval.embed import OnnxEmbedder
    from tools.torch2onnx import ExportError, export_onnx, verify_onnx

    plain, _ = seeded
    path = str(tmp_path / "irv1.onnx")
    export_onnx(plain, path, NAME)
    metadata = {entry.key: entry.value for entry in onnx.load(path).metadata_props}
    assert (metadata["input_height"], metadata["input_width"], metadata["input_mean"], metadata["input_std"]) == \
        ("160", "160", "127.5", "128.0")
    assert metadata["preprocess"] == "x = (pixel_rgb - 127.5) / 128, NCHW float32"
    report = verify_onnx(plain, path)
    assert all(values["normalized"] < 1e-4 for values in report.values())
    embedder = OnnxEmbedder(path)
    assert input_spec(embedder) == FACENET_INPUT
    x = fixture_input()
    with torch.no_grad():
        assert np.abs(embedder(x).numpy() - plain(x).numpy()).max() < 1e-4
    with pytest.raises(ExportError, match=r"--image-size 112 112 does not match network 'inception_resnet_v1', "
                                          r"which takes 160x160, \(x - 127.5\) / 128"):
        export_onnx(plain, str(tmp_path / "other.onnx"), NAME, image_size=(112, 112))


def test_verification_bin_decoded_at_the_model_size(insightface_fixtures, caplog):
    from eval.verification import VerificationTarget, load_bin

    path = os.path.join(insightface_fixtures, "pairs_py2.bin")
    with caplog.at_level(logging.INFO, logger="eval.verification"):
        target = VerificationTarget("pairs_py2", path, FACENET_INPUT.image_size)
    # (a 20-pair set also gets the small-set warning; the decode line is said once)
    assert [r.getMessage() for r in caplog.records if "decoding" in r.getMessage()] == [
        f"{path}: images are 112x112, decoding them at 160x160 (bicubic, as mxnet's resize_short)"]
    stored, _ = load_bin(path)
    assert target.local_images.shape == (stored.shape[0], 3, 160, 160) and target.local_images.dtype == torch.uint8
    # the upscaled image keeps the content: its 112x112 shrink is close to the stored pixels
    back = nn.functional.interpolate(target.local_images[:4].float(), size=(112, 112), mode="area")
    assert (back - stored[:4].float()).abs().mean() < 2.0  # 0.79 measured; other faces differ by ~40
