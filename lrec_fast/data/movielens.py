"""MovieLens-100k: from the cache (filled from the RecBole 1.2.1 wheel) or a GroupLens folder.

The RecBole wheel on the package index ships the data set as atomic files
(``recbole/dataset_example/ml-100k/ml-100k.{inter,item,user}``, tab-separated UTF-8 with headers
such as ``user_id:token``). We fetch that wheel with pip itself, so the loader never names a
registry URL and follows whatever index the machine's pip is configured for.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from .._io import atomic_write_bytes, default_cache_dir
from .types import Interactions, RatingsDataset

log = logging.getLogger(__name__)

RECBOLE_REQUIREMENT = "recbole==1.2.1"
_MEMBER = "recbole/dataset_example/ml-100k/ml-100k.{}"
_PARTS = ("inter", "item", "user")
N_RATINGS, N_USERS, N_ITEMS = 100_000, 943, 1_682

# Genre columns of the GroupLens u.item file, in file order.
GROUPLENS_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance",
    "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip

_YEAR_IN_TITLE = re.compile(r"\((\d{4})\)\s*$")


class DataError(ValueError):
    """The data files are missing, malformed, or not the data set they claim to be."""


def item_text(title: str, year: str | None, genres: list[str]) -> str:
    """The item text the encoder sees: ``"title (year) | genre, genre"``.

    A title that already ends in "(year)" keeps it; an unknown year is left out.
    """
    title = title.strip()
    if year and year.isdigit() and not _YEAR_IN_TITLE.search(title):
        title = f"{title} ({year})"
    return f"{title} | {', '.join(genres) if genres else 'unknown'}"


def load_movielens_100k(path: str | Path | None = None) -> RatingsDataset:
    """Load MovieLens-100k with events sorted by time (stable on ties).

    path: a folder holding either the RecBole atomic files (``ml-100k.inter``, ``ml-100k.item``,
    ``ml-100k.user``) or the GroupLens originals (``u.data``, ``u.item``). None uses the cache
    folder ``<cache>/ml-100k`` and fills it from the RecBole 1.2.1 wheel the first time (this is
    the only network access in lrec_fast, through ``pip download``).

    Raises DataError if the files are malformed or do not hold exactly 100,000 ratings in 1..5
    by 943 users on 1,682 items.
    """
    if path is None:
        folder = default_cache_dir() / "ml-100k"
        if not all((folder / f"ml-100k.{p}").exists() for p in _PARTS):
            fetch_recbole_ml100k(folder)
    else:
        folder = Path(path)
        if not folder.is_dir():
            raise DataError(f"{folder} is not a folder")
    if (folder / "ml-100k.inter").exists():
        ds = _read_recbole(folder)
    elif (folder / "u.data").exists():
        ds = _read_grouplens(folder)
    else:
        raise DataError(
            f"{folder} holds neither ml-100k.inter/ml-100k.item (RecBole) nor u.data/u.item "
            "(GroupLens)"
        )
    validate_ml100k(ds)
    return ds


def fetch_recbole_ml100k(folder: Path) -> None:
    """Download the RecBole 1.2.1 wheel with pip and extract the three ml-100k files."""
    log.info("fetching MovieLens-100k from the %s wheel into %s", RECBOLE_REQUIREMENT, folder)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        cmd += ["--disable-pip-version-check", "-q", "-d", tmp, RECBOLE_REQUIREMENT]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("recbole-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise DataError(
                f"could not download {RECBOLE_REQUIREMENT} with pip (exit {proc.returncode}): "
                f"{proc.stderr.strip()[-500:]}\nPass path= a folder holding the ml-100k files."
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            for part in _PARTS:
                try:
                    data = zf.read(_MEMBER.format(part))
                except KeyError as exc:
                    raise DataError(f"{wheels[0].name} has no {_MEMBER.format(part)}") from exc
                atomic_write_bytes(folder / f"ml-100k.{part}", data)


def _read_table(path: Path, sep: str, encoding: str, header: bool) -> list[list[str]]:
    try:
        text = path.read_text(encoding=encoding)
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    rows = [line.split(sep) for line in text.splitlines() if line.strip()]
    return rows[1:] if header else rows


def _columns(path: Path, rows_with_header: list[list[str]], wanted: list[str]) -> list[int]:
    header = [h.split(":")[0] for h in rows_with_header[0]] if rows_with_header else []
    missing = [w for w in wanted if w not in header]
    if missing:
        raise DataError(f"{path}: header {header} lacks columns {missing}")
    return [header.index(w) for w in wanted]


def _read_recbole(folder: Path) -> RatingsDataset:
    inter_p, item_p = folder / "ml-100k.inter", folder / "ml-100k.item"
    inter = _read_table(inter_p, "\t", "utf-8", header=False)
    cu, ci, cr, ct = _columns(inter_p, inter, ["user_id", "item_id", "rating", "timestamp"])
    events = _events(inter_p, inter[1:], cu, ci, cr, ct)
    items = _read_table(item_p, "\t", "utf-8", header=False)
    ii, it, iy, ic = _columns(item_p, items, ["item_id", "movie_title", "release_year", "class"])
    item_ids, texts = [], []
    for n, row in enumerate(items[1:], start=2):
        try:
            item_ids.append(int(row[ii]))
            genres = row[ic].split() if len(row) > ic else []
            texts.append(item_text(row[it], row[iy], genres))
        except (IndexError, ValueError) as exc:
            raise DataError(f"{item_p}:{n}: malformed row {row!r}") from exc
    return _dataset(events, item_ids, texts)


def _read_grouplens(folder: Path) -> RatingsDataset:
    data_p, item_p = folder / "u.data", folder / "u.item"
    rows = _read_table(data_p, "\t", "latin-1", header=False)
    events = _events(data_p, rows, 0, 1, 2, 3)
    item_ids, texts = [], []
    for n, row in enumerate(_read_table(item_p, "|", "latin-1", header=False), start=1):
        try:
            flags = row[5 : 5 + len(GROUPLENS_GENRES)]
            if len(flags) != len(GROUPLENS_GENRES):
                raise ValueError("wrong number of genre columns")
            genres = [g for g, f in zip(GROUPLENS_GENRES, flags, strict=True) if f.strip() == "1"]
            item_ids.append(int(row[0]))
            texts.append(item_text(row[1], None, genres))
        except (IndexError, ValueError) as exc:
            raise DataError(f"{item_p}:{n}: malformed row {row!r}") from exc
    return _dataset(events, item_ids, texts)


def _events(path: Path, rows: list[list[str]], cu: int, ci: int, cr: int, ct: int) -> Interactions:
    try:
        user = np.array([int(r[cu]) for r in rows], dtype=np.int64)
        item = np.array([int(r[ci]) for r in rows], dtype=np.int64)
        rating = np.array([float(r[cr]) for r in rows], dtype=np.float32)
        ts = np.array([int(float(r[ct])) for r in rows], dtype=np.int64)
    except (IndexError, ValueError) as exc:
        raise DataError(f"{path}: malformed rating rows ({exc})") from exc
    return Interactions(user, item, rating, ts).sorted_by_time()


def _dataset(events: Interactions, item_ids: list[int], texts: list[str]) -> RatingsDataset:
    ids = np.array(item_ids, dtype=np.int64)
    return RatingsDataset(
        name="ml-100k",
        user_ids=np.unique(events.user),
        item_ids=ids,
        item_text=texts,
        events=events,
    )


def validate_ml100k(ds: RatingsDataset) -> None:
    """Check the counts and value ranges MovieLens-100k must have; raise DataError if not."""
    problems = []
    if len(ds.events) != N_RATINGS:
        problems.append(f"{len(ds.events)} ratings (expected {N_RATINGS})")
    if len(ds.user_ids) != N_USERS:
        problems.append(f"{len(ds.user_ids)} users (expected {N_USERS})")
    if len(np.unique(ds.item_ids)) != N_ITEMS or len(ds.item_ids) != N_ITEMS:
        problems.append(f"{len(ds.item_ids)} catalogue items (expected {N_ITEMS}, unique)")
    r = ds.events.rating
    if len(r) and (not np.all(np.isin(r, [1, 2, 3, 4, 5]))):
        problems.append("ratings outside the integers 1..5")
    unknown = np.setdiff1d(ds.events.item, ds.item_ids)
    if len(unknown):
        problems.append(f"{len(unknown)} rated items missing from the catalogue")
    if problems:
        raise DataError("not MovieLens-100k: " + "; ".join(problems))
