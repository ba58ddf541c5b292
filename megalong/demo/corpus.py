"""A small real corpus assembled from files every Python installation has (PSF-licensed).

ProLong's mixture, scaled down:
- code repositories: each standard-library package (json, email, asyncio, …) is one "repository";
  its files become records {"repo", "path", "text"} that preprocessing concatenates per repository;
- books: the longest topics of the Python language reference (`pydoc_data.topics`);
- textbooks: the medium-length reference topics;
- short mix: docstrings of standard-library modules, classes and functions;
- SFT chat: questions about reference topics answered with the topic's first paragraphs.
"""
from __future__ import annotations

import importlib
import inspect
import json
import sysconfig
from pathlib import Path

CODE_PACKAGES = ["json", "email", "http", "urllib", "xml", "asyncio", "concurrent", "importlib", "logging",
                 "unittest", "sqlite3", "html", "collections", "dbm", "wsgiref", "zoneinfo", "tomllib",
                 "xmlrpc", "ctypes", "multiprocessing", "encodings", "lib2to3", "pydoc_data", "re"]
SHORT_MODULES = ["os", "sys", "re", "json", "math", "random", "string", "textwrap", "itertools", "functools",
                 "collections", "datetime", "pathlib", "shutil", "subprocess", "argparse", "logging",
                 "heapq", "bisect", "statistics", "fractions", "decimal", "csv", "hashlib", "base64",
                 "struct", "typing", "dataclasses", "enum", "contextlib", "abc", "io", "time", "calendar"]


def _write_jsonl(path: Path, records) -> int:
    n = 0
    with path.open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
            n += 1
    return n


def code_records(max_files_per_repo: int = 20, max_file_bytes: int = 60_000):
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for pkg in CODE_PACKAGES:
        root = stdlib / pkg
        if not root.is_dir():
            continue
        files = sorted(p for p in root.rglob("*.py") if "test" not in p.parts and p.stat().st_size < max_file_bytes)
        for p in files[:max_files_per_repo]:
            text = p.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                yield {"repo": pkg, "path": str(p.relative_to(stdlib)), "text": text}


def reference_topics() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    return sorted(((k, v) for k, v in topics.items() if v.strip()), key=lambda kv: -len(kv[1]))


def docstring_records(min_chars: int = 80):
    seen = set()
    for name in SHORT_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        for obj_name, obj in [(name, mod)] + sorted(vars(mod).items()):
            doc = inspect.getdoc(obj) if (inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isroutine(obj)) else None
            if doc and len(doc) >= min_chars and doc not in seen:
                seen.add(doc)
                yield {"text": doc}


def chat_records(topics: list[tuple[str, str]]):
    for name, text in topics:
        paras = [p.strip() for p in text.split("\n\n") if p.strip()]
        if len(paras) < 2:
            continue
        title = paras[0].splitlines()[0].strip()
        answer = "\n\n".join(paras[1:3])
        yield {"messages": [{"role": "user", "content": f"Explain '{title}' in Python ({name})."},
                            {"role": "assistant", "content": answer}]}


def build_corpus(out_dir: str | Path) -> dict[str, dict]:
    """Writes the demo's JSONL sources into out_dir; returns {source: {"path", "records"}}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    topics = reference_topics()
    long_cut = max(1, len(topics) // 4)
    sources = {
        "code_repos": code_records(),
        "books": ({"text": t} for _, t in topics[:long_cut]),
        "textbooks": ({"text": t} for _, t in topics[long_cut:2 * long_cut]),
        "short_mix": docstring_records(),
        "chat": chat_records(topics),
    }
    return {name: {"path": str(out / f"{name}.jsonl"), "records": _write_jsonl(out / f"{name}.jsonl", recs)}
            for name, recs in sources.items()}


LLAMA3_SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                         "<|eot_id|>"]


def train_tokenizer(jsonl_paths, out_path: str | Path, vocab_size: int = 4096) -> Path:
    """A byte-level BPE tokenizer (HF `tokenizers`) with Llama-3's special tokens, trained on the corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    def texts():
        for p in jsonl_paths:
            with open(p) as f:
                for line in f:
                    rec = json.loads(line)
                    if "text" in rec:
                        yield rec["text"]
                    else:
                        for m in rec.get("messages", []):
                            yield m["content"]

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=LLAMA3_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts(), trainer=trainer)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_path))
    return out_path
