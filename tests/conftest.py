from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pytest
import torch

from lrec_fast import Recommender
from lrec_fast.data import make_stream
from lrec_fast.model import ModelState
from lrec_fast.online import LearnerConfig


@pytest.fixture
def rng() -> np.random.Generator:
    # Fresh random inputs each run; the seed is printed on failure, LREC_TEST_SEED replays one.
    seed = int(os.environ.get("LREC_TEST_SEED") or np.random.SeedSequence().entropy % 2**32)
    print(f"rng seed {seed}")
    return np.random.default_rng(seed)


@pytest.fixture(scope="session")
def stream():
    return make_stream(n_users=60, n_items=80, n_events=3000, seed=1)


def fit_small(stream, max_epochs: int = 5, **config) -> Recommender:
    """A small model (dim 8, hashing encoder) fitted on the first half of ``stream``."""
    rec = Recommender(dim=8, encoder="hashing-64", max_epochs=max_epochs, **config)
    rec.add_items(stream.item_ids, stream.item_text)
    ev = stream.events.take(slice(0, 1500))
    rec.fit(ev.user, ev.item, ev.rating)
    return rec


@pytest.fixture
def fitted(stream) -> Recommender:
    """A small model fitted on the first half of the synthetic stream (hashing encoder)."""
    return fit_small(stream)


def state_bits(rec: Recommender) -> dict[str, object]:
    """Everything a model holds, for bit-for-bit comparisons."""
    t = {k: v.clone() for k, v in rec.state.tensors().items()}
    return {"t": t, "users": list(rec.state.users.ids), "items": list(rec.state.items.ids)}


def assert_same_bits(a: dict[str, object], b: dict[str, object]) -> None:
    assert a["users"] == b["users"] and a["items"] == b["items"]
    ta, tb = a["t"], b["t"]
    assert isinstance(ta, dict) and isinstance(tb, dict)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape, k
        assert torch.equal(ta[k], tb[k]), k


def reloaded(rec: Recommender, folder: Path, users: list, items: list) -> Recommender:
    """``rec`` saved to ``folder`` and loaded back, checked to hold the same bits and to
    predict the same ratings of ``users`` x ``items`` pairs."""
    rec.save(folder)
    again = Recommender.load(folder)
    assert_same_bits(state_bits(rec), state_bits(again))
    assert np.array_equal(again.predict(users, items), rec.predict(users, items))
    return again


def rewritten_checkpoint(
    rec: Recommender, folder: Path, drop: Callable[[str], bool] = lambda k: False,
    settings: Iterable[str] = (), edit: Callable[[dict[str, torch.Tensor]], None] | None = None,
) -> Path:  # fmt: skip
    """``rec`` saved to ``folder``, then rewritten as an older or damaged checkpoint would be:
    the tensors ``drop`` names left out, the learner ``settings`` left out of its config, and
    ``edit`` applied to the tensors in place."""
    from safetensors.torch import load_file, save_file

    rec.save(folder)
    path, meta = folder / "model.safetensors", folder / "state.json"
    tensors = {k: v for k, v in load_file(str(path)).items() if not drop(k)}
    if edit is not None:
        edit(tensors)
    save_file(tensors, str(path))
    state = json.loads(meta.read_text())
    for key in settings:
        del state["config"]["learner"][key]
    meta.write_text(json.dumps(state))
    return folder


def make_state(n_items: int, n_users: int, dim: int, cfg: LearnerConfig, seed: int) -> ModelState:
    """A bare state: random item, target and context rows, zero user rows and item biases."""
    g = torch.Generator().manual_seed(seed)
    st = ModelState(dim=dim, text_dim=4, history_len=cfg.history_len)
    rows = {k: torch.randn(n_items, dim, generator=g) for k in ("item_rows", "tgt_rows",
                                                                 "ctx_rows")}  # fmt: skip
    rows |= {"item_bias": torch.zeros(n_items), "tgt_bias": torch.randn(n_items, generator=g)}
    st.add_items(list(range(n_items)), rows, torch.zeros(n_items, 4))
    st.ctx_acc.t.uniform_(0, 1, generator=g)  # Adagrad sums already under way
    st.tgt_acc.t.uniform_(0, 1, generator=g)
    st.add_users(list(range(n_users)), torch.zeros(n_users, dim), torch.zeros(n_users))
    return st
