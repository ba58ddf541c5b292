"""Built-in probes without a real model: exact bucketing and scoring on hand-made cases, token-exact
needle placement, haystacks that never hold the answer, determinism, clear errors, the probe runner
end to end (JSON, PNG, summary) with scripted models, W&B payloads and the HELMET launcher.

The helpers at the top (tiny BPE tokenizer, document/packed datasets) are shared with
tests/test_eval_models.py."""
from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from megalong.data.indexed import DatasetWriter
from megalong.data.tokenizer import load_tokenizer
from megalong.eval import recall as R
from megalong.eval.common import (EvalError, check_lengths, check_tokenizer, checkpoint_tokenizer_record,
                                  default_lengths, find_tokenizer_record, parse_depths, parse_lengths)
from megalong.eval.perplexity import PositionBuckets, default_bucket_size, evaluate_perplexity, target_positions
from megalong.eval.probes import parse_wandb_run, run_probes, wandb_payload
from megalong.eval.recall import Haystack, PromptBuilder, RecallConfig, exact_match, extract_answer, needle_offset

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the a of river stone light garden window quiet morning house old city walked slowly through green "
         "field under bright sky and then over hill past small village near water").split()
TEMPLATES = [R.NEEDLE_PREFIX, R.NEEDLE, R.NEEDLE_QUERY, R.JSONKV_PREFIX, R.JSONKV_PAIR, R.JSONKV_QUERY]


def word_docs(n: int, seed: int = 0, lo: int = 20, hi: int = 300) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(lo, hi)))) + "." for _ in range(n)]


