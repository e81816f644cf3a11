"""Device, threads, precision, seeding and the environment record every run directory keeps."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import platform
import random
import resource
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from kagglecmr.utils.errors import ConfigError

PACKAGES = ("torch", "torchvision", "segmentation-models-pytorch", "timm", "albumentations", "numpy",
            "opencv-python-headless", "scikit-learn", "pandas", "kagglecmr")


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` -> first GPU when present, else CPU; ``cuda`` / ``cuda:N`` / ``cpu`` as given."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"--device {spec}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {spec}: no CUDA GPU is available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {spec}: only {torch.cuda.device_count()} GPU(s) present")
    elif dev.type != "cpu":
        raise ConfigError(f"--device {spec}: unsupported device type '{dev.type}'")
    return dev


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def setup_threads(threads: int = 0) -> int:
    """One pool of ``threads`` (0 = all cores) for torch; OpenCV single-threaded (no oversubscription)."""
    import cv2

    n = threads or cpu_count()
    torch.set_num_threads(n)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    cv2.setNumThreads(1)
    return n


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.amp`` on ``device`` (``None`` = full float32)."""
    if mode == "none":
        return None
    if mode == "fp16":
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    if mode == "bf16":
        return torch.bfloat16
    # auto: bf16 on GPUs that have it and on CPUs (where torch autocasts to bf16), fp16 on older GPUs
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(*parts: int) -> int:
    """Seed python, numpy and torch from a tuple (seed, fold, epoch, ...); returns the derived seed."""
    seed = int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return seed


def git_commit(path: Path | None = None) -> str:
    path = path or Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=path,
                               capture_output=True, text=True, timeout=5)
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def environment(device: torch.device) -> dict:
    return {
        "packages": package_versions(),
        "git_commit": git_commit(),
        "device": str(device),
        "device_name": device_name(device),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }


_LIBC: list = []


def release_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc's ``malloc_trim``): after blocks of large allocations of
    varied sizes (tiled validation, OOF), freed memory otherwise stays in the process's resident set. A no-op
    where the C library has no ``malloc_trim`` (macOS, musl)."""
    if not _LIBC:
        try:
            _LIBC.append(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim)
        except (OSError, AttributeError):
            _LIBC.append(None)
    if _LIBC[0] is not None:
        _LIBC[0](0)
