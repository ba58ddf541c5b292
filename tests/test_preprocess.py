"""Preprocessing: raw records → Megatron document datasets that megatron-core opens, equal to the
tokenizer's own encoding (+EOD), identical for any worker count; every bad record reported by line."""
from __future__ import annotations

import gzip
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm
import zstandard
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from megalong.data.indexed import (DatasetWriter, IncompleteDatasetError, is_complete, open_dataset,
                                   read_meta)
from megalong.data.preprocess import BadRecordError, PreprocessConfig, PreprocessError, preprocess

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("alpha beta gamma delta epsilon über café 日本 🚀 def return class import print if else "
         "for while {} [] () == += 0 1 42 3.14").split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    """Varied documents: prose, indented code, unicode, whitespace runs, some long."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        words = rng.choice(WORDS, size=int(rng.integers(1, 400 if i % 7 == 0 else 40)))
        text = " ".join(words)
        if i % 3 == 0:
            text = f"def f{i}(x):\n    if x:\n        return {i}\n\t\n" + text
        if i % 5 == 0:
            text += "   \n\n\n  trailing"
        docs.append(text)
    return docs


def train_tokenizers(root: Path) -> tuple[str, str]:
    corpus = make_docs(200, seed=1)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = root / "tokenizer.json"
    tok.save(str(hf))
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=model, vocab_size=400,
                                   model_type="bpe", byte_fallback=True, minloglevel=2)
    sp = root / "sp.model"
    sp.write_bytes(model.getvalue())
    return str(hf), str(sp)


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    return train_tokenizers(tmp_path_factory.mktemp("tok"))


def write_jsonl(path: Path, records, opener=open) -> Path:
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return path


def run(tmp_path, inputs, tok_path, prefix="out", kind="hf", **kw) -> list[dict]:
    cfg = PreprocessConfig(input=[str(i) for i in inputs], output_prefix=str(tmp_path / prefix),
                           tokenizer_model=tok_path, tokenizer_type=kind, progress=False,
                           chunk_bytes=kw.pop("chunk_bytes", 2048), **kw)
    return preprocess(cfg)


def documents(prefix) -> list[list[int]]:
    ds = open_dataset(prefix)  # megatron-core's IndexedDataset
    assert len(ds.document_indices) - 1 == len(ds)  # one sequence per document
    return [ds[i].tolist() for i in range(len(ds))]


def reference(kind: str, tok_path: str, texts, eod: int) -> list[list[int]]:
    if kind == "hf":
        t = Tokenizer.from_file(tok_path)
        return [t.encode(x, add_special_tokens=False).ids + [eod] for x in texts]
    sp = spm.SentencePieceProcessor(model_file=tok_path)
    return [sp.encode(x) + [eod] for x in texts]


def file_bytes(prefix) -> tuple[bytes, bytes]:
    return Path(f"{prefix}.bin").read_bytes(), Path(f"{prefix}.idx").read_bytes()


@pytest.mark.parametrize("kind", ["hf", "sentencepiece"])
def test_documents_equal_reference_for_any_worker_count(tmp_path, toks, kind):
    tok_path = toks[0] if kind == "hf" else toks[1]
    docs = make_docs(120)
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": d, "id": i} for i, d in enumerate(docs)])
    outputs = {}
    for workers in (1, 3):
        meta = run(tmp_path, [src], tok_path, prefix=f"w{workers}", kind=kind, workers=workers)[0]
        outputs[workers] = file_bytes(tmp_path / f"w{workers}_text_document")
    assert outputs[1] == outputs[3]  # identical bytes for any worker count
    eod = meta["tokenizer"]["eod_id"]
    assert documents(tmp_path / "w3_text_document") == reference(kind, tok_path, docs, eod)
    c = meta["counts"]
    assert (c["records"], c["documents"], c["skipped"]) == (120, 120, 0)
    assert c["tokens"] == sum(len(d) for d in reference(kind, tok_path, docs, eod))
    assert meta["kind"] == "documents" and meta["source_name"] == "in" and meta["dtype"] == "uint16"
    assert meta["inputs"] == [{"path": str(src), "bytes": src.stat().st_size}]
    assert meta["tokenizer"]["type"] == kind and meta["tool"]["version"]
    if kind == "hf":  # the gigatoken fast path was used and equals HF tokenizers
        assert meta["tokenizer_backend"].startswith("gigatoken")
        run(tmp_path, [src], tok_path, prefix="ref", tokenizer_backend="reference")
        assert file_bytes(tmp_path / "ref_text_document") == outputs[1]


def test_compressed_parquet_directory_and_glob_inputs(tmp_path, toks):
    docs = make_docs(60, seed=3)
    d = tmp_path / "data"
    d.mkdir()
    write_jsonl(d / "a.jsonl.gz", [{"text": x} for x in docs[:20]], opener=gzip.open)
    with open(d / "b.jsonl.zst", "wb") as raw, zstandard.ZstdCompressor().stream_writer(raw) as zf:
        zf.write("".join(json.dumps({"text": x}) + "\n" for x in docs[20:40]).encode())
    table = pa.table({"text": docs[40:], "other": list(range(20))})
    pq.write_table(table, d / "c.parquet", row_group_size=7)
    (d / "README.md").write_text("not an input")
    eod = 0
    expected = reference("hf", toks[0], docs, eod)
    run(tmp_path, [d], toks[0], prefix="dir", workers=2)
    assert documents(tmp_path / "dir_text_document") == expected
    metas = run(tmp_path, [str(d / "*.jsonl.*"), str(d / "*.parquet")], toks[0], prefix="glob")
    assert documents(tmp_path / "glob_text_document") == expected
    assert [i["path"] for i in metas[0]["inputs"]] == [str(d / n) for n in ("a.jsonl.gz", "b.jsonl.zst", "c.parquet")]
    assert metas[0]["source_name"] == "data"


def test_group_by_concatenates_repositories_in_path_order(tmp_path, toks):
    records = [
        {"repo": "r1", "path": "src/b.py", "text": "def b():\n    return 2\n"},
        {"repo": "r2", "path": "main.c", "text": "int main() { return 0; }"},
        {"repo": "r1", "path": "README.md", "text": "# r1 readme"},
        {"repo": "r1", "path": "src/a.py", "text": "def a():\n    return 1\n"},
        {"repo": "r2", "path": "util.h", "text": ""},  # empty: reported, not joined
        {"repo": "r3", "path": "x.py", "text": "x = 1"},
        {"path": "orphan.py", "text": "no repo"},  # missing group key: reported
    ]
    src = write_jsonl(tmp_path / "code.jsonl", records)
    meta = run(tmp_path, [src], toks[0], group_by="repo", sort_by="path", group_separator="\n<file>\n",
               workers=2)[0]
    joined = ["# r1 readme\n<file>\ndef a():\n    return 1\n\n<file>\ndef b():\n    return 2\n",
              "int main() { return 0; }", "x = 1"]
    assert documents(tmp_path / "out_text_document") == reference("hf", toks[0], joined, 0)
    assert meta["counts"]["documents"] == 3 and meta["counts"]["grouped_records"] == 5
    assert meta["skipped"]["empty_text"]["examples"] == [f"{src}:5: 'text' is an empty string"]
    assert meta["skipped"]["missing_key"]["examples"][0].startswith(f"{src}:7: key 'repo' is absent")
    assert meta["group_by"] == {"key": "repo", "sort_by": "path", "separator": "\n<file>\n"}


def bad_records_file(tmp_path) -> Path:
    path = tmp_path / "bad.jsonl"
    with open(path, "wb") as f:
        f.write(b'{"text": "good one"}\n')                # 1
        f.write(b'{"text": "broken\n')                    # 2 invalid_json
        f.write(b'\n')                                    # 3 blank line: not a record
        f.write(b'{"body": "no text key"}\n')             # 4 missing_key
        f.write(b'{"text": ["a", "list"]}\n')             # 5 non_string
        f.write(b'{"text": "caf\xe9 latin-1"}\n')         # 6 invalid_utf8 (bytes)
        f.write(b'{"text": ""}\n')                        # 7 empty_text
        f.write(b'{"text": "lone \\udc80 surrogate"}\n')  # 8 invalid_utf8 (escape)
        f.write(b'[1, 2]\n')                              # 9 invalid_json (not an object)
        f.write(b'{"text": null}\n')                      # 10 missing_key (null)
        f.write(b'{"text": "good two"}')                  # 11, no final newline
    return path


def test_bad_records_counted_with_their_lines(tmp_path, toks):
    path = bad_records_file(tmp_path)
    meta = run(tmp_path, [path], toks[0], workers=2, chunk_bytes=1024)[0]
    s = {r: e["examples"] for r, e in meta["skipped"].items()}
    assert [e.split(": ")[0] for e in s["invalid_json"]] == [f"{path}:2", f"{path}:9"]
    assert [e.split(": ")[0] for e in s["missing_key"]] == [f"{path}:4", f"{path}:10"]
    assert [e.split(": ")[0] for e in s["non_string"]] == [f"{path}:5"]
    assert [e.split(": ")[0] for e in s["invalid_utf8"]] == [f"{path}:6", f"{path}:8"]
    assert [e.split(": ")[0] for e in s["empty_text"]] == [f"{path}:7"]
    c = meta["counts"]
    assert (c["records"], c["documents"], c["skipped"], c["blank_lines"]) == (10, 2, 8, 1)
    assert documents(tmp_path / "out_text_document") == reference("hf", toks[0], ["good one", "good two"], 0)
    # Parquet rows: null, empty and non-UTF-8 binary values are reported by row
    pq.write_table(pa.table({"text": pa.array([b"ok", None, b"", b"\xff", b"fine"], pa.binary())}),
                   tmp_path / "t.parquet")
    meta = run(tmp_path, [tmp_path / "t.parquet"], toks[0], prefix="pq")[0]
    got = {r: [e.split(": ")[0] for e in v["examples"]] for r, v in meta["skipped"].items() if v["count"]}
    where = f"{tmp_path / 't.parquet'}:row"
    assert got == {"missing_key": [f"{where} 2"], "empty_text": [f"{where} 3"], "invalid_utf8": [f"{where} 4"]}
    assert documents(tmp_path / "pq_text_document") == reference("hf", toks[0], ["ok", "fine"], 0)


def test_text_without_tokens_is_reported(tmp_path, toks):
    """SentencePiece drops whitespace-only text entirely: a document of no tokens is skipped, by line."""
    src = write_jsonl(tmp_path / "ws.jsonl", [{"text": "hello"}, {"text": " \t\n "}, {"text": "world"}])
    meta = run(tmp_path, [src], toks[1], kind="sentencepiece", workers=2)[0]
    assert meta["skipped"]["empty_text"]["examples"] == [f"{src}:2: 'text' has no tokens (only characters "
                                                         "the tokenizer drops)"]
    assert documents(tmp_path / "out_text_document") == reference("sentencepiece", toks[1], ["hello", "world"],
                                                                  meta["tokenizer"]["eod_id"])


def test_strict_stops_at_first_bad_record(tmp_path, toks):
    path = bad_records_file(tmp_path)
    with pytest.raises(BadRecordError, match=rf"^{path}:2: invalid_json: "):
        run(tmp_path, [path], toks[0], strict=True, workers=2)
    assert not list(tmp_path.glob("out_*"))  # nothing written, no partial files left
    cli = subprocess.run([sys.executable, str(ROOT / "tools/preprocess_data.py"), "--input", str(path),
                          "--output-prefix", str(tmp_path / "cli"), "--tokenizer-model", toks[0],
                          "--strict", "--workers", "1"], capture_output=True, text=True)
    assert cli.returncode == 1
    errors = [line for line in cli.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {path}:2: invalid_json: Unterminated string starting at: line 1 column 10 "
                      "(char 9) (--strict stops at the first bad record)"]


def test_multiple_keys_stay_aligned_and_bos(tmp_path, toks):
    records = [{"q": "question one", "a": "answer one"}, {"q": "question two", "a": 7},
               {"q": "question three", "a": "answer three"}]
    src = write_jsonl(tmp_path / "qa.jsonl", records)
    metas = run(tmp_path, [src], toks[0], json_keys=["q", "a"], prepend_bos=True, bos_id=3)
    assert [m["json_key"] for m in metas] == ["q", "a"]
    for key in ("q", "a"):
        texts = [r[key] for r in (records[0], records[2])]
        expected = [[3] + d for d in reference("hf", toks[0], texts, 0)]
        assert documents(tmp_path / f"out_{key}_document") == expected
    assert metas[1]["skipped"]["non_string"]["count"] == 1


def test_atomic_outputs_and_overwrite(tmp_path, toks, monkeypatch):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": d} for d in make_docs(30)])
    prefix = tmp_path / "out_text_document"
    run(tmp_path, [src], toks[0])
    before = file_bytes(prefix)
    with pytest.raises(PreprocessError, match="--overwrite"):
        run(tmp_path, [src], toks[0])
    # a crash in the middle of an --overwrite run leaves the old dataset complete and no partials
    import megalong.data.preprocess as pre

    def crash(*_a, **_k):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(pre.DatasetWriter, "add_documents", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path, [src], toks[0], overwrite=True)
    monkeypatch.undo()
    assert is_complete(prefix) and file_bytes(prefix) == before
    assert sorted(p.name for p in tmp_path.glob("out_*")) == [
        "out_text_document.bin", "out_text_document.idx", "out_text_document.meta.json"]
    # a dataset without its meta (crash between renames) is incomplete for readers and is replaced
    Path(f"{prefix}.meta.json").unlink()
    with pytest.raises(IncompleteDatasetError, match="incomplete"):
        read_meta(prefix)
    run(tmp_path, [src], toks[0])
    assert read_meta(prefix)["files"]["bin"]["bytes"] == len(before[0])
    Path(f"{prefix}.bin").write_bytes(before[0][:-2])  # a truncated .bin no longer matches its meta
    with pytest.raises(IncompleteDatasetError, match="do not belong together"):
        read_meta(prefix)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_writer_bytes_equal_megatron_builder(tmp_path, dtype):
    """Our streaming writer produces exactly what megatron-core's IndexedDatasetBuilder writes."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 60000, size=int(n)).astype(dtype) for n in rng.integers(1, 50, size=40)]
    builder = IndexedDatasetBuilder(str(tmp_path / "mc.bin"), dtype=dtype)
    for d in docs[:30]:
        builder.add_item(torch.from_numpy(d.astype(np.int64)))
        builder.end_document()
    builder.add_document(torch.from_numpy(np.concatenate(docs[30:]).astype(np.int64)), [len(d) for d in docs[30:]])
    builder.finalize(str(tmp_path / "mc.idx"))
    with DatasetWriter(tmp_path / "ours", dtype) as w:
        w.add_documents(np.concatenate(docs[:10]), [len(d) for d in docs[:10]])
        w.add_documents(np.concatenate(docs[10:30]), [len(d) for d in docs[10:30]])
        w.add_document(np.concatenate(docs[30:]), [len(d) for d in docs[30:]])
        w.commit({"kind": "test"})
    assert file_bytes(tmp_path / "ours") == file_bytes(tmp_path / "mc")


