"""MovieLens loader (both layouts, validation) and the synthetic generator."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from lrec_fast.data import DataError, load_movielens_100k, make_stream
from lrec_fast.data.movielens import GROUPLENS_GENRES, item_text


@pytest.fixture(scope="module")
def ml100k():
    return load_movielens_100k()


@pytest.fixture(scope="module")
def recbole_dir(ml100k) -> Path:
    from lrec_fast._io import default_cache_dir

    return default_cache_dir() / "ml-100k"


def test_movielens_loads_and_validates(ml100k):
    ev = ml100k.events
    assert len(ev) == 100_000 and len(ml100k.user_ids) == 943 and len(ml100k.item_ids) == 1682
    assert np.all(np.diff(ev.timestamp) >= 0)
    assert set(np.unique(ev.rating)) == {1, 2, 3, 4, 5}
    assert ml100k.item_text[0] == "Toy Story (1995) | Animation, Children's, Comedy"
    assert ml100k.text_of()[1412].startswith("Land Before Time III")


def test_item_text_rules():
    assert item_text("Heat", "1995", ["Action"]) == "Heat (1995) | Action"
    assert item_text("Heat (1995)", "1995", []) == "Heat (1995) | unknown"
    assert item_text("Heat", "V", ["Crime", "Drama"]) == "Heat | Crime, Drama"


def test_grouplens_layout_gives_same_data(ml100k, recbole_dir, tmp_path):
    ev = ml100k.events
    # Write the original u.data / u.item layout from the RecBole data, then read it back.
    lines = [f"{u}\t{i}\t{int(r)}\t{t}" for u, i, r, t in
             zip(ev.user, ev.item, ev.rating, ev.timestamp, strict=True)]  # fmt: skip
    (tmp_path / "u.data").write_text("\n".join(lines[::-1]) + "\n", encoding="latin-1")
    rows = []
    for j, text in zip(ml100k.item_ids, ml100k.item_text, strict=True):
        title, genres = text.split(" | ")
        flags = ["1" if g in genres.split(", ") else "0" for g in GROUPLENS_GENRES]
        rows.append("|".join([str(j), title, "01-Jan-1995", "", "http://x", *flags]))
    (tmp_path / "u.item").write_text("\n".join(rows) + "\n", encoding="latin-1")
    gl = load_movielens_100k(tmp_path)
    assert gl.item_text == ml100k.item_text
    assert len(gl.events) == len(ev)
    key = lambda e: sorted(zip(e.user, e.item, e.rating, e.timestamp, strict=True))  # noqa: E731
    assert key(gl.events) == key(ev)


def corrupt(recbole_dir: Path, tmp_path: Path, part: str, edit) -> Path:
    for p in ("inter", "item", "user"):
        shutil.copy(recbole_dir / f"ml-100k.{p}", tmp_path / f"ml-100k.{p}")
    f = tmp_path / f"ml-100k.{part}"
    f.write_text(edit(f.read_text(encoding="utf-8")), encoding="utf-8")
    return tmp_path


@pytest.mark.parametrize(
    "part,edit,message",
    [
        ("inter", lambda s: "\n".join(s.splitlines()[:-10]), "99990 ratings"),
        ("inter", lambda s: s.replace("\t5\t", "\t6\t", 1), "outside"),
        ("inter", lambda s: s.replace("\t3\t", "\tthree\t", 1), "malformed"),
        ("inter", lambda s: s.replace("rating:float", "score:float", 1), "lacks columns"),
        ("item", lambda s: "\n".join(s.splitlines()[:-1]), "1681 catalogue items"),
        ("inter", lambda s: "", "lacks columns"),
    ],
)
def test_corrupted_files_fail_clearly(recbole_dir, tmp_path, part, edit, message):
    folder = corrupt(recbole_dir, tmp_path, part, edit)
    with pytest.raises(DataError, match=message):
        load_movielens_100k(folder)


def test_missing_folder_and_layout(tmp_path):
    with pytest.raises(DataError, match="not a folder"):
        load_movielens_100k(tmp_path / "nope")
    with pytest.raises(DataError, match="neither"):
        load_movielens_100k(tmp_path)


def test_synthetic_stream_properties():
    ds = make_stream(n_users=50, n_items=70, n_events=4000, late_item_fraction=0.3, seed=3)
    ev = ds.events
    assert len(ev) == 4000 and np.all(np.diff(ev.timestamp) >= 0)
    assert ev.rating.min() >= 1 and ev.rating.max() <= 5 and len(np.unique(ev.rating)) > 2
    arrival = ds.extra["item_arrival"]
    assert np.all(ev.timestamp >= arrival[ev.item])  # nothing rated before it arrives
    late = np.nonzero(arrival > 0)[0]
    assert len(late) == 21 and np.isin(late, ev.item).any()  # late items do get rated
    assert len(ds.item_text) == 70 and all(" | " in t for t in ds.item_text)
    again = make_stream(n_users=50, n_items=70, n_events=4000, late_item_fraction=0.3, seed=3)
    assert np.array_equal(again.events.rating, ev.rating)
    with pytest.raises(ValueError):
        make_stream(n_users=0)
