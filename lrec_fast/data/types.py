"""Containers for a rating data set: the catalogue, the users and a time-ordered event log."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Interactions:
    """Time-ordered rating events, one entry per event (all arrays have the same length).

    user, item: the caller's ids (int64 here); rating: float32; timestamp: int64 seconds.
    """

    user: np.ndarray
    item: np.ndarray
    rating: np.ndarray
    timestamp: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.user)
        if not (len(self.item) == len(self.rating) == len(self.timestamp) == n):
            raise ValueError("Interactions arrays must all have the same length")

    def __len__(self) -> int:
        return len(self.user)

    def take(self, index: np.ndarray | slice) -> Interactions:
        """A subset of the events (slice or integer/boolean index), order kept."""
        return Interactions(
            self.user[index], self.item[index], self.rating[index], self.timestamp[index]
        )

    @staticmethod
    def concat(parts: list[Interactions]) -> Interactions:
        """The events of ``parts`` one after the other."""
        return Interactions(*(np.concatenate([getattr(p, f) for p in parts])
                              for f in ("user", "item", "rating", "timestamp")))  # fmt: skip

    def sorted_by_time(self) -> Interactions:
        """Events sorted by timestamp; ties keep their original order (stable)."""
        return self.take(np.argsort(self.timestamp, kind="stable"))


@dataclass(frozen=True)
class RatingsDataset:
    """A catalogue (item ids with text), the user ids and the rating events in time order."""

    name: str
    user_ids: np.ndarray
    item_ids: np.ndarray
    item_text: list[str]
    events: Interactions
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    def text_of(self) -> dict[int, str]:
        """Item id -> item text."""
        return {int(i): t for i, t in zip(self.item_ids, self.item_text, strict=True)}
