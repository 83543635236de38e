"""Backbone registry, insightface state_dict compatibility, precision and gradient checkpointing."""
import copy
import warnings

import pytest
import torch
from torch import nn

from backbones import (ARCFACE_INPUT, FACENET_INPUT, MODEL_NAMES, BackboneError, InputSpec, get_model, input_spec,
                       normalize)
from backbones.iresnet import IResNet
from backbones.mobilefacenet import MobileFaceNet
from backbones.vit import VisionTransformer

ISSUE_NAMES = ["r18", "r34", "r50", "r100", "r200", "mbf", "mbf_large", "vit_t", "vit_s", "vit_b", "vit_l",
               "vit_t_dp005_mask0", "vit_s_dp005_mask_0", "vit_b_dp005_mask_005", "vit_l_dp005_mask_005"]
IRESNET = {  # blocks per stage, len(state_dict()), parameters in millions (the issue's acceptance numbers)
    "r18": ((2, 2, 2, 2), 187, 24.03),
    "r34": ((3, 4, 6, 3), 331, 34.14),
    "r50": ((3, 4, 14, 3), 475, 43.59),
    "r100": ((3, 13, 30, 3), 925, 65.16),
    "r200": ((6, 26, 60, 6), 1807, 118.83),
}


# One intra-op thread for the whole module (see tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def cpu_fp16_autocast() -> bool:
    """Whether this torch's CPU autocast computes in float16 (torch 2.1's supports bfloat16 only and warns)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.autocast("cpu", dtype=torch.float16):
                return torch.mm(torch.ones(1, 1), torch.ones(1, 1)).dtype == torch.float16
        except RuntimeError:  # "AutocastCPU only support Bfloat16"
            return False


def on_meta(name, **kwargs):
    with torch.device("meta"):
        return get_model(name, **kwargs)


def batch_norm_entries(prefix, channels):
    return [(f"{prefix}.{leaf}", (channels,)) for leaf in ("weight", "bias", "running_mean", "running_var")] + [
        (f"{prefix}.num_batches_tracked", ())]


def insightface_iresnet_layout(layers, num_features=512):
    """(key, shape) in order, written out from the insightface layout described in the issue."""
    entries = [("conv1.weight", (64, 3, 3, 3))] + batch_norm_entries("bn1", 64) + [("prelu.weight", (64,))]
    in_channels = 64
    for stage, (num_blocks, width) in enumerate(zip(layers, (64, 128, 256, 512)), start=1):
        for index in range(num_blocks):
            prefix = f"layer{stage}.{index}"
            entries += batch_norm_entries(f"{prefix}.bn1", in_channels)
            entries += [(f"{prefix}.conv1.weight", (width, in_channels, 3, 3))]
            entries += batch_norm_entries(f"{prefix}.bn2", width)
            entries += [(f"{prefix}.prelu.weight", (width,)), (f"{prefix}.conv2.weight", (width, width, 3, 3))]
            entries += batch_norm_entries(f"{prefix}.bn3", width)
            if index == 0:
                entries += [(f"{prefix}.downsample.0.weight", (width, in_channels, 1, 1))]
                entries += batch_norm_entries(f"{prefix}.downsample.1", width)
            in_channels = width
    entries += batch_norm_entries("bn2", 512)
    entries += [("fc.weight", (num_features, 512 * 7 * 7)), ("fc.bias", (num_features,))]
    entries += batch_norm_entries("features", num_features)
    return entries


def layout(model):
    return [(key, tuple(value.shape)) for key, value in model.state_dict().items()]


def num_params(model):
    return sum(param.numel() for param in model.parameters())


def test_registry_has_every_name_of_the_issue():
    assert set(ISSUE_NAMES) <= set(MODEL_NAMES)
    assert set(MODEL_NAMES) - set(ISSUE_NAMES) <= {"tiny", "inception_resnet_v1"}  # CPU demo network, FaceNet


def test_unknown_name_lists_valid_names():
    with pytest.raises(BackboneError, match=r"unknown network 'r51'; valid names: r18, r34, r50, .*mbf.*vit_l"):
        get_model("r51")


@pytest.mark.parametrize("kwargs, message", [
    ({"widht": 2}, r"network 'r18': unknown keyword argument\(s\) widht; accepted: num_features, dropout, fp16"),
    ({"num_features": 0}, r"network 'r18': num_features must be an integer in \[1, 65536\], got 0"),
    ({"num_features": 12.5}, r"num_features must be an integer"),
    ({"dropout": 1.5}, r"network 'r18': dropout must be a number in \[0.0, 1.0\], got 1.5"),
    ({"mask_ratio": 0.2}, r"unknown keyword argument\(s\) mask_ratio"),
])
def test_bad_keyword_arguments(kwargs, message):
    with pytest.raises(BackboneError, match=message):
        on_meta("r18", **kwargs)


def test_dropout_on_a_network_without_dropout_is_an_error():
    with pytest.raises(BackboneError, match=r"network 'mbf' has no dropout layer .*set dropout=0.0, got 0.2"):
        on_meta("mbf", dropout=0.2)
    with pytest.raises(BackboneError, match=r"network 'vit_t': mask_ratio must be a number in \[0.0, 0.99\]"):
        on_meta("vit_t", mask_ratio=1.0)


@pytest.mark.parametrize("name", list(IRESNET))
def test_iresnet_state_dict_is_insightface_layout(name):
    layers, num_keys, params_millions = IRESNET[name]
    model = on_meta(name)
    assert layout(model) == insightface_iresnet_layout(layers)
    assert len(model.state_dict()) == num_keys
    assert round(num_params(model) / 1e6, 2) == params_millions
    assert model.features.weight.requires_grad is False  # saved, never trained


def test_iresnet_real_model_matches_meta_layout():
    # The meta-device checks above must describe real models too.
    for name in ("r18", "r50"):
        assert layout(get_model(name)) == insightface_iresnet_layout(IRESNET[name][0])
    model = get_model("r18", num_features=128)
    assert layout(model) == insightface_iresnet_layout(IRESNET["r18"][0], num_features=128)


def test_r100_real_model_counts():
    model = get_model("r100")
    assert len(model.state_dict()) == 925
    assert round(num_params(model) / 1e6, 2) == 65.16


def test_mobilefacenet_layout():
    model = on_meta("mbf")
    state = model.state_dict()
    assert round(num_params(model) / 1e6, 2) == 2.06
    assert state["layers.0.layers.0.weight"].shape == (128, 3, 3, 3)  # stem ConvBlock conv, scale 2
    assert state["layers.1.layers.0.weight"].shape == (128, 2, 3, 3)  # grouped conv, groups=64
    assert state["layers.3.layers.0.layers.1.layers.0.weight"].shape == (128, 1, 3, 3)  # depthwise in a Residual
    assert state["layers.4.layers.2.layers.0.weight"].shape == (256, 256, 1, 1)  # DepthWise 128 -> 256 project
    assert state["conv_sep.layers.0.weight"].shape == (512, 256, 1, 1)
    assert state["features.layers.0.layers.0.weight"].shape == (512, 1, 7, 7)  # GDC
    assert state["features.layers.2.weight"].shape == (512, 512)
    assert state["features.layers.3.running_var"].shape == (512,)
    assert {key.split(".")[0] for key in state} == {"layers", "conv_sep", "features"}
    large = on_meta("mbf_large").state_dict()
    assert large["layers.1.layers.1.layers.0.layers.0.weight"].shape == (128, 256, 1, 1)  # 2-block Residual
    assert large["conv_sep.layers.0.weight"].shape == (512, 512, 1, 1)


@pytest.mark.parametrize("name, dim, depth", [("vit_t", 256, 12), ("vit_s", 512, 12), ("vit_b", 512, 24),
                                              ("vit_l", 768, 24)])
def test_vit_layout(name, dim, depth):
    state = on_meta(name, num_features=256).state_dict()
    expected_block = [("norm1.weight", (dim,)), ("norm1.bias", (dim,)), ("attn.qkv.weight", (3 * dim, dim)),
                      ("attn.proj.weight", (dim, dim)), ("attn.proj.bias", (dim,)), ("norm2.weight", (dim,)),
                      ("norm2.bias", (dim,)), ("mlp.fc1.weight", (4 * dim, dim)), ("mlp.fc1.bias", (4 * dim,)),
                      ("mlp.fc2.weight", (dim, 4 * dim)), ("mlp.fc2.bias", (dim,))]
    expected = [("pos_embed", (1, 144, dim)), ("mask_token", (1, 1, dim)),
                ("patch_embed.proj.weight", (dim, 3, 9, 9)), ("patch_embed.proj.bias", (dim,))]
    for index in range(depth):
        expected += [(f"blocks.{index}.{key}", shape) for key, shape in expected_block]
    expected += [("norm.weight", (dim,)), ("norm.bias", (dim,)), ("feature.0.weight", (dim, dim * 144))]
    expected += batch_norm_entries("feature.1", dim) + [("feature.2.weight", (256, dim))]
    expected += batch_norm_entries("feature.3", 256)
    assert [(key, tuple(value.shape)) for key, value in state.items()] == expected


def test_vit_variant_defaults():
    assert on_meta("vit_b_dp005_mask_005").mask_ratio == 0.05
    assert on_meta("vit_t_dp005_mask0").mask_ratio == 0.0
    model = on_meta("vit_t", drop_path_rate=0.2, mask_ratio=0.3)
    assert model.mask_ratio == 0.3 and model.blocks[-1].drop_path.rate == pytest.approx(0.2)
    assert isinstance(model.blocks[0].drop_path, nn.Identity)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_output_shape_every_model(name):
    # Shape propagation on "meta" runs every layer's shape logic without the memory of vit_l.
    model = on_meta(name, num_features=128)
    for mode in (model.eval(), model.train()):
        out = mode(torch.zeros(3, 3, *input_spec(model).image_size, device="meta"))
        assert out.shape == (3, 128) and out.dtype == torch.float32


@pytest.fixture(scope="module")
def registered_models():
    torch.manual_seed(0)
    return {name: get_model(name, num_features=64) for name in ("r18", "mbf", "vit_t")}


@pytest.fixture(scope="module")
def small_models():
    """Shallow instances of the same classes: precision and checkpointing mechanics, at a fraction of the cost."""
    torch.manual_seed(0)
    return {
        "iresnet": IResNet((1, 1, 1, 1), num_features=64, name="iresnet-tiny"),
        "mbf": MobileFaceNet((1, 1, 1, 1), scale=1, num_features=64, name="mbf-tiny"),
        "vit": VisionTransformer(64, 2, num_features=64, drop_path_rate=0.3, mask_ratio=0.1, name="vit-tiny"),
    }


def settle_batch_norm(model, images):
    """Running stats := this batch's stats, so eval mode is well scaled (fresh iresnets explode in eval)."""
    norms = [module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    momenta = [module.momentum for module in norms]
    for module in norms:
        module.momentum = 1.0
    model.train()
    with torch.no_grad():
        model(images)
    for module, momentum in zip(norms, momenta):
        module.momentum = momentum


@pytest.mark.parametrize("name", ["r18", "mbf", "vit_t"])
def test_real_forward_and_eval_determinism(registered_models, name):
    model = registered_models[name]
    images = torch.rand(3, 3, 112, 112) * 2 - 1
    settle_batch_norm(model, images)
    model.eval()
    with torch.no_grad():
        first, second = model(images), model(images)
        single = model(images[:1])
    assert first.shape == (3, 64) and first.dtype == torch.float32
    assert torch.equal(first, second)
    torch.testing.assert_close(single, first[:1], rtol=1e-4, atol=1e-4 * first.abs().max().item())


def test_wrong_input_is_a_clear_error(registered_models):
    model = registered_models["mbf"]
    with pytest.raises(BackboneError, match=r"network 'mbf': expected input \[N, 3, 112, 112\], got \[2, 3, 96, 96\]"):
        model(torch.zeros(2, 3, 96, 96))
    with pytest.raises(BackboneError, match=r"expected a float input .* got torch.uint8"):
        model(torch.zeros(2, 3, 112, 112, dtype=torch.uint8))


def conv_output_dtypes(model, run):
    dtypes = []
    first_conv = next(module for module in model.modules() if isinstance(module, nn.Conv2d))
    handle = first_conv.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    try:
        out = run()
    finally:
        handle.remove()
    return out, dtypes


@pytest.mark.parametrize("name", ["iresnet", "mbf", "vit"])
@pytest.mark.skipif(not cpu_fp16_autocast(), reason="this torch's CPU autocast has no float16 (added in torch 2.2/2.3)")
def test_fp16_trunk_autocast_and_fp32_output(small_models, name):
    model = copy.deepcopy(small_models[name])
    images = torch.rand(4, 3, 112, 112) * 2 - 1
    settle_batch_norm(model, images)
    model.eval()  # no batch coupling in BN1d, no random token masking
    with torch.no_grad():
        reference = model(images)
        model.fp16 = True
        half, dtypes = conv_output_dtypes(model, lambda: model(images))
    assert dtypes == [torch.float16]
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    # Embeddings are compared by angle, so that is what fp16 must preserve.
    cosine = torch.nn.functional.cosine_similarity(half, reference, dim=1)
    assert cosine.min() > 0.999, cosine


def test_outer_bf16_autocast_is_respected_head_stays_fp32(small_models):
    # fp16=False must not switch off the trainer's autocast (arcface_torch's autocast(False) would).
    model = small_models["iresnet"].train()
    images = torch.rand(2, 3, 112, 112) * 2 - 1
    fc_dtypes = []
    handle = model.fc.register_forward_hook(lambda module, inputs, output: fc_dtypes.append(output.dtype))
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out, dtypes = conv_output_dtypes(model, lambda: model(images))
    finally:
        handle.remove()
    assert dtypes == [torch.bfloat16] and fc_dtypes == [torch.float32] and out.dtype == torch.float32


def gradients_and_buffers(model, images, seed):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # same drop-path / token-masking draws in both runs
    out = model(images)
    (out * torch.linspace(-1, 1, out.shape[1])).sum().backward()
    grads = {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}
    buffers = {name: buf.clone() for name, buf in model.named_buffers()}
    return out.detach(), grads, buffers


@pytest.mark.parametrize("name", ["iresnet", "mbf", "vit"])
def test_gradient_checkpointing_gives_identical_gradients(small_models, name):
    plain = copy.deepcopy(small_models[name]).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing = True
    images = torch.rand(2, 3, 112, 112) * 2 - 1
    out_a, grads_a, buffers_a = gradients_and_buffers(plain, images, seed=7)
    out_b, grads_b, buffers_b = gradients_and_buffers(checkpointed, images, seed=7)
    torch.testing.assert_close(out_b, out_a)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for key in grads_a:
        torch.testing.assert_close(grads_b[key], grads_a[key], msg=key)
    # The recomputation must not update BatchNorm running statistics a second time.
    for key in buffers_a:
        torch.testing.assert_close(buffers_b[key], buffers_a[key], msg=key)


def test_vit_masking_only_in_training(small_models):
    model = copy.deepcopy(small_models["vit"])
    images = torch.rand(2, 3, 112, 112) * 2 - 1
    seen = []
    handle = model.blocks[0].register_forward_hook(lambda module, inputs, output: seen.append(output.shape[1]))
    try:
        model.train()
        model(images)
        model.eval()
        with torch.no_grad():
            model(images)
    finally:
        handle.remove()
    assert seen == [int(144 * 0.9), 144]


def test_iresnet_dropout_reaches_the_model():
    assert on_meta("r18", dropout=0.4).dropout.p == 0.4
    assert on_meta("r18").dropout.p == 0.0


def tiny_iresnet_gradients(rank, world_size, checkpointing):
    """Gradient of one rank's half-batch loss, averaged over ranks by DDP when a group exists."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = IResNet((1, 1, 1, 1), num_features=16, gradient_checkpointing=checkpointing).train()
    images = torch.rand(4, 3, 112, 112, generator=torch.Generator().manual_seed(5)) * 2 - 1
    shard = images[2 * rank:2 * rank + 2]
    if torch.distributed.is_initialized():
        model = nn.parallel.DistributedDataParallel(model)
    (model(shard) * torch.linspace(-1, 1, 16)).sum().backward()
    return {name: param.grad.numpy().copy() for name, param in model.named_parameters() if param.grad is not None}


def test_gradient_checkpointing_under_ddp(port):
    from tests.spawn_helpers import run_ranks
    ranks = run_ranks(tiny_iresnet_gradients, 2, port, True, timeout=90)
    reference = [tiny_iresnet_gradients(rank, 2, False) for rank in range(2)]
    for key, value in ranks[0].items():
        expected = (reference[0][key.removeprefix("module.")] + reference[1][key.removeprefix("module.")]) / 2
        torch.testing.assert_close(torch.from_numpy(value), torch.from_numpy(expected), msg=key)
        torch.testing.assert_close(torch.from_numpy(ranks[1][key]), torch.from_numpy(value), msg=key)


# ------------------------------------------------------------------ input convention (backbones.common)

def test_every_backbone_carries_its_input_spec():
    for name in MODEL_NAMES:
        expected = FACENET_INPUT if name == "inception_resnet_v1" else ARCFACE_INPUT
        assert on_meta(name).input_spec == expected, name
    assert ARCFACE_INPUT == InputSpec((112, 112), 127.5, 127.5)
    assert FACENET_INPUT == InputSpec((160, 160), 127.5, 128.0)
    plain = nn.Linear(2, 2)  # declares nothing: insightface's convention
    assert input_spec(plain) == ARCFACE_INPUT and input_spec(nn.DataParallel(plain)) == ARCFACE_INPUT


def test_get_model_dropout_default_is_the_networks():
    assert on_meta("r18").dropout.p == 0.0 and on_meta("tiny").dropout.p == 0.0
    assert on_meta("inception_resnet_v1").dropout.p == 0.6
    assert on_meta("mbf", dropout=None).input_spec == ARCFACE_INPUT  # None = no dropout layer, no error


def test_normalize_matches_each_reference_formula():
    pixels = torch.arange(256, dtype=torch.uint8).repeat(9).view(3, 3, 16, 16)
    # insightface's order of operations, bit for bit (arcface_torch training and eval)
    assert torch.equal(normalize(pixels, InputSpec((16, 16))), ((pixels.float() / 255) - 0.5) / 0.5)
    # facenet-pytorch's fixed_image_standardization
    assert torch.equal(normalize(pixels, InputSpec((16, 16), 127.5, 128.0)), (pixels.float() - 127.5) / 128.0)
    other = normalize(pixels, InputSpec((16, 16), 100.0, 50.0))
    assert other.dtype == torch.float32 and other[0, 0, 0, :3].tolist() == pytest.approx([-2.0, -1.98, -1.96])


def test_normalize_resizes_only_when_asked():
    pixels = torch.randint(0, 256, (2, 3, 112, 112), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    with pytest.raises(BackboneError, match=r"normalize: images are 112x112, the model expects 160x160"):
        normalize(pixels, FACENET_INPUT)
    up = normalize(pixels, FACENET_INPUT, resize=True)
    assert up.shape == (2, 3, 160, 160)
    reference = nn.functional.interpolate((pixels.float() - 127.5) / 128, size=(160, 160), mode="bilinear")
    torch.testing.assert_close(up, reference, rtol=0, atol=1e-6)
    flat = torch.full((1, 3, 224, 224), 200, dtype=torch.uint8)  # shrinking (antialiased) keeps a flat image flat
    down = normalize(flat, ARCFACE_INPUT, resize=True)
    assert down.shape == (1, 3, 112, 112) and torch.allclose(down, torch.full_like(down, 200 / 127.5 - 1))


@pytest.mark.parametrize("images, message", [
    (torch.zeros(1, 3, 112, 112), r"expected uint8 RGB images \[N, 3, H, W\], got torch.float32 \[1, 3, 112, 112\]"),
    (torch.zeros(3, 112, 112, dtype=torch.uint8), r"got torch.uint8 \[3, 112, 112\]"),
    (torch.zeros(1, 1, 112, 112, dtype=torch.uint8), r"got torch.uint8 \[1, 1, 112, 112\]"),
])
def test_normalize_bad_input(images, message):
    with pytest.raises(BackboneError, match=message):
        normalize(images, ARCFACE_INPUT)


@pytest.mark.parametrize("kwargs, message", [
    ({"image_size": (112,)}, r"image_size must be \(height, width\) positive integers, got \(112,\)"),
    ({"image_size": (0, 112)}, r"positive integers, got \(0, 112\)"),
    ({"std": 0}, r"std must be positive, got 0"),
    ({"mean": float("nan")}, r"mean must be a finite number, got nan"),
])
def test_input_spec_validation(kwargs, message):
    with pytest.raises(BackboneError, match=message):
        InputSpec(**kwargs)


def test_input_spec_metadata_round_trip():
    for spec in (ARCFACE_INPUT, FACENET_INPUT, InputSpec((96, 80), 0.5, 3.25)):
        assert InputSpec.from_metadata(spec.to_metadata()) == spec
    assert InputSpec.from_metadata({"other": "x"}) == ARCFACE_INPUT  # files written before the keys existed
    with pytest.raises(BackboneError, match=r"model.onnx: unreadable input convention in the metadata"):
        InputSpec.from_metadata({"input_height": "tall"}, "model.onnx")
