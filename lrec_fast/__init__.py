"""lrec_fast: an inference and update runtime for lifelong-learning recommenders built on
pretrained transformer encoders."""

import logging
import os
import sys

# OpenMP workers spin at most GOMP_SPINCOUNT iterations before they sleep (libgomp's default
# is 300,000). torch's and numba's pools (two libgomp runtimes) then stop holding the cores
# against each other, and a call after the process idled is not held up by it. On our 2-core
# machines at MovieLens scale (benchmarks/bench_service.py): recommend after 50 ms idle
# 1.2-1.35 ms against 5.6-5.7 at the default, feedback 2.5-2.6 against 13.7; back to back and
# the 1M-item kernels unchanged (OMP_WAIT_POLICY=PASSIVE did as well after idle, but cost
# 10-25% back to back). Only when torch is not loaded yet (each pool reads it once, at load;
# mixed settings were worse than either) and the user set neither variable (README).
if "torch" not in sys.modules and not {"GOMP_SPINCOUNT", "OMP_WAIT_POLICY"} & set(os.environ):
    os.environ["GOMP_SPINCOUNT"] = "3000"

from ._version import __version__
from .kernels import BackendUnavailable, available_backends
from .online import DivergenceError, FitReport, LearnerConfig
from .service import Recommender

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "BackendUnavailable",
    "DivergenceError",
    "FitReport",
    "LearnerConfig",
    "Recommender",
    "__version__",
    "available_backends",
]
