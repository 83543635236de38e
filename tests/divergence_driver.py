"""Test driver: train.py with a loss spike injected at chosen steps, and the state after each rollback dumped.

    python tests/divergence_driver.py SPIKE_STEPS DUMP_DIR CONFIG [--set key=value ...]
    torchrun ... tests/divergence_driver.py SPIKE_STEPS DUMP_DIR CONFIG [--set ...]

SPIKE_STEPS: comma-separated optimizer steps whose loss, as the trainer sees it after the backward, is
multiplied by 100 (the weights and gradients are those of the real step: only the detectors see a spike).
Each snapshot and each rollback has every rank write ``DUMP_DIR/rank<r>_snapshot_step<s>.pt`` and
``DUMP_DIR/rank<r>_rollback<n>.pt``: the backbone's state_dict (with this rank's BatchNorm statistics), the
head's world-size independent state (gathered, rank 0), the optimizer's and the scaler's state; the test
compares each rollback with the snapshot it returned to and with the checkpoint written at that step.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import train  # noqa: E402
from utils.run import divergence  # noqa: E402
from utils.run.state import head_state_dict  # noqa: E402


def main() -> int:
    spike_steps = {int(step) for step in sys.argv[1].split(",") if step}
    dump_dir = Path(sys.argv[2])
    dump_dir.mkdir(parents=True, exist_ok=True)
    calls = {"steps": 0, "rollbacks": 0}
    forward_backward = train.forward_backward

    def spiking(*args, **kwargs):
        loss, similarity = forward_backward(*args, **kwargs)
        calls["steps"] += 1
        return (loss * 100 if calls["steps"] in spike_steps else loss), similarity

    restore, take = divergence.DivergenceGuard.restore_snapshot, divergence.DivergenceGuard.take_snapshot
    rank = int(os.environ.get("RANK", "0"))

    def state_of(guard: divergence.DivergenceGuard, step: int) -> dict:
        backbone, head, optimizer, scaler = guard.parts[:4]
        return {"backbone": backbone.state_dict(), "head": head_state_dict(head), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "step": step}

    def restoring(self) -> None:
        restore(self)
        calls["rollbacks"] += 1
        torch.save(state_of(self, self.snapshot["step"]), dump_dir / f"rank{rank}_rollback{calls['rollbacks']}.pt")

    def taking(self, step: int, samples: int) -> None:
        take(self, step, samples)
        torch.save(state_of(self, step), dump_dir / f"rank{rank}_snapshot_step{step}.pt")

    train.forward_backward = spiking
    divergence.DivergenceGuard.restore_snapshot = restoring
    divergence.DivergenceGuard.take_snapshot = taking
    return train.main(sys.argv[3:])


if __name__ == "__main__":
    from utils.run.exit import leave

    leave(main())  # as train.py ends (utils/run/exit.py: no abort at exit on 2 ranks)
