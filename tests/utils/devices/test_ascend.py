"""utils/devices/ascend.py and device.py's NPU branch on CPU, with a stand-in ``torch_npu`` module put in
``sys.modules`` (no NPU here): torch_npu's GradScaler and a saturated fp16 overflow, bf16 by chip,
ModelZoo's ASCEND_DEVICE_ID / RANK_SIZE, the NPU count check, an installed torch_npu that fails to import.

The stand-in follows torch_npu's documented API (Ascend/pytorch: torch_npu/npu/amp/grad_scaler.py,
torch_npu/npu/utils.py): ``npu.is_available``, ``device_count``, ``set_device``, ``get_device_name``,
``is_bf16_supported``, ``npu.utils.is_support_inf_nan`` and ``npu.amp.GradScaler``, whose unscale reads
(and clears) the float-status overflow flag in saturation mode.
"""
import sys
import types

import pytest
import torch

import losses
from partial_fc import PartialFC
from pfc.optim import build_joint_optimizer
from utils.devices import ascend, compat
from utils.devices import device as devices


class FakeTorchNpu:
    """What the tests set on the stand-in, and what it recorded."""

    def __init__(self, monkeypatch, inf_nan=False, count=8, name="Ascend910A", bf16=None, available=True):
        self.overflow_flag = False  # the chip's float-status flag: set by any op that saturated
        self.selected = []
        module = types.ModuleType("torch_npu")
        npu = types.SimpleNamespace(is_available=lambda: available, device_count=lambda: count,
                                    set_device=self.selected.append, get_device_name=lambda index=None: name,
                                    utils=types.SimpleNamespace(is_support_inf_nan=lambda: inf_nan))
        if bf16 is not None:
            npu.is_bf16_supported = lambda: bf16
        fake = self

        class GradScaler(compat.grad_scaler("cpu", enabled=False).__class__):
            """torch_npu.npu.amp.GradScaler on CPU tensors: in saturation mode the unscale kernel reads the
            float-status flag, clears it, and counts an overflow in found_inf."""

            def __init__(self, **options):
                super().__init__("cpu", **options)

            def _unscale_grads_(self, optimizer, inv_scale, found_inf, allow_fp16):
                per_device = super()._unscale_grads_(optimizer, inv_scale, found_inf, allow_fp16)
                if not inf_nan and fake.overflow_flag:
                    fake.overflow_flag = False
                    for value in per_device.values():
                        value.add_(1)
                return per_device

        npu.amp = types.SimpleNamespace(GradScaler=GradScaler)
        module.npu = npu
        self.module = module
        monkeypatch.setitem(sys.modules, "torch_npu", module)
        if torch._C._get_privateuse1_backend_name() != "npu":
            torch.utils.rename_privateuse1_backend("npu")  # what torch_npu does on import: "npu:3" is a device


def npu_ctx(index=0):
    return devices.DeviceContext("npu", torch.device("cpu"), 0, index, 1, "hccl")


def single_process(monkeypatch, **env):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "ASCEND_DEVICE_ID", "RANK_SIZE",
                "HCCL_IF_IP", "HCCL_SOCKET_IFNAME"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def _joint(scaler):
    torch.manual_seed(0)
    backbone = torch.nn.Linear(6, 8)
    head = PartialFC(losses.CombinedMarginLoss(32.0, 1.0, 0.3, 0.0), 8, 40, sample_rate=0.5, seed=2)
    joint = build_joint_optimizer("sgd", backbone.parameters(), head, lr=0.1, scaler=scaler)
    return backbone, head, joint


def _scaled_backward(backbone, head, scaler, seed):
    generator = torch.Generator().manual_seed(seed)
    images, labels = torch.randn(12, 6, generator=generator), torch.randint(0, 40, (12,), generator=generator)
    loss = head(backbone(images), labels)
    scaler.scale(loss).backward()
    return loss.item()


