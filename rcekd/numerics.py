"""One set of float instructions on x86-64 CPUs with AVX2, so a seed gives the same bits across CPU generations.

The last bits of a float sum depend on the instructions that compute it: torch picks its CPU kernels
by the CPU's vector extensions (AVX2 or AVX-512), and numba compiles the KD kernels for the host CPU,
where re-association lets the vector width set the order of a dot product's sums. Early stopping
carries such a difference far: the same CiteULike runs on a Zen 5 machine (AVX-512) gave test
NDCG@20 0.019331 and 0.019609 against 0.018789 and 0.019008 on the Zen 3 machine (AVX2) that made
them. With the numerics pinned as below, the Zen 5 machine gave the Zen 3 figures to the last digit.

``RCEKD_NUMERICS`` chooses:

- ``portable`` (the default): torch's AVX2 kernels (``ATEN_CPU_CAPABILITY=avx2``) and numba code for
  one fixed CPU, ``znver3`` (the machine that made this project's committed results), without its
  AMD-only extensions, so the code also runs on Intel CPUs with AVX2, FMA and BMI2. Only where the
  host has those; elsewhere nothing is pinned.
  It does not make two-thread runs deterministic on Intel CPUs: on an Intel Xeon they could differ
  from one run to the next (Adam's first step, from the same gradients; see the README), while
  one-thread runs did not.
- ``native``: the host's own (AVX-512 where present), which may be a little faster and rounds
  differently from one CPU generation to the next.

What this cannot pin is MKL, torch's BLAS and vector math (its sqrt, exp and log of large float
tensors, the sqrt in ``torch.optim.Adam`` among them): MKL picks its code path by the CPU's vendor as
well as its extensions, and its switches (``MKL_ENABLE_INSTRUCTIONS``, the ``MKL_CBWR`` branches but
``COMPATIBLE``) act on Intel CPUs only. So runs agree to the last bit across AMD generations (Zen 3,
Zen 4, Zen 5), but not between AMD and Intel: on an Intel Xeon the CiteULike MF teacher trained to other
weights (its test NDCG@20 the same to the last digit), and the KD students rerun on it came out up to
0.00052 NDCG@20 off (RCE-KD) and 0.0018 (CD) through early stopping; no MKL setting tried there
(AVX2, SSE4.2, CNR AVX2 or COMPATIBLE) gave the AMD bits. ``MKL_CBWR=COMPATIBLE`` would make both
vendors take one path, at a cost in speed, but not the path that made this project's results, so it
is not set. Runs record the vendor and MKL's settings (:mod:`rcekd.platform_record`).

Variables already in the environment win, and this module imports neither torch nor numba: it has to
run before they load (``rcekd/__init__.py`` calls :func:`pin_numerics` first thing). Torch reads its
variable lazily, so importing torch first is harmless; numba reads its own at import, so importing
numba first leaves it on the host CPU, with a warning.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Mapping, MutableMapping
from pathlib import Path

MODES = ("portable", "native")
#: what portable mode sets, unless the environment sets it already
PORTABLE_SETTINGS = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "NUMBA_CPU_NAME": "znver3",
    # AMD-only instructions off (numeric loops never need them), so the code runs on Intel CPUs too
    "NUMBA_CPU_FEATURES": "-sse4a,-clzero,-mwaitx,-rdpru,-wbnoinvd",
}
#: CPU flags (as /proc/cpuinfo names them) that code for the pinned target may use in numeric loops
REQUIRED_FLAGS = frozenset({"avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "popcnt", "movbe"})


class NumericsError(ValueError):
    """An unknown ``RCEKD_NUMERICS`` value."""


def cpuinfo_field(name: str, cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """The first ``name : value`` of /proc/cpuinfo (Linux), or None where it cannot be read."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The host CPU's flags (Linux); empty where they cannot be read, which leaves the host's numerics."""
    return frozenset((cpuinfo_field("flags", cpuinfo) or "").split())


def numerics_settings(environ: Mapping[str, str], flags: frozenset[str]) -> dict[str, str]:
    """The variables to set for the mode ``environ`` asks for on a CPU with ``flags`` (none that the
    environment already sets)."""
    mode = environ.get("RCEKD_NUMERICS", "portable").strip().lower() or "portable"
    if mode not in MODES:
        raise NumericsError(f"RCEKD_NUMERICS must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "native" or not flags >= REQUIRED_FLAGS:
        return {}
    return {name: value for name, value in PORTABLE_SETTINGS.items() if name not in environ}


def pin_numerics(
    environ: MutableMapping[str, str] | None = None, flags: frozenset[str] | None = None
) -> dict[str, str]:
    """Apply :func:`numerics_settings` to the process environment (or ``environ``); returns what it set."""
    environ = os.environ if environ is None else environ
    settings = numerics_settings(environ, cpu_flags() if flags is None else flags)
    environ.update(settings)
    if environ is os.environ and "numba" in sys.modules and any(name.startswith("NUMBA_") for name in settings):
        warnings.warn(
            "numba was imported before rcekd, so it compiles for the host CPU, not the pinned one: "
            "import rcekd first for results that reproduce across CPUs (runs record what was used)",
            RuntimeWarning,
            stacklevel=2,
        )
    return settings
