"""Run a function on several spawned gloo ranks with a hard timeout; fail fast when a rank dies."""
import os
import queue as queue_module
import time
import traceback

import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(fn, rank, world_size, port, args, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        results.put((rank, "ok", fn(rank, world_size, *args)))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            # Together, as utils/devices/device.py's teardown does: on torch 2.1 a rank that destroys its gloo
            # group while the other still finishes can hang in destroy_process_group.
            dist.barrier()
            dist.destroy_process_group()


def run_ranks(fn, world_size: int, port: int, *args, timeout: float = 90.0) -> list:
    """``fn(rank, world_size, *args)`` on each rank; returns the results ordered by rank."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_entry, args=(fn, rank, world_size, port, args, results), daemon=True)
             for rank in range(world_size)]
    for proc in procs:
        proc.start()
    collected, deadline = {}, time.monotonic() + timeout
    try:
        while len(collected) < world_size:
            try:
                rank, status, value = results.get(timeout=1.0)
            except queue_module.Empty:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"ranks {sorted(set(range(world_size)) - set(collected))} did not finish in {timeout}s")
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead and results.empty():
                    raise RuntimeError(f"a rank exited with code {dead[0]} before reporting")
                continue
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            collected[rank] = value
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    return [collected[rank] for rank in range(world_size)]
