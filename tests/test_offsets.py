"""The residual offsets: count classes, the stream's residuals they keep (each event's error
before learning from it), what predict / score_all / deployments add, checkpoints."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lrec_fast import Recommender, offsets

from .conftest import assert_same_bits, reloaded, rewritten_checkpoint, state_bits


def test_count_classes():
    counts = torch.tensor([0, 1, 2, 3, 4, 7, 8, 1000, 2**40])
    assert offsets.count_class(counts).tolist() == [0, 1, 2, 2, 3, 3, 4, 10,
                                                    offsets.N_CLASSES - 1]  # fmt: skip


def test_learn_and_terms_by_hand():
    rec = Recommender(encoder="hashing-64", offset_count_weight=0.5, offset_count_reg=2.0,
                      offset_item_weight=0.25, offset_item_reg=1.0)  # fmt: skip
    st, cfg = rec.state, rec.config
    st.offset_item.append(torch.zeros(3, 2, dtype=torch.float64))
    st.offset_class[2] = torch.tensor([1.0, 2.0], dtype=torch.float64)  # class 2: 2-3 ratings
    counts, items = torch.tensor([3, 0, 3]), torch.tensor([1, 1, 2])
    ratings, served = torch.tensor([5.0, 1.0, 2.0]), torch.tensor([4.0, 0.5, 2.5])
    by_class, by_item = offsets.terms(st, cfg, counts, items)
    assert by_class.tolist() == [0.5 * 1 / 4, 0.0, 0.5 * 1 / 4] and not by_item.any()
    offsets.learn(st, cfg, counts, items, ratings, served, (1.0, 5.0))
    # the class sums take rating - served (clipped to the range: 0.5 -> 1)
    assert st.offset_class[2].tolist() == [1.0 + (5 - 4) + (2 - 2.5), 4.0]
    assert st.offset_class[0].tolist() == [0.0, 1.0]
    # the item sums take the residual after the class offset (as it was before the batch)
    c = 0.5 / 4
    assert st.offset_item.t[1].tolist() == pytest.approx([(5 - 4 - c) + 0.0, 2.0])
    assert st.offset_item.t[2].tolist() == pytest.approx([2 - 2.5 - c, 1.0])
    got = offsets.total(st, cfg, torch.tensor([2]), torch.tensor([2]))
    want = 0.5 * st.offset_class[2, 0] / (4 + 2) + 0.25 * (2 - 2.5 - c) / (1 + 1)
    assert got.item() == pytest.approx(float(want), rel=1e-6)
    cls, items_table = offsets.tables(st, cfg)
    assert cls[2] == pytest.approx(0.5 * float(st.offset_class[2, 0]) / 6)
    assert items_table.shape == (3,) and items_table[0] == 0


def test_feedback_keeps_each_events_error_before_learning(fitted, stream):
    st, cfg = fitted.state, fitted.config
    assert cfg.offset_count_weight > 0 and cfg.offset_item_weight > 0  # on by default
    ev = stream.events.take(slice(1500, 1560))
    users, items = list(ev.user), list(ev.item)
    said = fitted.predict(users, items)  # what the service answered before the batch
    ii = torch.tensor([st.items.index[j] for j in items])
    idx = [st.users.index.get(u, -1) for u in users]
    counts = torch.tensor([len(st.seen[a]) if a >= 0 else 0 for a in idx])
    served = torch.from_numpy(said) - offsets.total(st, cfg, counts, ii)
    cls_before, item_before = st.offset_class.clone(), st.offset_item.t.clone()
    fitted.feedback(ev.user, ev.item, ev.rating)
    # the same sums, from the answers given: the class sums moved by rating - answer
    check = Recommender(encoder="hashing-64")
    check.state.offset_class = cls_before.clone()
    check.state.offset_item.append(item_before)
    offsets.learn(check.state, cfg, counts, ii, torch.from_numpy(ev.rating).float(), served,
                  fitted.rating_range)  # fmt: skip
    assert torch.allclose(st.offset_class, check.state.offset_class, rtol=1e-5, atol=1e-5)
    assert torch.allclose(st.offset_item.t, check.state.offset_item.t, rtol=1e-5, atol=1e-5)
    assert not torch.equal(st.offset_class, cls_before)
    # and they move later answers: predict = the model's own + the offsets
    again = fitted.predict(users[:5], items[:5])
    cfg.offset_count_weight = cfg.offset_item_weight = 0.0
    bare = fitted.predict(users[:5], items[:5])
    assert not np.allclose(again, bare)
    cfg.offset_count_weight, cfg.offset_item_weight = 0.5, 0.2
    full = fitted.score_all(users[:5])
    cols = [fitted.item_ids.index(j) for j in items[:5]]
    assert np.allclose(full[range(5), cols], again, rtol=1e-5, atol=1e-5)


def test_switched_off_nothing_is_kept(stream):
    rec = Recommender(dim=8, encoder="hashing-64", max_epochs=2, offset_count_weight=0.0,
                      offset_item_weight=0.0)  # fmt: skip
    rec.add_items(stream.item_ids, stream.item_text)
    ev = stream.events.take(slice(0, 600))
    rec.fit(ev.user, ev.item, ev.rating)
    ev = stream.events.take(slice(600, 700))
    rec.feedback(ev.user, ev.item, ev.rating)
    assert not rec.state.offset_class.any() and not rec.state.offset_item.t.any()


def test_a_rejected_batch_keeps_them(fitted, stream):
    ev = stream.events.take(slice(1500, 1600))
    fitted.feedback(ev.user, ev.item, ev.rating)
    before = state_bits(fitted)
    with pytest.raises(ValueError):
        fitted.feedback([ev.user[0], ev.user[1]], [ev.item[0], "no-such-item"], [4.0, 3.0])
    with pytest.raises(ValueError):
        fitted.feedback([ev.user[0]], [ev.item[0]], [math.nan])
    assert_same_bits(before, state_bits(fitted))


def test_new_items_start_without(fitted):
    fitted.add_items(["fresh"], ["Brand new | drama"])
    assert fitted.state.offset_item.t.shape == (81, 2)
    assert not fitted.state.offset_item.t[80].any()


def test_checkpoints_keep_them_and_old_ones_load_without(fitted, stream, tmp_path):
    ev = stream.events.take(slice(1500, 1700))
    fitted.feedback(ev.user, ev.item, ev.rating)
    users, items = list(stream.user_ids[:5]), list(stream.item_ids[10:15])
    reloaded(fitted, tmp_path / "ck", users, items)
    old = Recommender.load(
        rewritten_checkpoint(
            fitted,
            tmp_path / "old",
            lambda k: k.startswith("offset_"),
            ["offset_count_weight", "offset_item_weight"],
        )
    )
    assert old.config.offset_count_weight == old.config.offset_item_weight == 0.0
    assert not old.state.offset_class.any() and old.state.offset_item.t.shape == (80, 2)
    fitted.config.offset_count_weight = fitted.config.offset_item_weight = 0.0
    assert np.array_equal(old.predict(users, items), fitted.predict(users, items))


@pytest.mark.parametrize("flaw", ["shape", "nan", "count"])
def test_malformed_offsets_are_refused(fitted, tmp_path, flaw):
    def damage(t):
        if flaw == "shape":
            t["offset_item"] = t["offset_item"][:-1]
        elif flaw == "nan":
            t["offset_class"][3, 0] = float("nan")
        else:
            t["offset_item"][5, 1] = -1.0

    with pytest.raises(ValueError, match="offsets"):
        Recommender.load(rewritten_checkpoint(fitted, tmp_path / "ck", edit=damage))


@pytest.mark.parametrize("bad", [{"offset_count_weight": -0.1}, {"offset_item_reg": math.nan},
                                 {"offset_item_weight": math.inf}])  # fmt: skip
def test_config_is_checked(bad):
    with pytest.raises(ValueError, match="offset"):
        Recommender(encoder="hashing-64", **bad)
