"""rcekd: distil big recommenders into small ones with RCE-KD, and serve them.

Importing the package sets ``GOMP_SPINCOUNT`` (unless the environment already does), so it must be
imported before torch, whose OpenMP runtime reads it once, at load. After each parallel op torch's
OpenMP workers busy-wait for the next one, by default for a few milliseconds; the compiled KD kernels
(:mod:`rcekd.kd.list_ce`, :mod:`rcekd.kd.topk`) run a block of rows on the other core right after
torch's ops, and a worker spinning there takes half of it. At 20 000 spins torch's own back-to-back
ops are as fast as before (the student alone's Gowalla epoch: 1.17 s against 1.20 s) and RCE-KD's
epoch falls from 5.98 s to 4.52 s (an ad-hoc ``benchmarks/train_cost.py`` run, not committed).

It also pins the float instructions torch and numba use (:mod:`rcekd.numerics`), so that a seed gives
the same bits on any CPU with AVX2, not just on the CPU generation that made a result.
"""

import os

from rcekd.numerics import pin_numerics

os.environ.setdefault("GOMP_SPINCOUNT", "20000")
pin_numerics()  # before torch and numba load: they read it once (see rcekd.numerics)

__version__ = "0.1.0"
