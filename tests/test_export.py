"""ONNX export and serving (issue 5): fidelity of each precision against the torch runtime on
the 1,682 MovieLens item texts, dynamic shapes, provider choice, tampered directories, the
per-token quantiser against its numpy definition, and the CLI."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from lrec_fast import Recommender, offsets
from lrec_fast import neighbours as knn
from lrec_fast.cli import main as cli_main
from lrec_fast.export import (
    ENCODER_FILE,
    IDS_FILE,
    MANIFEST_FILE,
    TABLES_FILE,
    DeploymentError,
    export,
    load_deployment,
)
from lrec_fast.text.encoder import MINILM_NAME, MiniLMEncoder
from lrec_fast.text.onnx_encoder import ProviderUnavailable, make_session

pytestmark = pytest.mark.slow
PRECISIONS = ("fp32", "int8", "fp16")


class TorchMiniLM:
    """The torch encoder, with the MovieLens texts' embeddings computed once."""

    name, dim = MINILM_NAME, 384

    def __init__(self, enc: MiniLMEncoder, texts: list[str]) -> None:
        self.enc = enc
        self.memo = dict(zip(texts, enc.encode(texts), strict=True))

    def encode(self, texts):  # type: ignore[no-untyped-def]
        todo = [t for t in texts if t not in self.memo]
        if todo:
            self.memo.update(zip(todo, self.enc.encode(todo), strict=True))
        return np.stack([self.memo[t] for t in texts]) if texts else np.zeros((0, 384), np.float32)


@pytest.fixture(scope="module")
def ml():
    from lrec_fast.data import load_movielens_100k

    return load_movielens_100k()


@pytest.fixture(scope="module")
def torch_encoder(ml) -> TorchMiniLM:
    return TorchMiniLM(MiniLMEncoder(), list(ml.item_text))


@pytest.fixture(scope="module")
def trained(ml, torch_encoder) -> Recommender:
    rec = Recommender(encoder=torch_encoder)
    rec.add_items(ml.item_ids, ml.item_text)
    half = len(ml.events) // 2
    warm = ml.events.take(slice(0, half))
    rec.fit(warm.user, warm.item, warm.rating)
    for s in range(half, half + 300, 100):  # a little stream: residual offsets to export
        ev = ml.events.take(slice(s, s + 100))
        rec.feedback(ev.user, ev.item, ev.rating)
    assert rec.state.offset_class.any() and rec.state.offset_item.t.any()
    return rec


@pytest.fixture(scope="module")
def deployed(trained, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("deploy")
    trained.save(root / "ckpt")
    return {p: export(root / "ckpt", root / p, p) for p in PRECISIONS}


def neighbours(e: np.ndarray, k: int = 10) -> np.ndarray:
    s = e @ e.T
    np.fill_diagonal(s, -np.inf)
    return np.argsort(-s, axis=1)[:, :k]


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(a, b, strict=True)]))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_embeddings_match_torch(ml, torch_encoder, deployed, precision):
    texts = list(ml.item_text)
    ref = torch_encoder.encode(texts)
    dep = load_deployment(deployed[precision])
    got = dep.encoder.encode(texts)
    cos = (got * ref).sum(1)
    assert got.shape == ref.shape and got.dtype == np.float32
    nn = overlap(neighbours(got), neighbours(ref))
    if precision == "int8":
        assert cos.mean() >= 0.995 and nn >= 0.9, (cos.mean(), nn)
    else:
        assert cos.mean() >= 0.999 and nn >= 0.95, (cos.mean(), nn)


def test_int8_file_is_small(deployed):
    fp32 = (deployed["fp32"] / ENCODER_FILE).stat().st_size
    int8 = (deployed["int8"] / ENCODER_FILE).stat().st_size
    assert int8 <= 0.35 * fp32, int8 / fp32


