"""lrec_fast: an inference and update runtime for lifelong-learning recommenders built on
pretrained transformer encoders."""

import logging

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