@pytest.mark.skipif(not compat.GRAD_SCALER_DEVICE_ARG, reason="an enabled GradScaler on CPU needs torch >= 2.3")
def test_saturated_fp16_overflow_skips_the_whole_step_and_backs_the_scale_off(monkeypatch):
    fake = FakeTorchNpu(monkeypatch, inf_nan=False)
    scaler = devices.grad_scaler(npu_ctx(), fp16=True)
    assert isinstance(scaler, fake.module.npu.amp.GradScaler) and scaler.is_enabled()
    backbone, head, joint = _joint(scaler)
    weight, backbone_weight, scale = head.weight.clone(), backbone.weight.detach().clone(), scaler.get_scale()
    loss = _scaled_backward(backbone, head, scaler, 0)
    # Saturation mode: the overflow clamped to +-65504, every gradient is finite, only the flag knows.
    fake.overflow_flag = True
    assert all(torch.isfinite(p.grad).all() for p in backbone.parameters()) and head.grads_finite()
    outcome = joint.step(loss=loss)
    joint.zero_grad()
    assert not outcome.stepped and not outcome.grads_finite and outcome.loss_finite
    assert torch.equal(head.weight, weight) and torch.equal(backbone.weight, backbone_weight)
    assert scaler.get_scale() == scale / 2 and not fake.overflow_flag
    # The flag is clear now: the next step moves both the backbone and the head.
    outcome = joint.step(loss=_scaled_backward(backbone, head, scaler, 1))
    assert outcome.stepped and not torch.equal(head.weight, weight)
    assert not torch.equal(backbone.weight, backbone_weight)


@pytest.mark.skipif(not compat.GRAD_SCALER_DEVICE_ARG, reason="an enabled GradScaler on CPU needs torch >= 2.3")
def test_the_flag_verdict_is_read_only_from_torch_npu_scalers_in_saturation_mode(monkeypatch):
    FakeTorchNpu(monkeypatch, inf_nan=True)  # Atlas A2/A3: overflow is inf/nan, the finite checks see it
    scaler = devices.grad_scaler(npu_ctx(), fp16=True)
    backbone, head, joint = _joint(scaler)
    _scaled_backward(backbone, head, scaler, 0)
    scaler.unscale_(joint.backbone_optimizer)
    scaler._per_optimizer_states[id(joint.backbone_optimizer)]["found_inf_per_device"] = {"cpu": torch.ones(1)}
    assert not devices.scaler_found_overflow(scaler, joint.backbone_optimizer)  # no host sync asked for
    plain = compat.grad_scaler("cpu", enabled=True)
    assert not devices.scaler_found_overflow(plain, joint.backbone_optimizer)
    assert not devices.grad_scaler(npu_ctx(), fp16=False).is_enabled()


@pytest.mark.parametrize("name, query, supported", [("Ascend910A", None, False), ("Ascend910ProB", None, False),
                                                     ("Ascend910B3", None, True), ("Ascend910_9391", None, True),
                                                     ("Ascend910B3", False, False), ("Ascend910A", True, True)])
def test_bf16_only_where_the_npu_has_it(monkeypatch, name, query, supported):
    FakeTorchNpu(monkeypatch, name=name, bf16=query)
    assert devices.bf16_supported(npu_ctx()) is supported
    if supported:
        assert devices.resolve_precision(npu_ctx(), False, True) == (False, True)
    else:
        with pytest.raises(devices.DeviceError, match=r"config key 'bf16' is True but .* has no bf16 \(torch_npu "
                                                      r"reports no bf16: .*\); use fp16=True"):
            devices.resolve_precision(npu_ctx(), False, True)
    assert devices.resolve_precision(npu_ctx(), True, False) == (True, False)


