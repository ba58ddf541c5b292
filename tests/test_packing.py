"""Packing: best-fit-decreasing, recipe → packed dataset invariants, shares, determinism, errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from megalong.config import ConfigError, from_dict
from megalong.data.packed_dataset import DatasetError, PackedDataset
from megalong.data.packing import SourceDocs, achieved_shares, best_fit_decreasing, plan_packing
from megalong.data.recipe import Recipe, load_recipe, validate_recipe
from tests import datasets
from tests.datasets import load_tool

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = {"type": "hf", "path": "/x/tokenizer.json", "sha256": "ab", "vocab_size": 1 << 24,
             "eod_id": 0, "bos_id": None}


pack_tool = load_tool("pack_dataset")


def write_documents(prefix: Path, docs: list[np.ndarray], masks: list[np.ndarray] | None = None,
                    tokenizer: dict = TOKENIZER) -> None:
    datasets.write_documents(prefix, docs, masks, tokenizer=tokenizer)


def traceable_source(prefix: Path, lengths, start: int) -> list[np.ndarray]:
    """Documents whose tokens are consecutive unique ids, so every packed token can be traced back."""
    docs, nxt = [], start
    for n in lengths:
        docs.append(np.arange(nxt, nxt + n, dtype=np.int64))
        nxt += n + 7  # a gap: consecutive ids never cross a document boundary
    write_documents(prefix, docs)
    return docs


def write_recipe(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def naive_bfd_rooms(sizes, cap) -> list[int]:
    rooms: list[int] = []
    for s in sorted(sizes, reverse=True):
        fits = [b for b, r in enumerate(rooms) if r >= s]
        if fits:
            b = min(fits, key=lambda b: rooms[b])
        else:
            rooms.append(cap)
            b = len(rooms) - 1
        rooms[b] -= s
    return sorted(rooms)


def test_best_fit_decreasing_matches_reference():
    rng = np.random.default_rng(0)
    for t in range(150):
        cap = int(rng.integers(8, 400))
        sizes = rng.integers(1, cap + 1, int(rng.integers(1, 150)))
        if t % 3 == 0:  # many small, repeated sizes: the grouped path
            sizes = np.minimum(sizes, cap // 5 + 1)
        bins, nb = best_fit_decreasing(sizes, cap)
        fill = np.bincount(bins, weights=sizes, minlength=nb).astype(int)
        assert fill.max() <= cap and (fill > 0).all()
        assert sorted((cap - fill).tolist()) == naive_bfd_rooms(sizes.tolist(), cap)


def check_packed_invariants(prefix: Path, sources: dict[str, list[np.ndarray]], seq: int, meta: dict,
                            plan_lengths: dict[str, list[int]], min_chunk: int):
    ds = PackedDataset(str(prefix), seq_length=seq)
    seen = {}  # token id -> count
    padding = 0
    id_to_doc = {}
    for name, docs in sources.items():
        for j, d in enumerate(docs):
            id_to_doc[int(d[0])] = (name, j)
    starts = np.array(sorted(id_to_doc))
    for i in range(len(ds)):
        s = ds[i]
        assert len(s.tokens) == seq and int(s.doc_lengths.sum()) == seq
        bounds = np.concatenate([[0], np.cumsum(s.doc_lengths)])
        for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            seg, mask = s.tokens[a:b], s.target_mask[a:b]
            if k == len(s.doc_lengths) - 1 and (mask == 0).all():
                assert (seg == meta["pad_token_id"]).all()
                padding += b - a
                continue
            assert (mask == 1).all()
            assert (np.diff(seg) == 1).all(), "a segment is one contiguous piece of one document"
            name, j = id_to_doc[int(starts[np.searchsorted(starts, seg[0], side="right") - 1])]
            doc = sources[name][j]
            assert seg[-1] <= doc[-1], "a segment never crosses a document boundary"
            offset = int(seg[0] - doc[0])
            assert any(offset % L == 0 and len(seg) <= L for L in plan_lengths[name]), \
                "segments are whole documents or chunks of a plan's length"
            for t in seg.tolist():
                seen[t] = seen.get(t, 0) + 1
    assert max(seen.values()) == 1, "every input token appears at most once"
    assert padding == meta["tokens"]["padding_tokens"]
    # every selected document (its first token is always packed) is fully present, except a short
    # tail counted as truncated
    truncated = 0
    for name, docs in sources.items():
        for d in docs:
            if int(d[0]) not in seen:
                continue
            missing = [int(t) for t in d if int(t) not in seen]
            if missing:
                assert missing == list(range(missing[0], int(d[-1]) + 1)), "only a document's tail is cut"
                assert len(missing) < min_chunk
                truncated += len(missing)
    assert truncated == meta["tokens"]["truncated_tokens"]
    return ds


def test_pack_tool_invariants_and_lengths(tmp_path):
    rng = np.random.default_rng(1)
    data = tmp_path / "docs"
    data.mkdir()
    sources = {
        "long": traceable_source(data / "long", rng.integers(300, 3000, 60), 1_000),
        "short": traceable_source(data / "short", rng.integers(1, 200, 400), 10_000_000),
    }
    recipe = write_recipe(tmp_path / "r.yaml", {
        "stage": "t", "seq_length": 1024, "seed": 5, "packing": {"min_chunk_length": 40},
        "sources": [{"name": "long", "path": "long", "share": 0.7,
                     "lengths": [{"length": 1024, "share": 0.5}, {"length": 256, "share": 0.5}]},
                    {"name": "short", "path": "short", "share": 0.3}]})
    meta = pack_tool.run_pack(str(recipe), str(tmp_path / "out" / "p"), str(data), show_progress=False)
    assert (tmp_path / "out" / "p.stats.png").stat().st_size > 1000
    ds = check_packed_invariants(tmp_path / "out" / "p", sources, 1024, meta,
                                 {"long": [1024, 256], "short": [1024]}, 40)
    assert len(ds) == meta["num_samples"] == meta["tokens"]["samples"]
    long_meta = meta["sources"][0]
    assert long_meta["lengths"][0]["length"] == 1024 and long_meta["lengths"][1]["length"] == 256
    assert abs(long_meta["lengths"][1]["achieved_share"] - 0.5) < 0.1
    for s in meta["sources"]:
        assert set(s["input"]) >= {"idx_sha256", "bin_bytes"}
    assert meta["loss_mask"] == {"present": True, "dtype": "uint8"}
    # the 256-plan pieces are at most 256 long: count segments > 256 from the long source
    assert sum(s["tokens"] for s in meta["sources"]) == meta["tokens"]["tokens"]


def test_same_seed_same_bytes_and_other_seed_differs(tmp_path):
    rng = np.random.default_rng(2)
    data = tmp_path / "docs"
    data.mkdir()
    traceable_source(data / "a", rng.integers(1, 900, 200), 5)
    traceable_source(data / "b", rng.integers(1, 90, 800), 9_000_000)
    recipe = write_recipe(tmp_path / "r.yaml", {
        "stage": "t", "seq_length": 512, "seed": 11,
        "sources": [{"name": "a", "path": "a", "share": 0.5}, {"name": "b", "path": "b", "share": 0.5}]})
    outs = []
    for run, seed in enumerate([11, 11, 12]):
        prefix = tmp_path / f"out{run}" / "p"
        pack_tool.run_pack(str(recipe), str(prefix), str(data), overrides=[f"seed={seed}"], plot=False,
                           show_progress=False)
        outs.append({ext: (Path(str(prefix) + ext)).read_bytes()
                     for ext in (".bin", ".idx", "_loss.bin", "_loss.idx", ".meta.json")})
    assert outs[0] == outs[1]
    assert outs[0][".bin"] != outs[2][".bin"]


def test_shares_within_one_percent_on_a_large_set():
    rng = np.random.default_rng(3)
    recipe = from_dict(Recipe, {
        "stage": "t", "seq_length": 65536, "total_tokens": 300_000_000, "seed": 1,
        "sources": [{"name": "books", "path": "-", "share": 0.3,
                     "lengths": [{"length": 65536, "share": 0.2}, {"length": 8192, "share": 0.8}]},
                    {"name": "code", "path": "-", "share": 0.3},
                    {"name": "web", "path": "-", "share": 0.37},
                    {"name": "tiny", "path": "-", "share": 0.03}]})
    sources = [SourceDocs("books", rng.lognormal(11, 0.8, 2000).astype(np.int64) + 1),
               SourceDocs("code", rng.lognormal(10, 1.4, 8000).astype(np.int64) + 1),
               SourceDocs("web", rng.lognormal(6.5, 1.0, 300_000).astype(np.int64) + 1),
               SourceDocs("tiny", rng.lognormal(7, 1.0, 20_000).astype(np.int64) + 1)]
    plan = plan_packing(recipe, sources)
    for share, cfg in zip(achieved_shares(plan), recipe.sources):
        assert abs(share - cfg.share) < 0.01
    books = plan.sources[0]
    assert abs(books.plans[0].tokens / books.tokens - 0.2) < 0.01
    assert plan.piece_length[plan.piece_source == 0].max() <= 65536
    # the 8K plan holds the books that the 64K plan (longest first) did not take, chunked to 8K
    assert (plan.sample_fill() <= 65536).all()
    assert plan.totals()["padding_fraction"] < 0.005


def test_sft_source_truncate_left_and_drop(tmp_path):
    data = tmp_path / "docs"
    data.mkdir()
    docs = [np.arange(1000 * (i + 1), 1000 * (i + 1) + n) for i, n in enumerate([50, 300, 80, 20])]
    masks = [(np.arange(len(d)) % 2).astype(np.uint8) for d in docs]
    write_documents(data / "chat", docs, masks)
    base = {"stage": "sft", "seq_length": 128, "seed": 0,
            "sources": [{"name": "chat", "path": "chat", "share": 1.0}]}
    meta = pack_tool.run_pack(str(write_recipe(tmp_path / "a.yaml", base)), str(tmp_path / "a"), str(data),
                              plot=False, show_progress=False)
    assert meta["sources"][0]["truncated_tokens"] == 300 - 128  # auto = truncate_left for SFT sources
    ds = PackedDataset(str(tmp_path / "a"))
    segs = {}
    for i in range(len(ds)):
        s = ds[i]
        b = np.concatenate([[0], np.cumsum(s.doc_lengths)])
        for x, y in zip(b[:-1], b[1:]):
            segs[int(s.tokens[x])] = (s.tokens[x:y], s.target_mask[x:y])
    tokens, mask = segs[2000 + 300 - 128]  # the last 128 tokens of the long conversation
    assert np.array_equal(tokens, docs[1][-128:]) and np.array_equal(mask, masks[1][-128:])
    assert np.array_equal(segs[1000][1], masks[0])
    base["sources"][0]["overlong"] = "drop"
    meta = pack_tool.run_pack(str(write_recipe(tmp_path / "b.yaml", base)), str(tmp_path / "b"), str(data),
                              plot=False, show_progress=False)
    src = meta["sources"][0]
    assert (src["dropped_documents"], src["dropped_tokens"], src["tokens"]) == (1, 300, 150)


def recipe_error(tmp_path, data, recipe: dict, *match, data_root=None):
    path = write_recipe(tmp_path / "bad.yaml", recipe)
    with pytest.raises(ConfigError) as e:
        pack_tool.run_pack(str(path), str(tmp_path / "o"), str(data_root or data), plot=False,
                           show_progress=False, dry_run=True)
    msg = str(e.value)
    assert str(path) in msg, msg
    for m in match:
        assert m in msg, msg
    return msg


def test_recipe_errors_name_file_and_key(tmp_path, capsys):
    data = tmp_path / "docs"
    data.mkdir()
    traceable_source(data / "a", [10, 20, 30], 0)
    write_documents(data / "other_tok", [np.arange(5)], tokenizer={**TOKENIZER, "sha256": "cd"})
    ok = {"name": "a", "path": "a", "share": 1.0}
    recipe_error(tmp_path, data, {"stage": "t", "seq_length": 64, "sources": [
        {**ok, "share": 0.6}, {"name": "b", "path": "a", "share": 0.3}]}, "sources[*].share", "sum to 1")
    recipe_error(tmp_path, data, {"stage": "t", "seq_length": 64, "sources": [{**ok, "path": "nope"}]},
                 "sources[0].path", "nope.bin")
    recipe_error(tmp_path, data, {"stage": "t", "seq_length": 64, "sources": [
        {**ok, "share": 0.5}, {"name": "o", "path": "other_tok", "share": 0.5}]}, "sources[1]", "sha256")
    recipe_error(tmp_path, data, {"stage": "t", "seq_length": 64, "sources": [
        {**ok, "lengths": [{"length": 128}]}]}, "sources[0].lengths[0].length")
    recipe_error(tmp_path, data, {"stage": "t", "seq_length": 64, "sources": [
        {**ok, "lengths": [{"length": 64, "share": 0.5}, {"length": 32, "share": 0.4}]}]},
        "sources[0].lengths[*].share")
    recipe_error(tmp_path, data, {"stage": "t", "seq_length": 64, "sources": [ok, ok]}, "sources[1].name")
    recipe_error(tmp_path, data, {"stage": "t", "seq_length": 64, "sourcs": [ok]}, "sourcs", "sources")
    recipe_error(tmp_path, data, {"stage": "t", "seq_length": 64, "total_tokens": 1000, "sources": [ok]},
                 "sources[0].share", "allow_repeat")
    recipe_error(tmp_path, data, {"stage": "t", "seq_length": 64, "total_tokens": 5, "num_samples": 1,
                                  "sources": [ok]}, "num_samples")
    recipe_error(tmp_path, data, {"stage": "t", "seq_length": 64, "sources": [{**ok, "share": 0}]},
                 "sources[0].share")
    (data / "nometa.bin").write_bytes(b"")
    (data / "nometa.idx").write_bytes(b"")
    recipe_error(tmp_path, data, {"stage": "t", "seq_length": 64, "sources": [{**ok, "path": "nometa"}]},
                 "sources[0].path", "nometa.meta.json")
    # the CLI reports the error in one line and exits 2
    bad = write_recipe(tmp_path / "cli.yaml", {"stage": "t", "seq_length": 64, "sources": [{**ok, "share": 2}]})
    assert pack_tool.main([str(bad), "--dry-run", "--data-root", str(data), "--quiet"]) == 2
    assert "must sum to 1" in capsys.readouterr().err


def test_allow_repeat_counts_epochs(tmp_path):
    data = tmp_path / "docs"
    data.mkdir()
    traceable_source(data / "a", [40] * 10, 0)
    recipe = write_recipe(tmp_path / "r.yaml", {"stage": "t", "seq_length": 80, "total_tokens": 1000,
                                                "packing": {"allow_repeat": True},
                                                "sources": [{"name": "a", "path": "a", "share": 1.0}]})
    meta = pack_tool.run_pack(str(recipe), str(tmp_path / "p"), str(data), plot=False, show_progress=False)
    assert meta["sources"][0]["tokens"] == 1000 and meta["sources"][0]["epochs"] == 2.5
    assert meta["num_samples"] == 13 and meta["tokens"]["padding_tokens"] == 13 * 80 - 1000


def test_num_samples_and_tiny_stage2_recipe(tmp_path, capsys):
    rng = np.random.default_rng(4)
    data = tmp_path / "docs"
    data.mkdir()
    tok = {**TOKENIZER, "vocab_size": 1000}
    for name, lo, hi, n in (("long_docs", 3000, 20000, 60), ("medium_docs", 300, 3000, 80),
                            ("short_docs", 5, 400, 1500)):
        write_documents(data / name, [rng.integers(1, 1000, int(k)) for k in rng.integers(lo, hi, n)],
                        tokenizer=tok)
    recipe = ROOT / "examples" / "data" / "tiny_stage2.yaml"
    out = tmp_path / "stage2"
    assert pack_tool.main([str(recipe), "-o", str(out), "--data-root", str(data), "--no-plot", "--quiet",
                           "--set", "total_tokens=null", "--set", "num_samples=60"]) == 0
    assert "waste" in capsys.readouterr().out
    meta = json.loads(Path(str(out) + ".meta.json").read_text())
    assert meta["seq_length"] == 4096 and meta["token_dtype"] == "uint16"
    assert abs(meta["tokens"]["tokens"] - 60 * 4096) < 20000  # num_samples sets the token budget
    long_plans = meta["sources"][0]["lengths"]
    assert [p["length"] for p in long_plans] == [4096, 1024]
    ds = PackedDataset(str(out), seq_length=4096)
    lengths = np.concatenate([ds[i].doc_lengths[:-1] if ds[i].target_mask[-1] == 0 else ds[i].doc_lengths
                              for i in range(len(ds))])
    assert lengths.max() == 4096 and (lengths == 1024).sum() > 0  # 4K chunks and 1K chunks
    for flag in ([], ["--help"]):
        with pytest.raises(SystemExit):
            pack_tool.main(flag)


def test_reader_errors(tmp_path):
    data = tmp_path / "docs"
    data.mkdir()
    traceable_source(data / "a", [30, 40], 0)
    with pytest.raises(DatasetError, match="expected 'packed'"):
        PackedDataset(str(data / "a"))
    recipe = write_recipe(tmp_path / "r.yaml", {"stage": "t", "seq_length": 64,
                                                "sources": [{"name": "a", "path": "a", "share": 1.0}]})
    pack_tool.run_pack(str(recipe), str(tmp_path / "p"), str(data), plot=False, show_progress=False)
    with pytest.raises(DatasetError, match="seq_length 64"):
        PackedDataset(str(tmp_path / "p"), seq_length=128)
    (tmp_path / "p.meta.json").unlink()
    with pytest.raises(DatasetError, match="incomplete"):
        PackedDataset(str(tmp_path / "p"))
    with pytest.raises(DatasetError, match="no dataset"):
        PackedDataset(str(tmp_path / "missing"))


def test_example_recipes_are_valid():
    files = sorted((ROOT / "examples" / "data").glob("*.yaml"))
    assert {f.name for f in files} >= {"prolong_stage1_64k.yaml", "prolong_stage2_512k.yaml",
                                       "prolong_sft_64k.yaml", "tiny_stage1.yaml", "tiny_stage2.yaml"}
    for f in files:
        validate_recipe(load_recipe(f), str(f))
    s2 = load_recipe(ROOT / "examples" / "data" / "prolong_stage2_512k.yaml")
    code = s2.sources[0]
    assert s2.seq_length == 524288 and [p.length for p in code.lengths] == [524288, 65536]
    assert json.loads(json.dumps(pack_tool.TOOL_VERSION))
