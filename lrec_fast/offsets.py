"""Online residual offsets: the stream's own prediction errors, fed back into predicted ratings.

Every feedback event arrives with the rating the model had been asked to predict, so its error
before learning from it (the prequential residual: rating - served prediction, clipped to the
range) costs nothing to keep. Two of its regularities outlast the event:

- by the user's rating count: users with hundreds of ratings rate later films lower than their
  history says (the served prediction ran 0.10-0.13 high for users with 100-300 ratings on
  both warm-up cuts), users with a handful rate a little lower too;
- by item: an item's bias in the factor model moves lr / batch per event (about 0.01 at the
  defaults), so an item with a few ratings carries its prior for a long time.

Each group g keeps the sum S_g and count N_g of its residuals; the offset added to a
prediction is
    w_c S_c / (N_c + reg_c)  +  w_i S_i / (N_i + reg_i)
for the user's count class c (0 ratings; then 1 + floor(log2 n), capped) and the item i. The
item sums take the residual after the class offset, so the two do not count the same error
twice. Both weights 0 switch it off (``LearnerConfig.offset_*``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from .model import ModelState
    from .online import LearnerConfig

N_CLASSES = 24  # count classes: 0, 1, 2-3, 4-7, ..., 2**22 and more
# (numpy inside: a call handles a micro-batch, where each torch op costs more than its work)


def count_class(counts: torch.Tensor) -> torch.Tensor:
    """The count class (int64 [E]) of users with ``counts`` ratings (int64 [E])."""
    return torch.from_numpy(_classes(counts.numpy()))


def _classes(counts: np.ndarray) -> np.ndarray:
    out = np.zeros(counts.shape, np.int64)
    pos = counts > 0
    out[pos] = np.minimum(1 + np.floor(np.log2(counts[pos])).astype(np.int64), N_CLASSES - 1)
    return out


def enabled(cfg: LearnerConfig) -> bool:
    return cfg.offset_count_weight > 0 or cfg.offset_item_weight > 0


def _ratios(stats: np.ndarray, weight: float, reg: float) -> np.ndarray:
    """weight x sum / (count + reg) of rows (sum, count) [G, 2], float64 [G]."""
    return weight * stats[:, 0] / np.maximum(stats[:, 1] + reg, 1e-12)


def terms(state: ModelState, cfg: LearnerConfig, counts: torch.Tensor,
          items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The two offsets (float64 [E] each: by count class, by item) of events by users with
    ``counts`` ratings (int64 [E]) on item rows ``items`` (int64 [E])."""
    by_class, by_item = _terms(state, cfg, _classes(counts.numpy()), items.numpy())
    return torch.from_numpy(by_class), torch.from_numpy(by_item)


def _terms(state: ModelState, cfg: LearnerConfig, classes: np.ndarray,
           items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    by_class = _ratios(state.offset_class.numpy()[classes], cfg.offset_count_weight,
                       cfg.offset_count_reg)  # fmt: skip
    by_item = _ratios(state.offset_item.t.numpy()[items], cfg.offset_item_weight,
                      cfg.offset_item_reg)  # fmt: skip
    return by_class, by_item


def tables(state: ModelState, cfg: LearnerConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Every offset (float64: by count class [N_CLASSES], by item row [n_items]), what an
    exported deployment adds (zeros at weights 0)."""
    return (torch.from_numpy(_ratios(state.offset_class.numpy(), cfg.offset_count_weight,
                                     cfg.offset_count_reg)),
            torch.from_numpy(_ratios(state.offset_item.t.numpy(), cfg.offset_item_weight,
                                     cfg.offset_item_reg)))  # fmt: skip


def total(state: ModelState, cfg: LearnerConfig, counts: torch.Tensor,
          items: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """The offset (float32 [E]) ``predict`` adds; zeros when switched off."""
    if not enabled(cfg) or items.numel() == 0:
        return torch.zeros(items.numel())
    by_class, by_item = _terms(state, cfg, _classes(counts.numpy()), items.numpy())
    return torch.from_numpy((by_class + by_item).astype(np.float32))


def learn(
    state: ModelState, cfg: LearnerConfig, counts: torch.Tensor, items: torch.Tensor,
    ratings: torch.Tensor, served: torch.Tensor, clip: tuple[float, float],
) -> None:  # fmt: skip
    """Add the residuals of events (users' rating counts before them, item rows, ratings) whose
    prediction before learning, offsets left out, was ``served`` (float32 [E])."""
    if not enabled(cfg) or items.numel() == 0:
        return
    cls, rows = _classes(counts.numpy()), items.numpy()
    by_class, _ = _terms(state, cfg, cls, rows)
    r = ratings.numpy().astype(np.float64)
    base = np.clip(served.numpy().astype(np.float64), *clip)
    after = np.clip(base + by_class, *clip)
    oc, oi = state.offset_class.numpy(), state.offset_item.t.numpy()  # views: in place
    np.add.at(oc[:, 0], cls, r - base)
    np.add.at(oc[:, 1], cls, 1.0)
    np.add.at(oi[:, 0], rows, r - after)
    np.add.at(oi[:, 1], rows, 1.0)


def check_config(cfg: LearnerConfig) -> None:
    """ValueError unless the offsets' settings are usable."""
    reals = (cfg.offset_count_weight, cfg.offset_count_reg, cfg.offset_item_weight,
             cfg.offset_item_reg)  # fmt: skip
    if not all(math.isfinite(x) and x >= 0 for x in reals):
        raise ValueError("offset_count_weight, offset_count_reg, offset_item_weight and "
                         "offset_item_reg must be finite and >= 0")  # fmt: skip