def test_ascend_device_id_picks_the_card_of_a_single_process_run(monkeypatch):
    fake = FakeTorchNpu(monkeypatch, name="Ascend910B3")
    single_process(monkeypatch, ASCEND_DEVICE_ID="3")
    ctx = devices.setup("npu")
    assert ctx.device == torch.device("npu", 3) and fake.selected == [3]
    assert ctx.chosen == "device npu:3 (Ascend910B3), backend hccl, world size 1"
    single_process(monkeypatch)
    assert devices.setup("auto").device == torch.device("npu", 0) and fake.selected == [3, 0]
    single_process(monkeypatch, ASCEND_DEVICE_ID="9")
    with pytest.raises(devices.DeviceError, match=r"^ASCEND_DEVICE_ID=9 but only 8 NPU\(s\) are visible$"):
        devices.setup("npu")
    single_process(monkeypatch, ASCEND_DEVICE_ID="x")
    with pytest.raises(ascend.AscendError, match=r"ASCEND_DEVICE_ID='x': expected a device number"):
        devices.setup("npu")


def test_npu_count_and_modelzoo_variables_are_checked_before_joining(monkeypatch):
    fake = FakeTorchNpu(monkeypatch, count=2)
    # Eight local processes (torchrun --nproc_per_node=8) on a node that shows two NPUs.
    single_process(monkeypatch, WORLD_SIZE="8", RANK="5", LOCAL_RANK="5", LOCAL_WORLD_SIZE="8",
                   ASCEND_RT_VISIBLE_DEVICES="0,1")
    with pytest.raises(devices.DeviceError, match=r"^LOCAL_RANK=5 but only 2 NPU\(s\) are visible "
                                                  r"\(ASCEND_RT_VISIBLE_DEVICES='0,1'\)$"):
        devices.setup("npu")
    single_process(monkeypatch, WORLD_SIZE="2", RANK="1", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2", ASCEND_DEVICE_ID="0")
    with pytest.raises(ascend.AscendError, match=r"ASCEND_DEVICE_ID=0 is set but 2 processes run on this node"):
        devices.setup("npu")
    single_process(monkeypatch, RANK_SIZE="8")
    with pytest.raises(ascend.AscendError, match=r"^RANK_SIZE=8 \(Ascend ModelZoo\) but this run has 1 rank\(s\), 1 on "
                                                 r"this node: launch 8 processes with torchrun --nproc_per_node=8"):
        devices.setup("npu")
    assert fake.selected == []  # refused before touching a device
    # RANK_SIZE as the cards of this node (4 nodes x 8) passes; the multi-node NIC warning is given.
    assert ascend.check_rank_size(32, 8) is None
    single_process(monkeypatch)
    assert ascend.interface_warning(32, 8).startswith("several nodes and neither HCCL_IF_IP nor HCCL_SOCKET_IFNAME")
    assert ascend.interface_warning(8, 8) == ""
    monkeypatch.setenv("HCCL_SOCKET_IFNAME", "eth0")
    assert ascend.interface_warning(32, 8) == ""


def test_an_installed_torch_npu_that_fails_to_import_is_named(monkeypatch, tmp_path):
    package = tmp_path / "torch_npu"
    package.mkdir()
    (package / "__init__.py").write_text(
        "raise ImportError('libascendcl.so: cannot open shared object file: No such file or directory')\n")
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(torch.version, "cuda", None)  # a CPU build of torch: only torch_npu's failure to explain
    single_process(monkeypatch)
    why = "torch_npu is installed but failed to import: ImportError: libascendcl.so: cannot open shared object file"
    with pytest.raises(devices.DeviceError, match=f"^device='npu' requested but {why}"):
        devices.setup("npu")
    ctx = devices.setup("auto")
    assert ctx.kind == "cpu" and ctx.warnings == (f"device=auto trains on CPU: {why}: No such file or directory",)
    assert ctx.chosen.startswith("device cpu, backend gloo, world size 1; chosen by device=auto (npu: ")
    FakeTorchNpu(monkeypatch, available=False)
    ctx = devices.setup("auto")
    assert ctx.kind == "cpu" and "torch.npu.is_available() is False" in ctx.warnings[0]