def test_cli_megatron_command_line_and_help(tmp_path, toks):
    help_text = subprocess.run([sys.executable, str(ROOT / "tools/preprocess_data.py"), "--help"],
                               capture_output=True, text=True, check=True).stdout
    for flag in ("--input", "--output-prefix", "--json-keys", "--tokenizer-type", "--tokenizer-model",
                 "--append-eod", "--workers", "--partitions", "--log-interval", "--eod-id", "--bos-id",
                 "--prepend-bos", "--group-by", "--sort-by", "--group-separator", "--source-name",
                 "--strict", "--overwrite", "--tokenizer-backend"):
        assert flag in help_text
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": d} for d in make_docs(10)])
    cli = subprocess.run([sys.executable, str(ROOT / "tools/preprocess_data.py"), "--input", str(src),
                          "--output-prefix", str(tmp_path / "m"), "--tokenizer-type", "HuggingFaceTokenizer",
                          "--tokenizer-model", toks[0], "--append-eod", "--workers", "2", "--partitions", "1",
                          "--log-interval", "1000", "--json-keys", "text", "--source-name", "web"],
                         capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    assert "10 documents" in cli.stdout and "no bad records" in cli.stdout
    assert read_meta(tmp_path / "m_text_document")["source_name"] == "web"
    again = subprocess.run([sys.executable, str(ROOT / "tools/preprocess_data.py"), "--input", str(src),
                            "--output-prefix", str(tmp_path / "m"), "--tokenizer-model", toks[0]],
                           capture_output=True, text=True)
    assert again.returncode == 2 and "--overwrite" in again.stderr and "Traceback" not in again.stderr