@pytest.mark.parametrize("precision", PRECISIONS)
def test_recommend_and_predict_match_torch_runtime(trained, deployed, precision):
    dep = load_deployment(deployed[precision])
    users = [*list(trained.state.users.ids)[:300], "never-seen"]
    want_ids, want_scores = trained.recommend(users, 10)
    got_ids, got_scores = dep.recommend(users, 10)
    recall = overlap(got_ids, want_ids)
    if precision == "fp32":
        assert recall == 1.0
        np.testing.assert_allclose(got_scores, want_scores, rtol=0, atol=1e-4)
    else:
        assert recall >= 0.95, recall
    items = want_ids[:, 0]
    tol = 1e-4 if precision == "fp32" else 0.05
    np.testing.assert_allclose(dep.predict(users, items), trained.predict(users, items), atol=tol)
    if precision == "fp32":  # ... with the user-neighbourhood correction in both
        assert dep._user_neighbours is not None
        trained.config.uknn_weight, w = 0.0, trained.config.uknn_weight
        without = trained.predict(users, items)
        trained.config.uknn_weight = w
        assert np.abs(without - trained.predict(users, items)).max() > 100 * tol


def test_user_neighbours_out_of_the_rerank(trained, deployed, tmp_path):
    """``uknn_rerank=False`` (the manifest's ``uknn.rerank``): the re-rank without the user
    correction, predict still with it, in the deployment as in the Recommender."""
    folder = tmp_path / "dep"
    shutil.copytree(deployed["fp32"], folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["uknn"]["rerank"] is True
    manifest["uknn"]["rerank"] = False
    (folder / "manifest.json").write_text(json.dumps(manifest))
    dep = load_deployment(folder)
    users = list(trained.state.users.ids)[:200]
    cfg = trained.config
    both_ids, both = trained.recommend(users, 10)
    items = both_ids[:, 0]
    predicted = trained.predict(users, items)
    cfg.uknn_rerank = False
    try:
        want_ids, want_scores = trained.recommend(users, 10)
        got_ids, got_scores = dep.recommend(users, 10)
        assert overlap(got_ids, want_ids) == 1.0
        np.testing.assert_allclose(got_scores, want_scores, rtol=0, atol=1e-4)
        assert not np.allclose(want_scores, both, atol=1e-3)  # the switch changes the re-rank
        assert np.array_equal(trained.predict(users, items), predicted)  # ... not predict
        np.testing.assert_allclose(dep.predict(users, items), predicted, atol=1e-4)
        cfg.uknn_weight, w = 0.0, cfg.uknn_weight  # = the re-rank without the correction
        try:
            np.testing.assert_allclose(trained.recommend(users, 10)[1], want_scores, atol=1e-5)
        finally:
            cfg.uknn_weight = w
    finally:
        cfg.uknn_rerank = True
    with pytest.raises(ValueError, match="unknown items"):
        dep.predict([users[0]], ["no-such-item"])
    with pytest.raises(ValueError, match="k must be"):
        dep.recommend(users[:1], 0)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_add_items_through_the_onnx_encoder(trained, deployed, torch_encoder, precision):
    dep = load_deployment(deployed[precision])
    texts = ["Heat Wave Diaries (2031) | Drama|Romance", "Robot Uprising III (2032) | Sci-Fi"]
    ids = [90001, 90002]
    n = dep.n_items
    for bad_ids, bad_texts in (([ids[0], ids[0]], texts), (ids, texts[:1]), (ids, [texts[0], 7]),
                               ([trained.item_ids[0], ids[1]], texts)):  # fmt: skip
        with pytest.raises((ValueError, TypeError)):
            dep.add_items(bad_ids, bad_texts)
        assert dep.n_items == n  # rejected whole
    dep.add_items(ids, texts)
    assert dep.n_items == n + 2
    # the torch runtime with the same projection gives the same predictions for new items
    emb = torch.from_numpy(torch_encoder.encode(texts))
    out = emb @ trained.state.proj.T
    sl = trained.state.proj_slices()
    users = list(trained.state.users.ids)[:50]
    q, b, _ = trained._queries(users)
    want = q @ out[:, sl["item_rows"]].T + out[:, sl["item_bias"]].T + b[:, None]
    want += float(trained.state.mu)
    # blended with the neighbourhood prediction (no neighbours yet: the user's baseline)
    nb = knn.Neighbours.of(trained.state, trained.config)
    rows = torch.tensor([trained.state.users.index[u] for u in users])
    for c in range(len(ids)):
        new_row = torch.full((len(users),), n + c)
        want[:, c] = knn.corrected(nb, None, trained.state.seen.history, rows, new_row,
                                   want[:, c], trained.rating_range, "torch")  # fmt: skip
    # plus the offset of each user's rating count class (new items have no residuals yet)
    counts = torch.tensor([len(trained.state.seen[a]) for a in rows.tolist()])
    by_class, _ = offsets.terms(trained.state, trained.config, counts, torch.zeros_like(counts))
    want += by_class.float()[:, None]
    want = want.numpy()
    got = np.stack([dep.predict(users, [j] * len(users)) for j in ids], axis=1)
    np.testing.assert_allclose(got, want, atol=1e-3 if precision == "fp32" else 0.1)
    # and the same ranking scores: the ranking head's text prior
    qr = trained._ranking(users)[0]
    # from the deployment's own embeddings (its encoder's int8 error is tested elsewhere), so
    # only the row rounding remains: at most amax/254 per value, |q|_1 x that per score
    out = torch.from_numpy(dep.encoder.encode(texts)) @ trained.state.proj.T
    rows = out[:, sl["tgt_rows"]]
    want = (qr @ rows.T + out[:, sl["tgt_bias"]].T).numpy()
    tol = (qr.abs().sum(1, keepdim=True) * rows.abs().amax(1) / 254 + 1e-3).numpy()
    top, scores = dep.recommend(users, dep.n_items, exclude_seen=False)
    assert set(ids) <= set(top[0].tolist())
    for a in range(len(users)):
        for c, j in enumerate(ids):
            pos = top[a].tolist().index(j)
            bound = 1e-3 if precision == "fp32" else tol[a, c]
            assert abs(scores[a, pos] - want[a, c]) < bound


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_dynamic_shapes(deployed, precision, rng):
    sess, _ = make_session(deployed[precision] / ENCODER_FILE)
    bert = MiniLMEncoder().model
    for b, s in ((1, 1), (256, 8), (2, 512), (3, 17)):
        ids = rng.integers(1000, 30000, (b, s)).astype(np.int64)
        ids[:, 0] = 101
        mask = np.ones_like(ids)
        if s > 2:
            lengths = rng.integers(2, s + 1, b)
            mask = (np.arange(s)[None, :] < lengths[:, None]).astype(np.int64)
            ids = ids * mask
        (got,) = sess.run(["embedding"], {"input_ids": ids, "attention_mask": mask})
        assert got.shape == (b, 384) and np.isfinite(got).all()
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4)
        with torch.inference_mode():
            m = torch.from_numpy(mask)
            h = bert(input_ids=torch.from_numpy(ids), attention_mask=m).last_hidden_state
            w = m.unsqueeze(-1).float()
            ref = torch.nn.functional.normalize((h * w).sum(1) / w.sum(1), dim=-1).numpy()
        cos = (got * ref).sum(1)
        assert cos.min() >= (0.9999 if precision == "fp32" else 0.97), (b, s, cos.min())