def make_tokenizer(path: Path, vocab_size: int = 700, corpus=None):
    """A byte-level BPE that knows the probe templates (so they take few tokens, as in real vocabularies)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator((corpus or word_docs(60)) + TEMPLATES * 20, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    return load_tokenizer("hf", path / "tokenizer.json", backend="reference")


def write_documents(prefix: Path, tokenizer, texts: list[str], append_eod: bool = True) -> str:
    ids = [tokenizer.encode(t) + ([tokenizer.eod_id] if append_eod else []) for t in texts]
    with DatasetWriter(prefix, np.uint16) as w:
        if ids:
            w.add_documents(np.concatenate([np.asarray(x, np.int64) for x in ids]), [len(x) for x in ids])
        w.commit({"kind": "documents", "tokenizer": tokenizer.describe()})
    return str(prefix)


def write_packed(prefix: Path, tokenizer, samples: list[tuple[list[int], list[int], list[int]]], S: int) -> str:
    """samples: (tokens, segment lengths, target mask); the loss mask dataset is always written."""
    with DatasetWriter(prefix, np.uint16) as w, DatasetWriter(str(prefix) + "_loss", np.uint8) as lw:
        for tokens, lengths, mask in samples:
            w.add_document(np.asarray(tokens), lengths)
            lw.add_document(np.asarray(mask, np.uint8), lengths)
        lw.commit({"kind": "loss_mask"})
        w.commit({"kind": "packed", "seq_length": S, "num_samples": len(samples), "tokenizer": tokenizer.describe(),
                  "loss_mask": {"present": True, "dtype": "uint8"}})
    return str(prefix)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def docs(tok, tmp_path_factory):
    return write_documents(tmp_path_factory.mktemp("docs") / "docs", tok, word_docs(60))


# ---------------------------------------------------------------- parsing and checks


def test_lengths_depths_parse():
    assert parse_lengths("1K,2k, 4096,1K") == [1024, 2048, 4096]
    assert parse_lengths([128, "256"]) == [128, 256]
    assert parse_depths("1,0,0.5") == [0.0, 0.5, 1.0]
    assert default_lengths(131072) == [1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072]
    assert default_lengths(3000) == [1024, 2048, 3000] and default_lengths(512) == [512]
    for bad in ("12Q", "0", "1.5"):
        with pytest.raises(EvalError, match="length"):
            parse_lengths(bad)
    with pytest.raises(EvalError, match="between 0 and 1"):
        parse_depths("0.5,1.5")


def test_lengths_above_model_maximum_need_override():
    with pytest.raises(EvalError, match=r"exceed the model's maximum of 4096.*--max-length-override 8192"):
        check_lengths([1024, 8192], 4096, None, "needle probe")
    assert check_lengths([1024, 8192], 4096, 8192, "needle probe") == 8192
    with pytest.raises(EvalError, match="exceed --max-length-override 8192"):
        check_lengths([16384], 4096, 8192, "x")


# ---------------------------------------------------------------- perplexity bucketing


def test_positions_and_buckets_exact():
    # two documents of 3 and 5 tokens: entry t predicts token t+1; token 3 opens document 2
    pos = target_positions([3, 5], 8)
    assert pos.tolist() == [1, 2, 0, 1, 2, 3, 4]
    ce = np.array([1.0, 2.0, 99.0, 3.0, 4.0, 5.0, 6.0])
    b = PositionBuckets(bucket_size=2, length=8)
    b.add(ce, pos)
    rows = b.table()
    assert [(r["start"], r["end"], r["tokens"]) for r in rows] == [(0, 2, 2), (2, 4, 3), (4, 6, 1), (6, 8, 0)]
    assert rows[0]["mean_loss"] == (1.0 + 3.0) / 2  # positions 1 (both documents); position 0 never counts
    assert rows[1]["mean_loss"] == (2.0 + 4.0 + 5.0) / 3
    assert rows[2]["mean_loss"] == 6.0 and rows[3]["mean_loss"] is None
    assert rows[1]["ppl"] == pytest.approx(math.exp(11.0 / 3), rel=1e-15)
    assert b.overall() == (pytest.approx(21.0 / 6, rel=1e-15), 6)
    # weights 0 and NaN entries are skipped, counts accumulate across calls
    b.add(np.array([10.0, float("nan"), 0, 0, 0, 0, 0]), pos, np.array([1, 1, 0, 0, 0, 0, 0]))
    assert b.table()[0]["tokens"] == 3 and b.table()[0]["mean_loss"] == (1.0 + 3.0 + 10.0) / 3
    assert default_bucket_size(32768) == 1024 and default_bucket_size(131072) == 4096
    assert default_bucket_size(1024) == 32 and default_bucket_size(100) == 4


class ScriptedModel:
    """CE of entry t = 0.001 × (token id of t+1) + position of t+1 in its document (so every bucket
    mean is known exactly); for greedy generation it answers from `answer_fn(prompt)`."""

    name, max_length, vocab_size, tokenizer_record = "scripted", 4096, 1000, None

    def __init__(self, answer_fn=None, tokenizer=None):
        self.answer_fn, self.tok = answer_fn, tokenizer

    def token_losses(self, tokens, doc_lengths=None):
        rows = doc_lengths or [[tokens.shape[1]]] * tokens.shape[0]
        out = torch.empty(tokens.shape[0], tokens.shape[1] - 1)
        for r, lengths in enumerate(rows):
            pos = torch.from_numpy(target_positions(lengths, tokens.shape[1])).float()
            out[r] = 0.001 * tokens[r, 1:].float() + pos
            out[r, pos == 0] = float("nan")
        return out

    def greedy_generate(self, prompt_ids, max_new_tokens, vocab_limit=None):
        rows = []
        for p in prompt_ids.tolist():
            ids = self.tok.encode(self.answer_fn(self.tok.decode(p))) if self.answer_fn else []
            rows.append((ids + [self.tok.eod_id] * max_new_tokens)[:max_new_tokens])
        return torch.tensor(rows)

    def describe(self):
        return {"kind": "scripted", "name": self.name, "max_length": self.max_length, "rope_theta": None}


def test_perplexity_on_documents_selects_long_documents_and_truncates(tok, tmp_path):
    texts = word_docs(12, seed=3, lo=5, hi=120)
    prefix = write_documents(tmp_path / "d", tok, texts)
    lengths = [len(tok.encode(t)) + 1 for t in texts]
    L = 64
    res = evaluate_perplexity(ScriptedModel(), prefix, L, num_docs=50, seed=0, bucket_size=16, progress=False)
    chosen = res["data"]["indices"]
    assert chosen == [i for i, n in enumerate(lengths) if n >= L]
    sums, counts = np.zeros(4), np.zeros(4)
    for i in chosen:
        ids = (tok.encode(texts[i]) + [tok.eod_id])[:L]
        for p in range(1, L):
            sums[p // 16] += 0.001 * ids[p] + p
            counts[p // 16] += 1
    assert [b["tokens"] for b in res["buckets"]] == counts.tolist()
    np.testing.assert_allclose([b["mean_loss"] for b in res["buckets"]], sums / counts, rtol=1e-6)
    with pytest.raises(EvalError, match=r"no document has 4096 tokens \(the longest has \d+\); pass --ppl-length"):
        evaluate_perplexity(ScriptedModel(), prefix, 4096, progress=False)


def test_perplexity_on_packed_samples_respects_documents_and_mask(tok, tmp_path):
    S = 16
    samples = [(list(range(1, 17)), [5, 7, 4], [1] * 12 + [0] * 4),  # last segment: padding
               (list(range(20, 36)), [16], [1] * 16)]
    prefix = write_packed(tmp_path / "p", tok, samples, S)
    res = evaluate_perplexity(ScriptedModel(), prefix, S, num_docs=2, seed=0, bucket_size=4, progress=False)
    expected = {}
    for tokens, lengths, mask in samples:
        pos = target_positions(lengths, S)
        for t in range(S - 1):
            if pos[t] > 0 and mask[t + 1]:
                expected.setdefault(pos[t] // 4, []).append(0.001 * tokens[t + 1] + pos[t])
    for k, b in enumerate(res["buckets"]):
        assert b["tokens"] == len(expected[k])
        assert b["mean_loss"] == pytest.approx(np.mean(expected[k]), rel=1e-6)


# ---------------------------------------------------------------- scoring


def test_exact_match_scoring():
    assert extract_answer(" 123.") == "123" and exact_match(" 123.", "123")
    assert exact_match("\n  123\nmore", "123") and exact_match('"8f3a0c1d"}', "8f3a0c1d")
    assert not exact_match(" 1234", "123") and not exact_match(" 12", "123")
    assert not exact_match(" abc 123", "123") and not exact_match("", "123") and not exact_match("\n\n", "123")
    assert not exact_match(" 12 3", "123")


# ---------------------------------------------------------------- needle placement and haystacks


@pytest.mark.parametrize("length", [160, 512, 1000])
def test_needle_is_placed_at_the_stated_depth_and_never_split(tok, docs, length):
    cfg = RecallConfig(samples=2)
    pb = PromptBuilder(tok, cfg, Haystack(docs, tok, seed=0, min_tokens=2 * length))
    for depth in (0.0, 0.1, 1 / 3, 0.5, 0.9, 1.0):
        for i in range(cfg.samples):
            s = pb.needle(length, depth, i, seed=5)
            needle = tok.encode(R.NEEDLE.format(key=s.key, value=s.answer))
            assert len(s.prompt) == length - cfg.max_new_tokens
            assert s.needle_start == s.context_start + needle_offset(depth, s.context_tokens)
            assert s.needle_start == s.context_start + math.floor(depth * s.context_tokens + 0.5)
            assert s.prompt[s.needle_start:s.needle_start + len(needle)].tolist() == needle
            prefix = tok.encode(R.NEEDLE_PREFIX)
            query = tok.encode(R.NEEDLE_QUERY.format(key=s.key))
            assert s.prompt[:len(prefix)].tolist() == prefix and s.prompt[-len(query):].tolist() == query
            assert s.context_start == len(prefix)
            assert s.context_tokens + len(prefix) + len(needle) + len(query) == len(s.prompt)
            hay = np.concatenate([s.prompt[s.context_start:s.needle_start],
                                  s.prompt[s.needle_start + len(needle):len(s.prompt) - len(query)]])
            assert len(hay) == s.context_tokens and tok.eod_id not in hay.tolist()
            assert tok.decode(s.prompt.tolist()).count(s.answer) == 1
            assert s.answer not in tok.decode(hay.tolist()) and s.key not in tok.decode(hay.tolist())
    assert pb.needle(length, 0.0, 0, 5).needle_start == len(tok.encode(R.NEEDLE_PREFIX))


def test_haystack_never_contains_the_answer(tok, tmp_path):
    # Every window holds every digit but 9: the only acceptable one-digit value is 9.
    prefix = write_documents(tmp_path / "nums", tok, ["one 1 2 3 4 5 6 7 8 two"] * 3)
    L = 256
    hs = Haystack(prefix, tok, seed=0, min_tokens=2 * L)
    pb = PromptBuilder(tok, RecallConfig(samples=6, value_digits=1), hs)
    samples = pb.build("needle", [L], [0.0, 0.5, 1.0], seed=1)
    assert {s.answer for s in samples} == {"9"}
    for s in samples:
        assert tok.decode(s.prompt.tolist()).count("9") == 1
    full = write_documents(tmp_path / "all", tok, ["1 2 3 4 5 6 7 8 9"] * 3)
    pb = PromptBuilder(tok, RecallConfig(value_digits=1), Haystack(full, tok, seed=0, min_tokens=2 * L))
    with pytest.raises(EvalError, match="all occur in the haystack"):
        pb.needle(L, 0.5, 0, seed=1)


def test_probe_prompts_are_deterministic_per_cell(tok, docs):
    cfg = RecallConfig(samples=3)
    hs = Haystack(docs, tok, seed=4, min_tokens=2048)
    a = PromptBuilder(tok, cfg, hs).build("needle", [256, 512], [0.0, 0.5], seed=4)
    b = PromptBuilder(tok, cfg, Haystack(docs, tok, seed=4, min_tokens=2048)).build("needle", [512], [0.5, 1.0], seed=4)
    same = [s for s in a if s.length == 512 and s.depth == 0.5]
    assert [s.prompt.tolist() for s in same] == [s.prompt.tolist() for s in b if s.depth == 0.5]
    c = PromptBuilder(tok, cfg, hs).build("needle", [512], [0.5], seed=5)
    assert [s.answer for s in c] != [s.answer for s in same]
    j1 = PromptBuilder(tok, cfg).build("jsonkv", [400], [0.5], seed=4)
    j2 = PromptBuilder(tok, cfg).build("jsonkv", [400], [0.5], seed=4)
    assert [s.prompt.tolist() for s in j1] == [s.prompt.tolist() for s in j2]


def test_jsonkv_prompt_structure(tok):
    cfg = RecallConfig(samples=2)
    pb = PromptBuilder(tok, cfg)
    for depth in (0.0, 0.5, 1.0):
        s = pb.jsonkv(800, depth, 0, seed=0)
        text = tok.decode(s.prompt.tolist())
        assert len(s.prompt) <= 800 - cfg.max_new_tokens
        assert text.count(s.answer) == 1 and text.count(s.key) == 2
        obj = json.loads(text[text.index("{"):text.rindex("}") + 1])
        assert obj[s.key] == s.answer and len(obj) > 5
        pair = tok.encode(R.JSONKV_PAIR.format(key=s.key, value=s.answer))
        assert s.prompt[s.needle_start:s.needle_start + len(pair)].tolist() == pair
        keys = list(obj)
        assert abs(keys.index(s.key) / (len(keys) - 1) - depth) <= 1.5 / len(keys)
        assert text.endswith(R.JSONKV_QUERY.format(key=s.key))


def test_bad_haystacks_and_lengths(tok, tmp_path):
    empty = write_documents(tmp_path / "empty", tok, [])
    with pytest.raises(EvalError, match="haystack source .* is empty"):
        Haystack(empty, tok, 0, 100)
    only_eod = write_documents(tmp_path / "eod", tok, ["", ""])
    with pytest.raises(EvalError, match="no text tokens"):
        Haystack(only_eod, tok, 0, 100)
    with pytest.raises(EvalError, match="no dataset at"):
        Haystack(str(tmp_path / "missing"), tok, 0, 100)
    with pytest.raises(EvalError, match=r"template alone needs \d+ tokens"):
        PromptBuilder(tok, RecallConfig()).jsonkv(40, 0.5, 0, 0)
    with pytest.raises(EvalError, match="exceed the model's maximum of 4096"):
        R.evaluate_recall(ScriptedModel(), tok, "jsonkv", [8192], [0.5], progress=False)


def test_mismatched_tokenizer_is_refused(tok, docs, tmp_path):
    other = make_tokenizer(tmp_path / "other", vocab_size=400)
    assert "matches" in check_tokenizer(tok, tok.describe(), "x")
    with pytest.raises(EvalError, match=r"tokenizer mismatch: .*sha256.*vocab_size.*pass --tokenizer"):
        check_tokenizer(other, tok.describe(), f"haystack {docs}")
    model = ScriptedModel()
    model.vocab_size = 100
    with pytest.raises(EvalError, match=f"has {tok.vocab_size} tokens but model scripted only 100 embeddings"):
        run_probes(model, tok, docs, [256], [0.5], tmp_path / "o", probes=["jsonkv"], progress=False)
    model = ScriptedModel()
    model.tokenizer_record = other.describe()
    with pytest.raises(EvalError, match="tokenizer mismatch"):
        run_probes(model, tok, docs, [256], [0.5], tmp_path / "o", probes=["jsonkv"], progress=False)
    with pytest.raises(EvalError, match="tokenizer mismatch"):
        run_probes(ScriptedModel(), other, docs, [256], [0.5], tmp_path / "o", probes=["needle"], progress=False)
    assert find_tokenizer_record({"config": {"data": [{"tokenizer": tok.describe()}]}}) == tok.describe()
    # a trainer's checkpoint names its packed datasets; their meta records the tokenizer
    packed = write_packed(tmp_path / "packed", other, [(list(range(1, 9)), [8], [1] * 8)], 8)
    assert checkpoint_tokenizer_record({"config": {"data": {"datasets": [{"path": packed}]}}}) == other.describe()
    assert checkpoint_tokenizer_record({"config": {"data": {"datasets": [{"path": "/nowhere"}]}}}) is None


# ---------------------------------------------------------------- the runner with scripted models


def oracle(prompt: str) -> str:
    """Reads the answer out of the prompt, as a perfect long-context model would."""
    key = re.findall(r"number for (\w+)\?|Key: \"(\w+)\"", prompt)[-1]
    if key[0]:
        return " " + re.search(rf"number for {key[0]} is: (\d+)\.", prompt).group(1) + ".\n"
    return ' "' + re.search(rf'"{key[1]}": "(\w+)"', prompt).group(1) + '"'


def test_run_probes_writes_tables_and_figures(tok, docs, tmp_path, capsys):
    lengths, depths = [256, 512], [0.0, 0.5, 1.0]
    summary = run_probes(ScriptedModel(oracle, tok), tok, docs, lengths, depths, tmp_path / "good", seed=3,
                         ppl_length=256, num_docs=4, recall=RecallConfig(samples=2), progress=False)
    for probe in ("ppl", "needle", "jsonkv"):
        assert Path(summary[probe]["png"]).stat().st_size > 1000
        assert Path(summary[probe]["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["needle"]["mean_accuracy"] == 1.0 and summary["jsonkv"]["mean_accuracy"] == 1.0
    needle = json.loads(Path(summary["needle"]["json"]).read_text())
    assert needle["accuracy"] == [[1.0, 1.0]] * 3 and len(needle["samples"]) == 2 * 3 * 2
    assert summary["ppl"]["tokens"] == 4 * 255 and summary["pngs"] == [summary[p]["png"] for p in ("ppl", "needle", "jsonkv")]
    out = capsys.readouterr().out
    assert "needle exact match" in out and "2/2" in out and "loss in nats" in out
    bad = run_probes(ScriptedModel(lambda p: " 42", tok), tok, docs, lengths, depths, tmp_path / "bad", seed=3,
                     probes=["needle", "jsonkv"], recall=RecallConfig(samples=2), progress=False, verbose=False)
    assert bad["needle"]["mean_accuracy"] == 0.0 and bad["jsonkv"]["mean_accuracy"] == 0.0
    payload = wandb_payload(summary)
    assert payload["eval/needle/accuracy"] == 1.0 and payload["eval/jsonkv/accuracy@512"] == 1.0
    assert payload["eval/ppl/mean_loss"] == summary["ppl"]["mean_loss"]
    assert sum(k.startswith("eval/ppl/loss@") for k in payload) == 256 // default_bucket_size(256)


def test_log_to_wandb_resumes_the_run_and_logs_figures(tok, docs, tmp_path, monkeypatch):
    calls = {}

    class FakeRun:
        def log(self, payload):
            calls["log"] = payload

        def finish(self):
            calls["finished"] = True

    fake = type(sys)("wandb")
    fake.run = None
    fake.init = lambda **kw: calls.setdefault("init", kw) and FakeRun()
    fake.Image = lambda path: ("image", path)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    summary = run_probes(ScriptedModel(oracle, tok), tok, docs, [256], [0.5], tmp_path, probes=["needle"],
                         recall=RecallConfig(samples=1), progress=False, verbose=False, wandb_run="ent/proj/run1")
    assert calls["init"] == {"entity": "ent", "project": "proj", "id": "run1", "resume": "allow", "job_type": "eval"}
    assert calls["log"]["eval/needle/accuracy"] == 1.0 and calls["log"]["eval/needle/accuracy@256"] == 1.0
    assert calls["log"]["eval/needle/figure"] == ("image", summary["needle"]["png"]) and calls["finished"]


def test_wandb_run_spec():
    assert parse_wandb_run("ent/proj/abc") == {"entity": "ent", "project": "proj", "id": "abc"}
    assert parse_wandb_run("proj/abc") == {"project": "proj", "id": "abc"}
    with pytest.raises(EvalError, match="wandb-run"):
        parse_wandb_run("a/b/c/d")


def test_cli_help_explains_every_flag(capsys):
    from megalong.eval.__main__ import build_parser

    ap = build_parser()
    for cmd in ("ppl", "needle", "jsonkv", "all", "compare", "helmet"):
        with pytest.raises(SystemExit):
            ap.parse_args([cmd, "--help"])
        text = capsys.readouterr().out
        assert "--out" in text
    for action in ap._subparsers._group_actions[0].choices["all"]._actions:
        assert action.help, action.option_strings
