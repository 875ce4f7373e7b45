"""Data: MovieLens-100k loader, synthetic catalogues and streams, and their containers."""

from .movielens import DataError, load_movielens_100k, validate_ml100k
from .synthetic import make_catalogue, make_stream
from .types import Interactions, RatingsDataset

__all__ = [
    "DataError",
    "Interactions",
    "RatingsDataset",
    "load_movielens_100k",
    "make_catalogue",
    "make_stream",
    "validate_ml100k",
]
