"""Devices and processes: CPU / CUDA / Ascend NPU selection, process groups, AMP (device.py), and
collectives that also work without a process group (distributed.py). Imports nothing else of ours."""
