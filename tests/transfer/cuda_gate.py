"""A deterministic gate on a CUDA stream for the race tests: a host function that blocks the stream
with the GPU idle, so the work queued behind it waits while another process's work runs at once.

A long kernel (`torch.cuda._sleep`) is no such gate: on one GPU the driver time-slices two
processes' contexts, and whether the other process's copy runs inside that kernel depends on the
scheduler. Here the host function is libc's `usleep` itself, launched with `cuLaunchHostFunc`: no
Python (and no GIL) runs on the driver's callback thread, and nothing on the GPU runs for this
stream until it returns.
"""

from __future__ import annotations

import ctypes

import torch

_MAX_S = 0.9  # usleep takes fewer than a million microseconds


def hold_stream(seconds: float, stream: torch.cuda.Stream | None = None) -> None:
    """Queue `seconds` of host-side wait on `stream` (default: the current one); returns at once."""
    if not 0 < seconds <= _MAX_S:
        raise ValueError(f"hold_stream: seconds must be in (0, {_MAX_S}], got {seconds!r}")
    stream = stream or torch.cuda.current_stream()
    libcuda = ctypes.CDLL("libcuda.so.1")
    # CUhostFn is void(*)(void*); usleep(useconds_t) reads the same first integer register
    usleep = ctypes.cast(ctypes.CDLL(None).usleep, ctypes.c_void_p)
    libcuda.cuLaunchHostFunc.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    rc = libcuda.cuLaunchHostFunc(stream.cuda_stream, usleep, int(seconds * 1e6))
    if rc != 0:
        raise RuntimeError(f"cuLaunchHostFunc failed with CUresult {rc}")
