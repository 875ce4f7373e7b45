"""Who rated each item: the item -> (user rows, latest ratings) index the user-neighbourhood
correction reads (``user_neighbours.py``), kept current event by event.

A CSR with slack: item j's raters are ``users[start[j] : start[j] + count[j]]`` (with their
ratings), sorted by user row, inside a block of ``cap[j]`` slots. A new rater is inserted in
order (a binary search, then the later entries shift by one slot); a full block moves to the
buffer's end at twice its size (amortised O(1) per event); a re-rating overwrites in place.
When the buffer has no room left, every block is repacked at twice its count. The order lets
``kernels.user_knn_predict`` look a neighbour up in an item with thousands of raters instead
of scanning them all.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

try:
    from numba import njit
except ImportError:  # pragma: no cover - numba is a dependency; the loop still runs in Python

    def njit(*args, **kwargs):  # type: ignore[no-untyped-def,no-redef]
        return args[0] if args and callable(args[0]) else (lambda f: f)


MIN_BLOCK = 4


@njit(cache=True)
def _upsert(
    start: np.ndarray, count: np.ndarray, cap: np.ndarray, users: np.ndarray,
    ratings: np.ndarray, end: int, ev_users: np.ndarray, ev_items: np.ndarray,
    ev_ratings: np.ndarray,
) -> int:  # fmt: skip
    """Record the events in order (the latest rating of a pair counts), each block kept sorted
    by user row; returns the buffer's new end. The caller has made sure a full move of every
    event's block fits."""
    for e in range(ev_users.shape[0]):
        a, j, r = ev_users[e], ev_items[e], ev_ratings[e]
        lo = start[j]
        hi = lo + count[j]
        at = lo + np.searchsorted(users[lo:hi], a)
        if at < hi and users[at] == a:  # a re-rating
            ratings[at] = r
            continue
        if count[j] == cap[j]:  # full: move the block to the end at twice its size
            new = max(MIN_BLOCK, 2 * cap[j])
            users[end : end + count[j]] = users[lo:hi]
            ratings[end : end + count[j]] = ratings[lo:hi]
            at += end - lo
            start[j], cap[j] = end, new
            lo, hi = end, end + count[j]
            end += new
        for t in range(hi, at, -1):  # (a shift: the scan for a re-rating cost as much before)
            users[t], ratings[t] = users[t - 1], ratings[t - 1]
        users[at], ratings[at] = a, r
        count[j] += 1
    return end


def _slots(start: np.ndarray, count: np.ndarray) -> np.ndarray:
    """The buffer slots of every item's entries, item by item (item j's: start[j] + 0, 1, ...,
    count[j] - 1)."""
    first = np.repeat(start - np.cumsum(count) + count, count)  # start[j] - entries before j
    return first + np.arange(first.size)


def known_csr(indptr: np.ndarray, items: np.ndarray,
              ratings: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Users' rated items as a CSR (indptr, item rows, ratings) without the unknown (NaN)
    ratings (checkpoints from before ratings were kept)."""
    known = np.isfinite(ratings)
    if known.all():
        return indptr, items, ratings
    users = np.repeat(np.arange(len(indptr) - 1, dtype=np.int64), np.diff(indptr))
    ptr = np.zeros(len(indptr), np.int64)
    np.cumsum(np.bincount(users[known], minlength=len(indptr) - 1), out=ptr[1:])
    return ptr, items[known], ratings[known]


class Raters:
    """Item row -> the user rows that rated it and their latest ratings (module doc)."""

    def __init__(self, n_items: int = 0) -> None:
        self.start = np.zeros(n_items, np.int64)
        self.count = np.zeros(n_items, np.int64)
        self.cap = np.zeros(n_items, np.int64)
        self.users = np.zeros(0, np.int64)
        self.ratings = np.zeros(0, np.float32)
        self.end = 0

    @classmethod
    def from_csr(cls, indptr: np.ndarray, items: np.ndarray, ratings: np.ndarray,
                 n_items: int) -> Raters:  # fmt: skip
        """From users' rated items (``SeenItems.csr``'s indptr, item rows, ratings)."""
        users = np.repeat(np.arange(len(indptr) - 1, dtype=np.int64), np.diff(indptr))
        out = cls(n_items)
        out.grow(int(items.max()) + 1 if items.size else 0)
        counts = np.bincount(items, minlength=len(out.count)).astype(np.int64)
        order = np.argsort(items, kind="stable")
        out._pack(counts, users[order], ratings[order].astype(np.float32), extra=0)
        return out

    def __len__(self) -> int:
        return len(self.start)

    def grow(self, n_items: int) -> None:
        """Room for item rows up to ``n_items`` (new items: no raters)."""
        add = n_items - len(self.start)
        if add > 0:
            self.start = np.concatenate([self.start, np.full(add, self.end, np.int64)])
            self.count = np.concatenate([self.count, np.zeros(add, np.int64)])
            self.cap = np.concatenate([self.cap, np.zeros(add, np.int64)])

    def add(self, users: ArrayLike, items: ArrayLike, ratings: ArrayLike) -> None:
        """Record events (user rows, item rows, ratings; in time order)."""
        users, items = np.asarray(users, np.int64), np.asarray(items, np.int64)
        ratings = np.asarray(ratings, np.float32)
        if users.size == 0:
            return
        self.grow(int(items.max()) + 1)
        # each event may move its block once, to twice its size
        need = self.end + int((2 * self.cap[items] + MIN_BLOCK).sum())
        if need > len(self.users):
            self._pack(self.count, *self._live(), extra=2 * int(self.count[items].sum())
                       + MIN_BLOCK * len(items))  # fmt: skip
        self.end = int(_upsert(self.start, self.count, self.cap, self.users, self.ratings,
                               self.end, users, items, ratings))  # fmt: skip

    def truncate_users(self, n: int) -> None:
        """Drop the ratings of user rows n and above."""
        u, r = self._live()
        if u.size and int(u.max()) >= n:
            item = np.repeat(np.arange(len(self.count)), self.count)
            keep = u < n
            self._pack(np.bincount(item[keep], minlength=len(self.count)).astype(np.int64),
                       u[keep], r[keep], extra=0)  # fmt: skip

    def rows(self, item: int) -> tuple[np.ndarray, np.ndarray]:
        """Item row ``item``'s raters (user rows int64, ascending) and their ratings (float32)."""
        if item >= len(self.start):
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        lo, hi = self.start[item], self.start[item] + self.count[item]
        return self.users[lo:hi], self.ratings[lo:hi]

    def _live(self) -> tuple[np.ndarray, np.ndarray]:
        """Every item's raters and ratings, item by item."""
        idx = _slots(self.start, self.count)
        return self.users[idx], self.ratings[idx]

    def _pack(self, counts: np.ndarray, users: np.ndarray, ratings: np.ndarray,
              extra: int) -> None:  # fmt: skip
        """Lay out item by item (``counts`` each) in blocks of twice their count, with room
        for ``extra`` more slots at the end."""
        cap = np.maximum(2 * counts, MIN_BLOCK)
        start = np.zeros(len(counts), np.int64)
        np.cumsum(cap[:-1], out=start[1:])
        end = int(cap.sum())
        self.users = np.zeros(2 * (end + extra), np.int64)  # doubling: amortised O(1)
        self.ratings = np.zeros(len(self.users), np.float32)
        idx = _slots(start, counts)
        self.users[idx], self.ratings[idx] = users, ratings
        self.start, self.count, self.cap, self.end = start, counts.astype(np.int64), cap, end
