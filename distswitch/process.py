"""Settings of the process a run trains in: each worker (and each in-process run) is a process of
its own, so they are set once there, never by the library's lower modules."""

from __future__ import annotations

import ctypes
import platform

import torch

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's own upper bound on 64-bit systems


def configure_process(device: torch.device, heap: bool = True) -> None:
    """Fastest kernels for fixed shapes on CUDA, and (heap) a CPU heap that keeps what a step frees."""
    # Shapes are fixed for a run: let cuDNN pick the fastest kernels.
    torch.backends.cudnn.benchmark = device.type == "cuda"
    if heap:
        keep_freed_memory()


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for the next step instead of returning it to the OS.

    By default glibc serves a tensor of a few MB with a fresh mmap and trims the heap after large
    frees, so every step's activations start on pages the kernel must fault in and zero again:
    3,000-5,000 minor page faults per LeNet5 step on a CPU, about a fifth of its time. Fixed
    thresholds (allocations up to 32 MB from the heap, no trimming) make a step reuse the pages of
    the step before, as PyTorch's CUDA caching allocator does on a GPU; the process's peak memory
    is unchanged. Returns whether the setting took (False off glibc, e.g. macOS or musl)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
