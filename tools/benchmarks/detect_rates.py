"""How close MTCNN's three networks run to this machine's convolution rate (``benchmark.py detect --breakdown``).

``network_flops`` counts the FLOPs (2 per multiply-accumulate) of every convolution and dense layer each network
runs while the torch detector detects a photo (forward hooks, in a pass of its own: the timed rounds run
without hooks). ``machine_rates`` measures, in the same process and thread count, the CPU-time rate of an fp32
GEMM (1024 x 1024 x 1024) and of a 3x3 convolution in the shape a convolution kernel runs best (64 -> 64
channels, 8 x 56 x 56, channels_last): the ceilings the networks' rates are compared with.
"""
from __future__ import annotations

import statistics
import time

import numpy as np

NETWORKS = ("pnet", "rnet", "onet")


def _macs(module, inputs, output) -> int:
    import torch

    weight = module.weight
    if isinstance(module, torch.nn.Conv2d):
        return output.numel() * weight[0].numel()
    return output.numel() * weight.shape[1]  # nn.Linear


def network_flops(detector, photo: np.ndarray) -> dict[str, float]:
    """FLOPs of the convolutions and dense layers of each network (``pnet``, ``rnet``, ``onet``) in one
    ``detector.detect(photo)`` (the torch networks; PNet's fused 1x1 heads counted from their output)."""
    import torch

    counts = {key: 0.0 for key in NETWORKS}
    handles = []
    for key, net in zip(NETWORKS, (detector.pnet, detector.rnet, detector.onet)):
        for module in net.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and module.weight.shape[-1] != 1:
                handles.append(module.register_forward_hook(
                    lambda mod, args, out, key=key: counts.__setitem__(key, counts[key] + 2 * _macs(mod, args, out))))
    heads = detector.pnet.heads

    def counted_heads(*args):
        out = heads(*args)  # [N, h, w, 6] from 32 channels: the two 1x1 heads as one 6-output convolution
        counts["pnet"] += 2 * out.numel() * 32
        return out

    detector.pnet.heads = counted_heads
    try:
        detector.detect(photo)
    finally:
        del detector.pnet.heads
        for handle in handles:
            handle.remove()
    return counts


def _cpu_rate(function, flops: float, rounds: int = 5) -> float:
    function()
    seconds = []
    for _ in range(rounds):
        start = time.process_time()
        function()
        seconds.append(time.process_time() - start)
    return flops / max(statistics.median(seconds), 1e-9) / 1e9


def machine_rates() -> dict[str, float]:
    """GFLOP/s (CPU time, median of 5) of an fp32 GEMM and of a 3x3 convolution, in this process's threads."""
    import torch
    import torch.nn.functional as F

    with torch.inference_mode():
        a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
        weight = torch.randn(64, 64, 3, 3)
        x = torch.randn(8, 64, 56, 56).contiguous(memory_format=torch.channels_last)
        return {"gemm": _cpu_rate(lambda: torch.mm(a, b), 2 * 1024 ** 3),
                "conv": _cpu_rate(lambda: F.conv2d(x, weight), 2 * 8 * 64 * 54 * 54 * 64 * 9)}


def print_rates(flops: list[dict[str, float]], medians: list[dict[str, float]], rates: dict[str, float]) -> None:
    """Per network over all photos: GFLOP, CPU seconds in its calls, GFLOP/s and that rate against the
    machine's (``rates``); ``medians`` are ``detect.breakdown``'s rows."""
    print(f"the networks against this machine's rates (CPU time, one process): fp32 GEMM {rates['gemm']:.0f} "
          f"GFLOP/s, 3x3 convolution {rates['conv']:.0f} GFLOP/s")
    total_flops = total_seconds = 0.0
    for key in NETWORKS:
        gflop = sum(row[key] for row in flops) / 1e9
        seconds = sum(row[key] for row in medians)
        total_flops, total_seconds = total_flops + gflop, total_seconds + seconds
        rate = gflop / max(seconds, 1e-9)
        print(f"  {key}: {gflop:7.2f} GFLOP in {seconds * 1000:8.1f} ms = {rate:6.1f} GFLOP/s "
              f"({rate / rates['conv']:.0%} of the convolution rate)")
    rate = total_flops / max(total_seconds, 1e-9)
    print(f"  all three: {total_flops:7.2f} GFLOP in {total_seconds * 1000:8.1f} ms = {rate:6.1f} GFLOP/s "
          f"({rate / rates['conv']:.0%} of the convolution rate); the networks at the convolution rate would take "
          f"{total_flops / rates['conv'] * 1000:.1f} ms")
