"""train.py on two spawned gloo ranks, watched from inside: gradient accumulation against the same global
batch without it, the dtype of every collective of a run (training, verification, checkpoints), and the
host syncs and collectives of each optimizer step.

Each rank runs ``train.main`` in-process (tests/spawn_helpers.py), so the test can replace the backbone and
wrap ``torch.distributed``'s collectives and the Tensor methods that read a value back to the host.
"""
from __future__ import annotations

import collections
import os
import sys
import threading

import pytest
import torch

from tests.conftest import REPO_ROOT
from tests.spawn_helpers import run_ranks
from utils.run.checkpoint import list_checkpoints, load_checkpoint
from utils.data.synthetic import make_identity_set

# What NCCL and HCCL both carry. HCCL reduces int8/16/32/64, fp16, fp32 and bf16 only (no fp64, no uint8);
# its gathers and broadcasts also carry uint8 (torch's object collectives pickle into uint8), see
# docs/training.md "GPU, Ascend and multi-node checklist" for the sources.
REDUCE_DTYPES = {torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.float32, torch.bfloat16}
MOVE_DTYPES = REDUCE_DTYPES | {torch.uint8}
REDUCING = {"all_reduce", "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_reduce_coalesced"}
COLLECTIVES = ("all_reduce", "all_reduce_coalesced", "reduce", "all_gather", "all_gather_into_tensor", "broadcast",
               "reduce_scatter", "reduce_scatter_tensor", "gather", "scatter", "all_to_all", "all_to_all_single",
               "all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list", "barrier",
               "send", "recv", "isend", "irecv")
HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu")
# Collectives of the model's own computation (Partial FC's gathers and distributed softmax, the gradient of
# the gathered embeddings, DDP's bucket hook); anything else is a control collective.
DATA_PATH = {"_forward_fp32", "softmax_cross_entropy_", "backward", "hook"}
# The DataLoader's own code: host-side sample preparation (in worker processes when num_workers > 0).
LOADER = os.path.join("torch", "utils", "data") + os.sep