def test_provider_choice_is_explicit(deployed, caplog):
    import onnxruntime as ort

    path = deployed["fp32"] / ENCODER_FILE
    with pytest.raises(ProviderUnavailable, match="not in this onnxruntime"):
        make_session(path, ["NoSuchExecutionProvider"])
    if "CUDAExecutionProvider" in ort.get_available_providers() and not torch.cuda.is_available():
        # as on the CPU machines: onnxruntime-gpu lists CUDA but cannot start it
        with pytest.raises(ProviderUnavailable, match="could not start"):
            make_session(path, ["CUDAExecutionProvider", "CPUExecutionProvider"])
        from lrec_fast.text import onnx_encoder

        onnx_encoder._DEAD_PROVIDERS.clear()
        with caplog.at_level(logging.WARNING):
            dep = load_deployment(deployed["fp32"])
        assert dep.provider == "CPUExecutionProvider"
        assert "CUDAExecutionProvider" in caplog.text and "could not start" in caplog.text
    sess, provider = make_session(path, ["CPUExecutionProvider"])
    assert provider == "CPUExecutionProvider" == sess.get_providers()[0]


def test_tampered_or_foreign_directories_are_refused(deployed, tmp_path):
    def fresh(name: str) -> Path:
        d = tmp_path / name
        shutil.copytree(deployed["int8"], d)
        return d

    d = fresh("flip")
    data = bytearray((d / TABLES_FILE).read_bytes())
    data[-3] ^= 0x40
    (d / TABLES_FILE).write_bytes(bytes(data))
    with pytest.raises(DeploymentError, match="sha256"):
        load_deployment(d)
    d = fresh("missing")
    (d / IDS_FILE).unlink()
    with pytest.raises(DeploymentError, match="missing"):
        load_deployment(d)
    d = fresh("version")
    man = json.loads((d / MANIFEST_FILE).read_text())
    man["format_version"] = 999
    (d / MANIFEST_FILE).write_text(json.dumps(man))
    with pytest.raises(DeploymentError, match="version"):
        load_deployment(d)
    d = fresh("garbage")
    (d / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(DeploymentError, match="unreadable"):
        load_deployment(d)
    with pytest.raises(DeploymentError, match="no manifest"):
        load_deployment(tmp_path)


def test_export_refuses_bad_requests(deployed, trained, fitted, tmp_path):
    with pytest.raises(ValueError, match="precision"):
        export(trained, tmp_path / "x", "int4")
    with pytest.raises(ValueError, match="encoder"):
        export(fitted, tmp_path / "y", "fp32")  # a hashing-encoder model
    with pytest.raises(FileExistsError):
        export(trained, deployed["fp32"], "fp32", encoder_from=deployed["fp32"])
    with pytest.raises(ValueError, match="int8 encoder, not fp32"):
        export(trained, tmp_path / "z", "fp32", encoder_from=deployed["int8"])
    assert not (tmp_path / "z").exists() and not list(tmp_path.glob(".z*"))


def test_cli_export_reuses_the_encoder(deployed, tmp_path, capsys):
    ckpt = deployed["int8"].parent / "ckpt"
    out = tmp_path / "again"
    assert cli_main(["export", "--model", str(ckpt), "--out", str(out), "--precision", "int8",
                     "--encoder-from", str(deployed["int8"])]) == 0  # fmt: skip
    assert "serves on CPUExecutionProvider" in capsys.readouterr().out
    a = json.loads((out / MANIFEST_FILE).read_text())["files"]
    b = json.loads((deployed["int8"] / MANIFEST_FILE).read_text())["files"]
    assert a == b  # same encoder, same tables: byte-identical deployment


def _per_token_reference(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The quantised product by its definition (lrec_fast/quantize.py): the activations'
    range, scale, zero point and levels in float32, as the graph computes them (in float64 a
    zero point or level can round the other way and move a whole token by one level), the
    integer product and its rescaling in float64."""
    x2 = x.reshape(-1, x.shape[-1]).astype(np.float32)
    lo, hi = np.minimum(x2.min(1), np.float32(0)), np.maximum(x2.max(1), np.float32(0))
    s = np.maximum((hi - lo) / np.float32(255), np.float32(1e-8))
    z = np.round(-lo / s)
    xq = np.clip(np.round(x2 / s[:, None]) + z[:, None], 0, 255).astype(np.float64)
    s, z = s.astype(np.float64), z.astype(np.float64)
    ws = np.maximum(np.abs(w).max(0), 1e-12) / 127
    wq = np.clip(np.round(w / ws), -127, 127)
    y = ((xq - z[:, None]) @ wq) * s[:, None] * ws[None, :]
    return y.reshape(*x.shape[:-1], w.shape[1])


def test_per_token_quantiser_against_its_definition(rng):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from lrec_fast.quantize import quantize_per_token
    from lrec_fast.text.onnx_encoder import OPSET

    k, n, vocab = 37, 21, 50  # not multiples of any kernel block
    w = rng.standard_normal((k, n)).astype(np.float32)
    w[:, 3] = 0.0  # an all-zero column
    table = rng.standard_normal((vocab, k)).astype(np.float32) * 3
    table[7] = 0.0
    graph = helper.make_graph(
        [helper.make_node("Gather", ["word_embeddings.weight", "ids"], ["e"]),
         helper.make_node("Add", ["e", "x"], ["h"]),
         helper.make_node("MatMul", ["h", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"]),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", n])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(table, "word_embeddings.weight")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    q = quantize_per_token(model)
    onnx.checker.check_model(q)
    sess, _ = make_session(q.SerializeToString(), ["CPUExecutionProvider"])
    tq = np.clip(
        np.round(table / (np.maximum(np.abs(table).max(1), 1e-12) / 127)[:, None]), -127, 127
    )
    table_deq = tq * (np.maximum(np.abs(table).max(1), 1e-12) / 127)[:, None]
    for b, s, scale in ((1, 1, 1.0), (3, 5, 1.0), (2, 9, 1e4), (4, 3, 1e-3)):
        ids = rng.integers(0, vocab, (b, s))
        ids[0, 0] = 7
        x = (rng.standard_normal((b, s, k)) * scale).astype(np.float32)
        x[0, 0] = 0.0  # an all-zero token (with the zero embedding row)
        (y,) = sess.run(["y"], {"ids": ids, "x": x})
        want = _per_token_reference(table_deq.astype(np.float32)[ids] + x, w.astype(np.float64))
        exact = (table[ids] + x) @ w
        assert y.shape == (b, s, n)
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
        assert np.all(y[0, 0] == 0.0)
        err = np.linalg.norm(y - exact) / max(np.linalg.norm(exact), 1e-30)
        assert err < 0.02, err  # 8-bit error level, not garbage
    with pytest.raises(ValueError, match="nothing to quantise"):
        quantize_per_token(helper.make_model(helper.make_graph(
            [helper.make_node("Relu", ["x"], ["y"])], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])]),
            opset_imports=[helper.make_opsetid("", OPSET)]))  # fmt: skip


def test_a_deployment_serves_over_http(trained, deployed):
    """``lrec-fast serve --deployment``: read-only (no /feedback, no /save), answers equal the
    deployment's own; new items from their text through the ONNX encoder."""
    import threading

    from lrec_fast.serve import make_server

    from .test_serve import call

    dep = load_deployment(deployed["int8"])
    server = make_server(dep, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        users = [trained.state.users.ids[0], trained.state.users.ids[3], "someone new"]
        status, got = call(url, "POST", "/recommend", {"users": users, "k": 5}, token=None)
        items, scores = dep.recommend(users, 5)
        assert status == 200 and got["items"] == items.tolist()
        np.testing.assert_array_equal(np.array(got["scores"], np.float32), scores)
        body = {"users": users[:1], "items": items[0, :2].tolist(), "ratings": [4.0, 3.0]}
        assert call(url, "POST", "/feedback", body, token=None)[0] == 404
        assert call(url, "POST", "/save", token=None)[0] == 404
        status, got = call(url, "POST", "/items", {"items": ["fresh"], "texts": ["A Film"]},
                           token=None)  # fmt: skip
        assert status == 200 and dep.n_items == trained.n_items + 1
        status, health = call(url, "GET", "/health", token=None)
        assert health["kind"] == "Deployment" and health["items"] == dep.n_items
    finally:
        server.shutdown()
        server.server_close()


def test_a_learning_server_exports_and_a_replica_reloads(trained, deployed, tmp_path):
    """The scale-out loop over HTTP: the learner learns, POST /export writes its deployment
    (the encoder reused from the one there), a read-only replica POST /reload's it and then
    answers as a fresh load of that directory does."""
    import threading

    from lrec_fast.serve import make_server

    from .test_serve import call

    trained.save(tmp_path / "ckpt")
    learner = Recommender.load(tmp_path / "ckpt")  # (the module's model stays as it is)
    shutil.copytree(deployed["int8"], tmp_path / "dep")
    servers = [make_server(learner, port=0, export_to=tmp_path / "dep"),
               make_server(load_deployment(tmp_path / "dep"), port=0)]  # fmt: skip
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    lurl, rurl = (f"http://127.0.0.1:{s.server_address[1]}" for s in servers)
    try:
        users = [learner.state.users.ids[j] for j in range(4)]
        before = call(rurl, "POST", "/recommend", {"users": users, "k": 5}, token=None)[1]
        items = learner.item_ids[:40]
        body = {"users": [users[0]] * 40, "items": items, "ratings": [5.0, 1.0] * 20}
        assert call(lurl, "POST", "/feedback", body, token=None)[0] == 200
        assert call(rurl, "POST", "/export", token=None)[0] == 404  # (a replica has no learner)
        status, got = call(lurl, "POST", "/export", {"precision": "int8"}, token=None)
        assert status == 200 and got["exported"] == str(tmp_path / "dep")
        status, got = call(rurl, "POST", "/reload", token=None)
        assert status == 200 and got["items"] == learner.n_items
        after = call(rurl, "POST", "/recommend", {"users": users, "k": 5}, token=None)[1]
        items, _ = load_deployment(tmp_path / "dep").recommend(users, 5)
        assert after["items"] == items.tolist() and after != before
        assert call(lurl, "POST", "/export", {"precision": "int4"}, token=None)[0] == 400
        assert call(lurl, "POST", "/reload", token=None)[0] == 404  # (the learner's is live)
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()
