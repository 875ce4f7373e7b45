"""Answers while the model learns: a feedback call's long parts (consolidation, the refit end's
neighbourhood recompute, the user lists, the refit's share) hold the writers' lock only, so
answers go on meanwhile; writers still take turns, and the model ends bit for bit where one
thread doing the same calls ends. Each test pauses a writer inside one long part and answers
from another thread: an answer that waited for the model lock would wait for the pause."""

from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
import pytest

from lrec_fast import Recommender, consolidation, kernels, neighbours, online
from lrec_fast.kernels import cpu

from .conftest import assert_same_bits, fit_small, state_bits

WAIT_S = 60.0  # (a bound for a hung test, never a timing claim)
USERS, ITEMS = [0, 1, 7, "cold"], [0, 3, 5, 9]


def model(stream, **config) -> Recommender:
    return fit_small(stream, max_epochs=3, **config)


def answers(rec: Recommender) -> tuple[np.ndarray, ...]:
    top, scores = rec.recommend(USERS, k=5)
    return top, scores, rec.predict(USERS, ITEMS)


def calls(stream, n: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    out = []
    for s in range(1500, 1500 + 100 * n, 100):
        ev = stream.events.take(slice(s, s + 100))
        out.append((ev.user, ev.item, ev.rating))
    return out


class Pause:
    """Replaces ``owner.name`` by a version whose first call stops until ``release``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> None:
        self.real, self.entered, self.released = getattr(owner, name), threading.Event(), False
        self.gate = threading.Event()
        monkeypatch.setattr(owner, name, self)

    def __call__(self, *args, **kwargs):
        if not self.entered.is_set():
            self.entered.set()
            assert self.gate.wait(2 * WAIT_S)  # (longer than an answer is waited for)
        return self.real(*args, **kwargs)

    def release(self) -> None:
        self.gate.set()


def in_thread(fn) -> tuple[threading.Thread, list]:
    out: list = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:  # (re-raised by the test)
            out.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def answered_while_paused(rec: Recommender, pause: Pause) -> tuple[np.ndarray, ...]:
    """Answers taken in another thread while the writer is paused (they must not wait)."""
    assert pause.entered.wait(WAIT_S), "the writer never reached the pause"
    reader, got = in_thread(lambda: (answers(rec), rec.stats()))
    reader.join(WAIT_S)
    done = not reader.is_alive()
    pause.release()  # (also when the answer hung: the test then fails, not hangs)
    assert done, "an answer waited for the writer's long part"
    assert not isinstance(got[0], BaseException), got[0]
    return got[0][0]


def test_answers_during_a_consolidation_see_the_model_before_it(stream, monkeypatch):
    """Answers during a consolidation come from the model as it was; another writer waits for
    it; once it ends both models (threaded and serial) hold the same bits."""
    cfg = dict(consolidate_every=0, consolidate_window=400, refit_every=0)
    rec, twin = model(stream, **cfg), model(stream, **cfg)
    (u, i, r), later = calls(stream, 2)
    for m in (rec, twin):
        m.feedback(u, i, r)
    before = answers(rec)
    pause = Pause(monkeypatch, consolidation, "consolidate")
    writer, report = in_thread(rec.consolidate)
    assert pause.entered.wait(WAIT_S)
    second, _ = in_thread(lambda: rec.feedback(*later))  # a writer: waits its turn
    during = answered_while_paused(rec, pause)
    for a, b in zip(during, before, strict=True):
        np.testing.assert_array_equal(a, b)
    writer.join(WAIT_S)
    second.join(WAIT_S)
    assert not writer.is_alive() and not second.is_alive()
    assert not isinstance(report[0], BaseException), report[0]
    monkeypatch.undo()
    assert replace(twin.consolidate(), seconds=0) == replace(report[0], seconds=0)
    twin.feedback(*later)
    assert_same_bits(state_bits(rec), state_bits(twin))
    for a, b in zip(answers(rec), answers(twin), strict=True):
        np.testing.assert_array_equal(a, b)
    assert rec.stats() == twin.stats()


@pytest.mark.parametrize(
    "part",
    ["consolidation", "item lists (a refit's end)", "user lists", "the refit's share"],
)
def test_answers_go_on_during_each_long_part_of_feedback(stream, monkeypatch, part):
    """A stream of feedback calls in one thread, paused once inside ``part``: answers from
    another thread go on; the stream then ends where a serial one does, bit for bit."""
    cfg = dict(consolidate_every=200, consolidate_window=300, refit_every=300)
    rec, twin = model(stream, **cfg), model(stream, **cfg)
    owner, name = {
        "consolidation": (consolidation, "consolidate"),
        "item lists (a refit's end)": (kernels, "item_neighbours"),
        "user lists": (kernels, "user_neighbours"),
        "the refit's share": (online, "unguarded_pass"),  # (on a copy of its rows)
    }[part]
    stream_calls = calls(stream, 6)
    pause = Pause(monkeypatch, owner, name)

    def feed() -> None:
        for c in stream_calls:
            rec.feedback(*c)

    writer, out = in_thread(feed)
    answered_while_paused(rec, pause)
    writer.join(WAIT_S)
    assert not writer.is_alive() and out == [None], out
    monkeypatch.undo()
    for c in stream_calls:
        twin.feedback(*c)
    assert_same_bits(state_bits(rec), state_bits(twin))
    for a, b in zip(answers(rec), answers(twin), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_fork_is_a_copy_and_adopting_it_publishes_it(stream):
    """Work on a fork leaves the state as it was; adopting the fork gives the state its bits
    and keeps the state's identity."""
    rec = model(stream)
    bits, st = state_bits(rec), rec.state
    fork = st.fork()
    fork.user_rows.t.add_(1.0)
    fork.scales.mul_(0.5)
    fork.rng.manual_seed(123)
    fork.counters["consolidations"] += 1
    assert_same_bits(state_bits(rec), bits)
    assert rec.stats()["consolidations"] == 0
    want = {k: v.clone() for k, v in fork.tensors().items()}
    st.adopt(fork)
    assert rec.state is st and rec.stats()["consolidations"] == 1
    got = st.tensors()
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("layer", ["workqueue", "omp"])
def test_parallel_launches_take_turns_until_the_layer_is_thread_safe(monkeypatch, layer):
    """Under numba's workqueue layer two threads must never launch parallel kernels at once
    (it ends the process): launches hold one lock until a thread-safe layer shows."""
    monkeypatch.setattr(cpu, "_LAYER_SAFE", False)
    monkeypatch.setattr(cpu.numba, "threading_layer", lambda: layer)
    seen: list[bool] = []
    cpu._parallel(lambda: seen.append(cpu._LAUNCH.locked()))
    assert seen == [True] and cpu._LAYER_SAFE == (layer != "workqueue")
    cpu._parallel(lambda: seen.append(cpu._LAUNCH.locked()))
    assert seen[1] == (layer == "workqueue")


def test_neighbour_tables_are_computed_without_changing_the_state(fitted):
    """``neighbours.compute`` only reads (answers read the state meanwhile); ``install`` then
    gives what ``recompute`` gives."""
    rec = fitted
    bits = state_bits(rec)
    tables = neighbours.compute(rec.state, rec.config, rec.backend)
    assert_same_bits(state_bits(rec), bits)
    assert {"knn_bias", "knn_mu"} <= tables.keys()
    neighbours.install(rec.state, tables)
    after = state_bits(rec)
    neighbours.recompute(rec.state, rec.config, rec.backend)
    assert_same_bits(state_bits(rec), after)


def test_answers_go_on_while_a_checkpoint_is_written(stream, monkeypatch, tmp_path):
    """``save`` holds the writers' lock only: answers go on while it writes, and the
    checkpoint holds the model as it was."""
    from lrec_fast import service

    rec = model(stream)
    rec.feedback(*calls(stream, 1)[0])
    before = answers(rec)
    pause = Pause(monkeypatch, service, "save_state")
    writer, out = in_thread(lambda: rec.save(tmp_path / "ck"))
    during = answered_while_paused(rec, pause)
    for a, b in zip(during, before, strict=True):
        np.testing.assert_array_equal(a, b)
    writer.join(WAIT_S)
    assert not writer.is_alive() and out == [None], out
    assert_same_bits(state_bits(Recommender.load(tmp_path / "ck")), state_bits(rec))


def test_every_method_from_many_threads_at_once(stream, tmp_path):
    """Readers (recommend, predict, rank_all, score_all, stats) beside a feedback stream with
    new items and another writer (consolidate, refit, save, add_items): no error, every event
    learned once, every item added, and the last checkpoint loads."""
    rec = model(stream, consolidate_every=300, consolidate_window=300, refit_every=400)
    feed = calls(stream, 10)
    errors: list[str] = []

    def guarded(fn):
        def run() -> None:
            try:
                fn()
            except BaseException as exc:  # (reported below)
                errors.append(repr(exc))

        return threading.Thread(target=run, daemon=True)

    def reader() -> None:
        for j in range(40):
            top, scores = rec.recommend([j % 60, "nobody"], k=5)
            assert top.shape == (2, 5) and np.isfinite(scores[:, 0]).all()
            assert np.isfinite(rec.predict([j % 60], [j % 80])).all()
            if j % 10 == 0:
                rec.rank_all([0])
                rec.score_all([0])
                rec.stats()

    def writer() -> None:
        for c, (u, i, r) in enumerate(feed):
            i = list(i)
            i[0] = f"new-{c}"
            rec.feedback(u, i, r, texts={i[0]: f"A New Film {c} | Drama"})

    def other() -> None:
        for j in range(8):
            if j % 4 == 0:
                rec.consolidate()
            elif j % 4 == 1:
                rec.refit()
            elif j % 4 == 2:
                rec.save(tmp_path / "ck")
            else:
                rec.add_items([f"added-{j}"], [f"Added {j} | Comedy"])

    threads = [guarded(f) for f in (reader, reader, writer, other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(4 * WAIT_S)
    assert not any(t.is_alive() for t in threads) and not errors, errors
    assert int(rec.state.item_count.t.sum()) == 1500 + 1000
    assert rec.n_items == 80 + 10 + 2 and rec.stats()["feedback_calls"] == 10
    assert Recommender.load(tmp_path / "ck").n_items <= rec.n_items
