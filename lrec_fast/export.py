"""Export a trained model to a deployment directory and serve it with onnxruntime.

``export(model, out, precision)`` writes DEPLOY_DIR, which holds everything serving needs and
nothing else:

    encoder.onnx          text encoder graph (lrec_fast.text.onnx_encoder), in ``precision``
    tables.safetensors    item rows (fp32 | fp16 | int8 + item_row_scale fp32 [N]), item_bias,
                          user_rows, user_bias, mu: the rating model (predict);
                          rank_rows (same precision, + rank_row_scale), item_rank_bias and
                          item_rank_bias_cold (with the recency prior at export time, for
                          users with and without a ranking history), ctx_rows, user_recent: what
                          recommend scores (the ranking head, or the rating rows for
                          rank_by="rating"); proj (text -> every item value), seen (CSR,
                          with ratings and ages) and knn_* (the neighbourhood correction of predict)
    ids.json              external user and item ids, in row order
    vocab.txt, tokenizer.json, tokenizer_config.json, special_tokens_map.json
    manifest.json         format + version, precision, dims, rating range, sha256 of each file

``load_deployment(DEPLOY_DIR)`` checks the manifest (format, version, every file's sha256)
and serves ``recommend``, ``predict`` and ``add_items`` from the directory alone: the C++
tokeniser, the ONNX encoder and the scoring kernels; no torch model code. Serving state
(new items) lives in memory; the directory is never written.

The learning loop: keep learning in the torch runtime (``Recommender.feedback``), and at each
consolidation ``rec.save(ckpt)``, ``export(ckpt, new_dir, precision, encoder_from=old_dir)``
(the encoder is copied, not re-exported, when it has not changed), then point the service at
``new_dir`` (``load_deployment`` and swap the object: in-flight calls finish on the old one).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import offsets, user_neighbours
from ._io import fsync_dir
from ._version import __version__
from .model import IdMap, proj_slices
from .text.onnx_encoder import PRECISIONS, OrtEncoder, export_encoder

log = logging.getLogger(__name__)

FORMAT = "lrec_fast.deployment"
FORMAT_VERSION = 2  # 2: the ranking head
ENCODER_FILE, TABLES_FILE, IDS_FILE, MANIFEST_FILE = (
    "encoder.onnx", "tables.safetensors", "ids.json", "manifest.json")  # fmt: skip
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json")  # fmt: skip


class DeploymentError(ValueError):
    """A deployment directory that cannot be served: missing, corrupted or foreign files."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _item_table(rows: np.ndarray, precision: str, name: str = "item") -> dict[str, np.ndarray]:
    """Item rows as stored for ``precision``: ``{name}_rows`` (+ ``{name}_row_scale`` for int8,
    the kernels' quantised catalogue, ``reference.quantize_rows``)."""
    if precision == "fp16":
        return {f"{name}_rows": rows.astype(np.float16)}
    if precision == "int8":
        import torch

        from .kernels.reference import quantize_rows

        q, scale = quantize_rows(torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)))
        return {f"{name}_rows": q.numpy(), f"{name}_row_scale": scale.numpy()}
    return {f"{name}_rows": rows.astype(np.float32)}


