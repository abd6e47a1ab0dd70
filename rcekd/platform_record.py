"""What a training run's floating-point results depend on below the code, kept in its manifest.

Same code, same seed and the same teacher bits give the same student on one AMD machine on any thread
count (on an Intel one, on one thread: see the README), but the last bits of a float sum depend on
the instructions that compute it: torch picks its kernels by the CPU's vector extensions (AVX2,
AVX-512), numba compiles the KD kernels for the host CPU (with re-association allowed, the vector
width sets the order of a dot product's sums), and MKL
(torch's BLAS and vector math: its sqrt, exp and log of large tensors, Adam's sqrt among them) picks
its code path by the CPU's vendor as well as its extensions. Early
stopping can carry such a difference to ±0.001 NDCG@20 on a CiteULike seed, so a run records where it
ran, and two runs that disagree can be told apart from a bug. By default :mod:`rcekd.numerics` pins
both (AVX2 kernels, numba code for one fixed CPU), and the record shows whether it did; MKL cannot be
pinned across vendors (see :mod:`rcekd.numerics`), so the record names the vendor and MKL's settings.
"""

from __future__ import annotations

import os
import platform
from typing import Any

import numba
import numpy
import torch
from llvmlite import binding

from rcekd.numerics import cpuinfo_field


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    return cpuinfo_field("model name") or platform.processor() or platform.machine()


def mkl_settings() -> str:
    """MKL's settings from the environment (``MKL_CBWR``, ``MKL_ENABLE_INSTRUCTIONS``,
    ``MKL_NUM_THREADS``), or ``auto``: the path MKL picks itself differs between Intel and AMD CPUs."""
    settings = [
        f"{name}={os.environ[name]}"
        for name in ("MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "MKL_NUM_THREADS")
        if os.environ.get(name)
    ]
    return ",".join(settings) or "auto"


def numba_target() -> str:
    """The CPU numba compiles for: ``NUMBA_CPU_NAME`` when set, else the host's LLVM name (znver3, …)."""
    configured = numba.config.CPU_NAME
    if configured:
        return str(configured)
    return str(binding.get_host_cpu_name())


def numba_features() -> str:
    """The CPU features numba compiles with: ``NUMBA_CPU_FEATURES`` when set (portable numerics,
    :mod:`rcekd.numerics`), else the host's."""
    configured = numba.config.CPU_FEATURES
    return "host" if configured is None else str(configured)


def platform_record(device: str = "cpu") -> dict[str, Any]:
    """The machine facts a run's numbers depend on: CPU, vector extensions, library versions."""
    record: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_vendor": cpuinfo_field("vendor_id") or "unknown",
        "mkl": mkl_settings(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "numba_target": numba_target(),
        "numba_features": numba_features(),
        "torch": torch.__version__,
        "numba": numba.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        record["cuda_device"] = torch.cuda.get_device_name(torch.device(device))
    return record