class BatchNormFreeNet(torch.nn.Module):
    """A conv + linear backbone without BatchNorm: its gradients do not depend on how a batch is split into
    micro-batches, so accumulation must reproduce the unsplit batch up to float rounding."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 8, stride=8)
        self.fc = torch.nn.Linear(4 * 14 * 14, num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.fixture(scope="module")
def identity_set(tmp_path_factory) -> str:
    """128 training images of 16 identities plus verification pairs, written once for the module."""
    out = str(tmp_path_factory.mktemp("ids") / "set")
    return make_identity_set(out, num_identities=16, images_per_identity=8, num_val_identities=4,
                             num_val_pairs=20, seed=5)


def write_config(tmp_path, name: str, **keys) -> str:
    values = dict(device="cpu", network="tiny", embedding_size=32, batch_size=8, num_epoch=1, lr=0.05, seed=1,
                  num_workers=0, frequent=100, verbose=0, tensorboard=False, keep_checkpoints=20,
                  output=str(tmp_path / f"out_{name}"))
    values.update(keys)
    path = tmp_path / f"{name}.py"
    path.write_text("from easydict import EasyDict as edict\nconfig = edict()\n"
                    + "".join(f"config.{key} = {value!r}\n" for key, value in values.items()))
    return str(path)


def _run_configs(rank: int, world_size: int, configs: list[str]) -> None:
    """Each config through ``train.main`` on this rank, with the BatchNorm-free backbone and one process group."""
    import train
    from utils.devices import device as devices

    devices.teardown = lambda together=False: None  # the spawn helper owns the group
    train.get_model = lambda name, **kwargs: BatchNormFreeNet(kwargs["num_features"])
    for config in configs:
        assert train.main([config]) == 0, f"rank {rank}: {config} failed"


@pytest.mark.timeout(300)
def test_gradient_accumulation_on_two_ranks_equals_the_same_global_batch(tmp_path, identity_set, port):
    """2 ranks x 8 images x gradient_acc 2 against 2 ranks x 16 images: the same 32 samples every step (the
    sampler splits one global order), so after 8 steps (two epochs, momentum, the 5.0 grad-norm clip, Partial
    FC on two shards) the backbone and the head must agree. Without the static_graph fix the accumulating
    run dies on its first step (pytorch#143580)."""
    common = dict(rec=identity_set, num_epoch=2, val_targets=[])  # 128 images / 32 per step = 4 steps per epoch
    accumulated = write_config(tmp_path, "acc", gradient_acc=2, batch_size=8, **common)
    whole = write_config(tmp_path, "whole", gradient_acc=1, batch_size=16, **common)
    run_ranks(_run_configs, 2, port, [accumulated, whole], timeout=240)
    outputs = {name: str(tmp_path / f"out_{name}") for name in ("acc", "whole")}
    logs = {name: open(os.path.join(out, "training.log")).read() for name, out in outputs.items()}
    assert "global batch 32 (8 x 2 ranks x 2 acc), 4 steps/epoch, 8 steps" in logs["acc"]
    assert "global batch 32 (16 x 2 ranks x 1 acc), 4 steps/epoch, 8 steps" in logs["whole"]
    assert "DDP runs with static_graph=False" in logs["acc"]
    states = {name: load_checkpoint(list_checkpoints(out)[-1]) for name, out in outputs.items()}
    assert states["acc"]["step"] == states["whole"]["step"] == 8
    backbone, reference = states["acc"]["backbone"], states["whole"]["backbone"]
    initial = BatchNormFreeNet(32).state_dict()
    for key in reference:
        assert not torch.allclose(reference[key], initial[key], atol=1e-3), f"{key} did not train"
        torch.testing.assert_close(backbone[key], reference[key], rtol=1e-5, atol=1e-6, msg=key)
    torch.testing.assert_close(states["acc"]["head"]["weight"], states["whole"]["head"]["weight"],
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(states["acc"]["head"]["optimizer"]["momentum_buffer"],
                               states["whole"]["head"]["optimizer"]["momentum_buffer"], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- what one rank's run asks of the process group

def _origin() -> tuple[str, ...]:
    """The functions of this repository (tests excluded) on the stack, innermost first (at most 4)."""
    names, frame = [], sys._getframe(2)
    while frame is not None and len(names) < 4:
        path = frame.f_code.co_filename
        if path.startswith(REPO_ROOT) and os.sep + "tests" + os.sep not in path:
            names.append(frame.f_code.co_name)
        frame = frame.f_back
    return tuple(names)


def _recorded_run(rank: int, world_size: int, config: str) -> dict:
    """Run ``config`` with every torch.distributed collective and every host read of a tensor recorded, each
    tagged with the optimizer step in progress (0: before the first forward; step k: from step k's first
    forward to step k+1's)."""
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    import train
    from utils.devices import device as devices

    devices.teardown = lambda together=False: None
    window, inside = [0], [False]
    collectives, host_reads = [], []

    def tensors(value):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            for item in value:
                yield from tensors(item)

    def wrap_collective(name, original):
        def recorded(*args, **kwargs):
            found = [t for value in list(args) + list(kwargs.values()) for t in tensors(value)]
            collectives.append((window[0], name, sorted({str(t.dtype) for t in found}),
                                max((t.numel() for t in found), default=0), _origin()))
            return original(*args, **kwargs)
        return recorded

    for name in COLLECTIVES:
        if hasattr(c10d, name):
            wrapper = wrap_collective(name, getattr(c10d, name))
            setattr(c10d, name, wrapper)  # object collectives call their tensor collectives through here
            setattr(dist, name, wrapper)

    def loading_data() -> bool:  # num_workers=0 (spawned ranks are daemons): the loader runs in this thread
        frame = sys._getframe(2)
        while frame is not None:
            if LOADER in frame.f_code.co_filename:
                return True
            frame = frame.f_back
        return False

    def wrap_read(name, original):
        def recorded(self, *args, **kwargs):
            if inside[0] or threading.current_thread() is not threading.main_thread() or loading_data():
                return original(self, *args, **kwargs)
            inside[0] = True
            try:
                host_reads.append((window[0], name, _origin()))
                return original(self, *args, **kwargs)
            finally:
                inside[0] = False
        return recorded

    for name in HOST_READS:
        setattr(torch.Tensor, name, wrap_read(name, getattr(torch.Tensor, name)))
    forward_backward = train.forward_backward

    def next_step(*args, **kwargs):
        window[0] += 1
        return forward_backward(*args, **kwargs)

    train.forward_backward = next_step
    assert train.main([config]) == 0
    return {"collectives": collectives, "host_reads": host_reads}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, identity_set) -> tuple[list[dict], str]:
    """One 2-rank run, 8 steps of 2 micro-steps: verification before training, at step 4 and at the end,
    checkpoints at both epoch ends, a log line at steps 4 and 8."""
    from tests.conftest import free_port

    tmp_path = tmp_path_factory.mktemp("recorded")
    config = write_config(tmp_path, "rec", rec=identity_set, gradient_acc=2, num_epoch=2, frequent=4, verbose=4,
                          val_targets=["synthetic_unseen"], verify_at_start=True)
    return run_ranks(_recorded_run, 2, free_port(), config, timeout=240), str(tmp_path / "out_rec")


@pytest.mark.timeout(300)
def test_every_collective_uses_a_dtype_nccl_and_hccl_both_carry(recorded):
    results, output = recorded
    assert load_checkpoint(list_checkpoints(output)[-1])["step"] == 8
    for rank, result in enumerate(results):
        seen = collections.Counter()
        for step, name, dtypes, numel, origin in result["collectives"]:
            allowed = REDUCE_DTYPES if name in REDUCING else MOVE_DTYPES
            assert {str(dtype) for dtype in allowed} >= set(dtypes), (rank, step, name, dtypes, origin)
            seen.update(origin)
        # The run really went through each part: decisions, training, verification and checkpoints.
        for part in ("all_ranks_min", "rank0_decides", "_forward_fp32", "softmax_cross_entropy_", "hook", "step",
                     "gather_shards", "_gather_to_rank0", "gather_rng_states", "full_state_dict"):
            assert seen[part], f"rank {rank}: no collective from {part}"


@pytest.mark.timeout(300)
def test_a_training_step_reads_the_host_once_and_agrees_in_one_small_all_reduce(recorded):
    """Steps 1-3 and 5-7 log nothing, verify nothing and save nothing: each must cost one host read (the
    optimizer's decision) and one control all-reduce; the rest is the model's own communication."""
    results, _ = recorded
    for rank, result in enumerate(results):
        for step in (1, 2, 3, 5, 6, 7):
            reads = [(name, origin) for window, name, origin in result["host_reads"] if window == step]
            assert [(name, origin[:2]) for name, origin in reads] == [("tolist", ("step", "train"))], (rank, step, reads)
            calls = [(name, dtypes, numel, origin) for window, name, dtypes, numel, origin in result["collectives"]
                     if window == step]
            control = [call for call in calls if not DATA_PATH & set(call[3])]
            assert [(name, dtypes) for name, dtypes, _, _ in control] == [("all_reduce", ["torch.float32"])], \
                (rank, step, control)
            assert control[0][2] <= 8 and control[0][3][:2] == ("all_reduce_", "step")
            data = collections.Counter(next(part for part in origin if part in DATA_PATH) + ":" + name
                                       for name, _, _, origin in calls if DATA_PATH & set(origin))
            # Per micro-step: embeddings and labels gathered, the softmax's max and sum, the gathered
            # embeddings' gradient; DDP's bucket all-reduce once per step (after the last micro-step).
            assert data["_forward_fp32:all_gather"] == 4 and data["softmax_cross_entropy_:all_reduce"] == 4
            assert data["backward:all_reduce"] == 2 and data["hook:all_reduce"] >= 1
            assert sum(data.values()) == 10 + data["hook:all_reduce"]


def test_fp16_compression_with_bf16_is_a_one_line_error(tmp_path, identity_set, capsys):
    import train

    config = write_config(tmp_path, "bf16", rec=identity_set, bf16=True, fp16_grad_compression=True)
    assert train.main([config]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: config keys 'fp16_grad_compression' and 'bf16': both True")
    assert not os.path.exists(tmp_path / "out_bf16")  # refused before anything started