def export(
    model: Any,
    out: str | Path,
    precision: str = "int8",
    *,
    encoder_from: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a deployment directory for ``model`` (a ``Recommender`` or a checkpoint folder
    written by ``Recommender.save``). ``precision`` applies to the encoder and the item table.
    ``encoder_from``: an earlier deployment of the same precision whose encoder.onnx is copied
    instead of exported again. Written atomically (temp folder, fsync, rename); refuses an
    existing ``out`` unless ``overwrite``. Returns the directory."""
    from .service import Recommender
    from .text.encoder import MINILM_NAME, minilm_dir

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    rec = model if isinstance(model, Recommender) else Recommender.load(model)
    enc_name = rec._config_dict()["encoder"]
    if enc_name != MINILM_NAME:
        raise ValueError(f"export serves the {MINILM_NAME} encoder; this model uses {enc_name!r}")
    target = Path(out).resolve()
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists (overwrite=True replaces it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        if encoder_from is not None:
            old = load_manifest(encoder_from)
            if old["precision"] != precision:
                raise ValueError(f"{encoder_from}: {old['precision']} encoder, not {precision}")
            shutil.copyfile(Path(encoder_from) / ENCODER_FILE, tmp / ENCODER_FILE)
            enc_info = old["encoder"]
        else:
            enc_info = export_encoder(tmp / ENCODER_FILE, precision)
        for name in TOKENIZER_FILES:
            if (minilm_dir() / name).exists():
                shutil.copyfile(minilm_dir() / name, tmp / name)
        with rec._writing:  # (answers go on: the state cannot change meanwhile)
            tensors, ids, meta = _serving_state(rec, precision)
        from safetensors.numpy import save_file

        save_file(tensors, str(tmp / TABLES_FILE))
        (tmp / IDS_FILE).write_text(json.dumps(ids), encoding="utf-8")
        files = sorted(p.name for p in tmp.iterdir())
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "lrec_fast": __version__,
            "precision": precision, "encoder": {"name": MINILM_NAME, **enc_info}, **meta,
            "files": {name: _sha256(tmp / name) for name in files},
        }  # fmt: skip
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        for p in tmp.iterdir():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s deployment to %s", precision, target)
    return target


def _serving_state(
    rec: Any, precision: str
) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, Any]]:
    from . import online

    st, cfg = rec.state, rec.config
    seen = st.tensors()
    by_class, by_item = offsets.tables(st, cfg)
    softmax = cfg.rank_by == "softmax"
    rank_rows = st.tgt_rows.t if softmax else st.true_item_rows()
    tensors = {
        **_item_table(st.true_item_rows().numpy(), precision),
        "item_bias": st.true_item_bias().numpy().astype(np.float32),
        **_item_table(rank_rows.numpy(), precision, "rank"),
        "item_rank_bias": online.rank_bias(st, cfg).numpy().astype(np.float32),
        "item_rank_bias_cold": online.rank_bias(st, cfg, cold=True).numpy().astype(np.float32),
        "ctx_rows": st.ctx_rows.t.numpy().astype(np.float32),
        "user_recent": st.user_recent.t.numpy(),
        "user_rows": st.true_user_rows().numpy().astype(np.float32),
        "user_bias": st.true_user_bias().numpy().astype(np.float32),
        "mu": st.mu.numpy().astype(np.float64),
        "proj": st.proj.numpy().astype(np.float32),
        "seen_indptr": seen["seen_indptr"].numpy(),
        "seen_indices": seen["seen_indices"].numpy(),
        "seen_ratings": seen["seen_ratings"].numpy(),
        "seen_ages": seen["seen_ages"].numpy(),
        "knn_rows": st.knn_rows.numpy(),
        "knn_sims": st.knn_sims.numpy().astype(np.float32),
        "knn_bias": st.knn_bias.numpy().astype(np.float32),
        "knn_mu": st.knn_mu.numpy().astype(np.float64),
        "offset_class": by_class.numpy().astype(np.float32),
        "offset_item": by_item.numpy().astype(np.float32),
        "uknn_rows": st.uknn_rows.t.numpy(),
        "uknn_sims": st.uknn_sims.t.numpy().astype(np.float32),
    }
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    ids = {"users": list(st.users.ids), "items": list(st.items.ids)}
    meta = {"dim": st.dim, "text_dim": st.text_dim, "n_users": len(st.users),
            "n_items": len(st.items), "rating_range": list(rec.rating_range),
            "proj_fitted": bool(st.proj_fitted), "rank_by": cfg.rank_by,
            "history_len": st.history_len, "history_decay": cfg.history_decay,
            "rerank_weight": cfg.rerank_weight, "rerank_depth": cfg.rerank_depth,
            "knn": {"weight": cfg.knn_weight, "user_reg": cfg.knn_user_reg,
                    "user_decay": cfg.knn_user_decay, "k": cfg.knn_k, "reg": cfg.knn_reg,
                    "decay": cfg.knn_decay, "ramp": cfg.knn_ramp},
            "uknn": user_neighbours.settings(cfg)}  # fmt: skip
    return tensors, ids, meta


def load_manifest(directory: str | Path, verify: bool = True) -> dict[str, Any]:
    """The manifest of a deployment directory, after checking its format, version and (with
    ``verify``) that every listed file is there with its recorded sha256."""
    folder = Path(directory)
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DeploymentError(f"{folder}: no {MANIFEST_FILE}; not a deployment directory") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise DeploymentError(f"{folder}/{MANIFEST_FILE} is unreadable: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DeploymentError(f"{folder}: not an {FORMAT} directory")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DeploymentError(
            f"{folder}: format version {manifest.get('format_version')}, this lrec_fast "
            f"{__version__} serves version {FORMAT_VERSION}; re-export the model"
        )
    files = manifest.get("files")
    needed = {ENCODER_FILE, TABLES_FILE, IDS_FILE}
    if not isinstance(files, dict) or not needed <= set(files):
        raise DeploymentError(f"{folder}: the manifest does not list {sorted(needed)}")
    if verify:
        for name, digest in files.items():
            path = folder / name
            if Path(name).name != name or not path.is_file():
                raise DeploymentError(f"{folder}: {name} is missing")
            if _sha256(path) != digest:
                raise DeploymentError(f"{folder}: {name} does not match its sha256 (corrupted "
                                      "or modified after export)")  # fmt: skip
    return manifest


class Deployment:
    """A model served from a deployment directory (use ``load_deployment``).

    ``provider`` is the onnxruntime provider the encoder runs on; ``precision`` what was
    exported. Thread-safe: answers run concurrently with ``add_items`` under one lock."""

    def __init__(self, directory: str | Path, providers: Sequence[str] | None = None,
                 threads: int | None = None) -> None:  # fmt: skip
        from safetensors.numpy import load_file

        self.directory = Path(directory)
        self.manifest = load_manifest(self.directory)
        self.precision: str = self.manifest["precision"]
        t = load_file(str(self.directory / TABLES_FILE))
        ids = json.loads((self.directory / IDS_FILE).read_text(encoding="utf-8"))
        self._users, self._items = IdMap(ids["users"]), IdMap(ids["items"])
        self.item_rows, self.item_row_scale = t["item_rows"], t.get("item_row_scale")
        self.item_bias, self.user_rows = t["item_bias"], t["user_rows"]
        # what recommend scores: rows (+ int8 scales) and the item term with the recency prior
        self.rank_rows, self.rank_row_scale = t["rank_rows"], t.get("rank_row_scale")
        self.item_rank_bias = t["item_rank_bias"]
        self.item_rank_bias_cold = t.get("item_rank_bias_cold", self.item_rank_bias)
        self.ctx_rows, self.user_recent = t["ctx_rows"], t["user_recent"]
        self.rank_by: str = self.manifest["rank_by"]
        # exported before the re-rank existed: none
        self.rerank_weight = float(self.manifest.get("rerank_weight", 0.0))
        self.rerank_depth = int(self.manifest.get("rerank_depth", 0))
        self.user_bias = t["user_bias"]
        self.mu = float(t["mu"][0])
        self.proj = t["proj"]
        ptr, idx = t["seen_indptr"], t["seen_indices"]
        self._seen = [idx[ptr[i] : ptr[i + 1]] for i in range(len(ptr) - 1)]
        # the neighbourhood correction (exported before it existed: none)
        rated = t.get("seen_ratings", np.full(len(idx), np.nan, np.float32))
        ages = t.get("seen_ages", np.zeros(len(idx), np.int64))  # (before they were kept: 0)
        known = np.isfinite(rated)  # unknown ratings (exported before they were kept): none
        self._rated = [
            tuple(x[ptr[i] : ptr[i + 1]][known[ptr[i] : ptr[i + 1]]] for x in (idx, rated, ages))
            for i in range(len(ptr) - 1)
        ]
        self._neighbours = self._neighbours_of(t, self.manifest.get("knn"))
        # ... and the user-neighbourhood correction (before it existed: none)
        self._user_neighbours = user_neighbours.UserNeighbours.from_tables(
            t.get("uknn_rows", np.zeros((0, 0), np.int64)), t.get("uknn_sims", np.zeros((0, 0),
            np.float32)), ptr, idx, rated, t["knn_bias"], float(t["knn_mu"][0]),
            len(self.item_rows), self.manifest.get("uknn"),
        ) if "knn_bias" in t else None  # fmt: skip
        # the residual offsets of predict (exported before they existed: none)
        self.offset_class = t.get("offset_class", np.zeros(offsets.N_CLASSES, np.float32))
        self.offset_item = t.get("offset_item", np.zeros(len(self.item_rows), np.float32))
        if len(self._items) != len(self.item_rows) or len(self._users) != len(self.user_rows):
            raise DeploymentError(f"{self.directory}: id lists and tables disagree in size")
        enc = self.manifest["encoder"]
        self.encoder = OrtEncoder(self.directory / ENCODER_FILE, self.directory,
                                  name=f"{enc['name']}@onnx-{self.precision}",
                                  dim=int(self.manifest["text_dim"]), providers=providers,
                                  threads=threads)  # fmt: skip
        self.provider = self.encoder.provider
        if self.precision == "fp16" and self.provider == "CPUExecutionProvider":
            log.warning("fp16 encoder on the CPU provider: correct but slow; export int8 for CPUs")
        self._mean_user = (self.user_rows.mean(0) if len(self.user_rows) else
                           np.zeros(self.user_rows.shape[1], np.float32))  # fmt: skip
        self._mean_bias = float(self.user_bias.mean()) if len(self.user_bias) else 0.0
        self._lock = threading.RLock()
        log.info("deployment %s: %s, %d users, %d items, encoder on %s", self.directory,
                 self.precision, len(self._users), len(self._items), self.provider)  # fmt: skip

    @staticmethod
    def _neighbours_of(t: dict[str, np.ndarray], knn: dict[str, Any] | None) -> Any:
        import torch

        from .neighbours import Neighbours

        if not knn or not knn["weight"] or "knn_rows" not in t or not len(t["knn_rows"]):
            return None
        return Neighbours(torch.from_numpy(t["knn_rows"]), torch.from_numpy(t["knn_sims"]),
                          torch.from_numpy(t["knn_bias"]), float(t["knn_mu"][0]),
                          float(knn["weight"]), float(knn["user_reg"]),
                          float(knn.get("user_decay", 1.0)), int(knn["k"]), float(knn["reg"]),
                          float(knn.get("decay", 1.0)), float(knn.get("ramp", 0.0)))  # fmt: skip

    def _history(self, user: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self._rated[user]

    def _blended(self, users: Any, items: Any, ratings: Any, rerank: bool = False) -> Any:
        """Ratings (torch float32 [E]) of user rows ``users`` (-1: unknown) and item rows
        ``items`` with the item-neighbourhood correction blended in and the user-neighbourhood
        correction added, as ``Recommender.predict`` (offsets aside) and, with ``rerank``, its
        re-rank (the user correction only where the manifest's ``uknn.rerank`` says so)."""
        from .neighbours import corrected

        lo, hi = self.manifest["rating_range"]
        un = self._user_neighbours
        if rerank and not self.manifest.get("uknn", {}).get("rerank", True):
            un = None
        return corrected(self._neighbours, un.args() if un else None, self._history, users,
                         items, ratings, (lo, hi), None)  # fmt: skip

    @property
    def n_items(self) -> int:
        return len(self._items)

    @property
    def n_users(self) -> int:
        return len(self._users)

    def _queries(self, user_ids: Sequence[Any]) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """User rows [B, d] and biases [B]; unknown users get the mean known user."""
        idx = [self._users.index.get(u, -1) for u in user_ids]
        known = np.asarray(idx, dtype=np.int64) >= 0
        rows = np.clip(np.asarray(idx, dtype=np.int64), 0, None)
        if not len(self.user_rows):
            return (np.zeros((len(idx), self.user_rows.shape[1]), np.float32),
                    np.zeros(len(idx), np.float32), idx)  # fmt: skip
        q = np.where(known[:, None], self.user_rows[rows], self._mean_user[None, :])
        b = np.where(known, self.user_bias[rows], self._mean_bias)
        return q.astype(np.float32), b.astype(np.float32), idx

    def _rank_queries(self, user_ids: Sequence[Any]) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """Ranking queries [B, d] and score offsets [B] (as ``Recommender._ranking``)."""
        if self.rank_by == "rating":
            q, b, idx = self._queries(user_ids)
            return q, b + np.float32(self.mu), idx
        import torch

        from .kernels import user_queries
        from .ranking import history_weights

        idx = [self._users.index.get(u, -1) for u in user_ids]
        w = history_weights(float(self.manifest["history_decay"]), self.user_recent.shape[1])
        rq = user_queries(torch.from_numpy(self.ctx_rows), torch.from_numpy(self.user_recent),
                          torch.tensor(idx, dtype=torch.int64), w)  # fmt: skip
        return rq.numpy(), np.zeros(len(idx), np.float32), idx

    def recommend(
        self, user_ids: Sequence[Any], k: int = 10, exclude_seen: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """As ``Recommender.recommend``: (item ids [B, k], ranking scores float32 [B, k])."""
        import torch

        from .kernels.reference import rerank as rerank_by
        from .ranking import cold_users, reranks
        from .service import NO_ITEMS, _as_ids, check_k, external_ids, served_topk

        ids = _as_ids(user_ids, "user_ids")
        check_k(k)
        with self._lock:
            q, offset, idx = self._rank_queries(ids)
            seen = [self._seen[i] if (exclude_seen and i >= 0) else NO_ITEMS for i in idx]
            cold = cold_users(
                torch.from_numpy(self.user_recent), torch.tensor(idx, dtype=torch.int64)
            )
            rs = self.rank_row_scale
            terms = (torch.from_numpy(self.item_rank_bias),
                     torch.from_numpy(self.item_rank_bias_cold))  # fmt: skip
            rerank = None
            if reranks(self.rank_by, self.rerank_weight, self.rerank_depth):

                def reorder(s: torch.Tensor, t: torch.Tensor, pos: list[int]) -> Any:
                    rating = self._rating([idx[p] for p in pos])
                    return rerank_by(s, t, rating, self.rerank_weight, self.rerank_depth)[:2]

                rerank = (reorder, self.rerank_depth)
            scores, top = served_topk(
                torch.from_numpy(q), torch.from_numpy(self.rank_rows), int(k), terms, cold, seen,
                torch.from_numpy(offset), rerank,
                row_scale=torch.from_numpy(rs) if rs is not None else None,
            )  # fmt: skip
            return external_ids(top, self._items.array()), scores.numpy().astype(np.float32)

    def _rating(self, users: list[int]) -> Any:
        """The re-rank's rating function for known user rows [B]: item rows (torch int64
        [B, m]) -> predicted ratings (float32 torch tensor [B, m])."""
        import torch

        u = np.asarray(users, dtype=np.int64)
        q, b = self.user_rows[u][:, None, :], self.user_bias[u][:, None]

        def rating(items: torch.Tensor) -> torch.Tensor:
            r = torch.from_numpy(self._rating_sum(q, b, items.numpy()))
            flat = torch.from_numpy(u)[:, None].expand_as(items).reshape(-1)
            return self._blended(flat, items.reshape(-1), r.reshape(-1), rerank=True).view(
                items.shape
            )

        return rating

    def predict(self, user_ids: Sequence[Any], item_ids: Sequence[Any]) -> np.ndarray:
        """Predicted ratings, float32 [N]; unknown items raise ValueError."""
        from .service import _as_ids

        u, i = _as_ids(user_ids, "user_ids"), _as_ids(item_ids, "item_ids")
        if len(u) != len(i):
            raise ValueError("user_ids and item_ids differ in length")
        with self._lock:
            missing = [j for j in i if j not in self._items]
            if missing:
                raise ValueError(f"unknown items: {missing[:5]}")
            import torch

            q, b, idx = self._queries(u)
            rows = np.array([self._items.index[j] for j in i], dtype=np.int64)
            p = torch.from_numpy(self._rating_sum(q, b, rows))
            users = torch.tensor(idx, dtype=torch.int64)
            out = self._blended(users, torch.from_numpy(rows), p).numpy()
            counts = torch.tensor([len(self._seen[a]) if a >= 0 else 0 for a in idx])
            return (
                out
                + self.offset_class[offsets.count_class(counts).numpy()]
                + self.offset_item[rows]
            )

    def _rating_sum(self, q: np.ndarray, b: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """mu + b + b_v[rows] + <q, V[rows]>, float32 with rows' shape (q [..., d] and b
        broadcast against rows)."""
        v = self.item_rows[rows].astype(np.float32)
        if self.item_row_scale is not None:
            v = v * self.item_row_scale[rows][..., None]
        return ((q * v).sum(-1) + self.item_bias[rows] + b + self.mu).astype(np.float32)

    def add_items(self, item_ids: Sequence[Any], texts: Sequence[str]) -> None:
        """New items from their text: ONNX encoder -> projection -> [row | bias], appended to
        the served table (in memory). All checked first; a rejected call changes nothing."""
        from .service import _as_ids

        ids = _as_ids(item_ids, "item_ids")
        if isinstance(texts, str) or len(texts) != len(ids):
            raise ValueError("texts must be a sequence with one str per item id")
        if len(set(ids)) != len(ids):
            raise ValueError("item_ids contains duplicates")
        if not self.manifest.get("proj_fitted", False):
            raise ValueError("this deployment's model had no fitted text projection")
        emb = self.encoder.encode(list(texts))  # validates the texts
        out = (emb @ self.proj.T).astype(np.float32)
        v = {k: out[:, sl] for k, sl in proj_slices(int(self.manifest["dim"])).items()}
        rank = ("tgt_rows", "tgt_bias") if self.rank_by == "softmax" else ("item_rows",
                                                                          "item_bias")  # fmt: skip
        new = {**_item_table(v["item_rows"], self.precision),
               **_item_table(v[rank[0]], self.precision, "rank"),
               "item_bias": v["item_bias"][:, 0], "item_rank_bias": v[rank[1]][:, 0],
               "item_rank_bias_cold": v[rank[1]][:, 0],
               "ctx_rows": v["ctx_rows"],  # no events yet: no recency prior
               "offset_item": np.zeros(len(ids), np.float32)}  # ... and no residuals  # fmt: skip
        with self._lock:
            known = [j for j in ids if j in self._items]
            if known:
                raise ValueError(f"items already in the catalogue: {known[:5]}")
            for name, part in new.items():
                setattr(self, name, np.concatenate([getattr(self, name), part]))
            for j in ids:
                self._items.add(j)

    def __repr__(self) -> str:
        return (f"Deployment({str(self.directory)!r}, precision={self.precision!r}, provider="
                f"{self.provider!r}, users={len(self._users)}, items={self.n_items})")  # fmt: skip


def load_deployment(
    directory: str | Path, providers: Sequence[str] | None = None, threads: int | None = None
) -> Deployment:
    """Serve a deployment directory (see the module doc). ``providers``: None = CUDA, then
    CPU (the one that runs is logged and in ``.provider``); a list = exactly those, or
    ``ProviderUnavailable``. Raises ``DeploymentError`` for missing, corrupted (sha256) or
    foreign-version files."""
    return Deployment(directory, providers, threads)


__all__ = ["Deployment", "DeploymentError", "export", "load_deployment", "load_manifest"]
