"""Preprocessing throughput: megalong's `tools/preprocess_data.py` against Megatron-LM's classic approach.

Corpus: ≥100 MB of real text assembled once from files on this machine (the Python standard library's
sources, plus the docs of installed packages) as JSONL records `{"text", "repo", "path"}`; tokenizer: a
byte-level BPE of 32K vocabulary trained here with HF `tokenizers` (both cached in --cache-dir).

Each configuration runs in a fresh process (cold caches, imports included in `wall`):
- `classic`: Megatron-LM's classic `tools/preprocess_data.py`, implemented faithfully below — a
  `multiprocessing.Pool(workers)` mapping `json.loads` + one HF `tokenizers` encode per document over
  the lines (`imap`, chunksize 32), EOD appended, `IndexedDatasetBuilder.add_item` per document.
- `megalong`: `tools/preprocess_data.py` (block work items, gigatoken when verified identical).
Both write the same documents: the benchmark checks their `.bin`/`.idx` are byte-identical.

    python benchmarks/preprocess.py --json-out /tmp/megalong_bench/preprocess.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STDLIB = Path(os.__file__).parent


# ----------------------------------------------------------------------------- corpus and tokenizer


def source_files() -> list[tuple[str, Path]]:
    """(repo, file) in a fixed order: installed packages' docs (prose), the standard library's sources,
    then installed packages' sources; a repo is a top-level package (or "stdlib")."""
    site = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    docs = sorted(p for ext in ("*.md", "*.rst", "*.txt") for p in site.rglob(ext))
    std = sorted(p for p in STDLIB.rglob("*.py") if "site-packages" not in p.relative_to(STDLIB).parts)
    pkgs = sorted(site.rglob("*.py"))
    repo = lambda p, root: p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else root.name
    return [(repo(p, site), p) for p in docs] + [(repo(p, STDLIB), p) for p in std] + [(repo(p, site), p) for p in pkgs]


def build_corpus(path: Path, target_mb: float) -> dict:
    if path.is_file() and Path(str(path) + ".done").is_file():
        return json.loads(Path(str(path) + ".done").read_text())
    tmp = Path(str(path) + ".partial")
    n_docs = n_bytes = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for repo, p in source_files():
            try:
                text = p.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if not text.strip():
                continue
            f.write(json.dumps({"text": text, "repo": repo, "path": str(p)}, ensure_ascii=False) + "\n")
            n_docs += 1
            n_bytes += len(text.encode("utf-8"))
            if n_bytes >= target_mb * 1e6:
                break
    os.replace(tmp, path)
    info = {"documents": n_docs, "text_bytes": n_bytes, "file_bytes": path.stat().st_size}
    Path(str(path) + ".done").write_text(json.dumps(info))
    return info


def train_tokenizer(path: Path, corpus: Path, vocab_size: int, sample_mb: float = 24) -> None:
    if path.is_file():
        return
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts, size = [], 0
    with open(corpus, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i % 4 == 0:  # a spread-out sample of the corpus
                texts.append(json.loads(line)["text"])
                size += len(texts[-1])
                if size > sample_mb * 1e6:
                    break
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.save(str(path) + ".partial")
    os.replace(str(path) + ".partial", path)


# ----------------------------------------------------------------------------- the classic baseline


class ClassicEncoder:
    """Megatron-LM's classic `Encoder`: the tokenizer built in each pool worker, one document per call."""

    def __init__(self, tokenizer_path: str, key: str = "text") -> None:
        self.tokenizer_path = tokenizer_path
        self.key = key

    def initializer(self) -> None:
        from tokenizers import Tokenizer

        ClassicEncoder.tokenizer = Tokenizer.from_file(self.tokenizer_path)
        ClassicEncoder.eod = ClassicEncoder.tokenizer.token_to_id("<|endoftext|>")

    def encode(self, json_line: str):
        data = json.loads(json_line)
        text = data[self.key]
        doc_ids = ClassicEncoder.tokenizer.encode(text, add_special_tokens=False).ids
        if len(doc_ids) > 0:
            doc_ids.append(ClassicEncoder.eod)
        return doc_ids, len(json_line)


def run_classic(corpus: str, tokenizer_path: str, output_prefix: str, workers: int) -> dict:
    """Megatron-LM's classic `process_json_file`, minus its argument plumbing; returns timings."""
    t_start = time.time()
    import multiprocessing

    import torch
    from megatron.core.datasets import indexed_dataset

    t_imports = time.time() - t_start
    t0 = time.time()
    encoder = ClassicEncoder(tokenizer_path)
    encoder.initializer()
    vocab_size = ClassicEncoder.tokenizer.get_vocab_size()
    pool = multiprocessing.Pool(workers, initializer=encoder.initializer)
    with open(corpus, "r", encoding="utf-8") as fin:
        encoded_docs = pool.imap(encoder.encode, fin, 32)
        builder = indexed_dataset.IndexedDatasetBuilder(
            output_prefix + ".bin", dtype=indexed_dataset.DType.optimal_dtype(vocab_size))
        docs = tokens = 0
        for doc, _bytes in encoded_docs:
            builder.add_item(torch.IntTensor(doc))
            builder.end_document()
            docs += 1
            tokens += len(doc)
        builder.finalize(output_prefix + ".idx")
    pool.close()
    pool.join()
    return {"imports_s": t_imports, "processing_s": time.time() - t0, "documents": docs, "tokens": tokens}


# ----------------------------------------------------------------------------- measuring


def measure(cmd: list[str]) -> tuple[float, float, str]:
    """Runs `cmd`; returns its wall seconds, CPU seconds (it and its workers) and stdout."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.time() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark step failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc.stdout


def bench_classic(corpus: Path, tok: Path, out: Path, workers: int) -> dict:
    cmd = [sys.executable, __file__, "--classic-run", str(corpus), str(tok), str(out), str(workers)]
    wall, cpu, stdout = measure(cmd)
    r = json.loads(stdout.strip().splitlines()[-1])
    return {"impl": "classic", "workers": workers, "wall_s": wall, "cpu_s": cpu, **r}


def bench_megalong(corpus: Path, tok: Path, out: Path, workers: int, backend: str) -> dict:
    cmd = [sys.executable, "tools/preprocess_data.py", "--input", str(corpus), "--output-prefix", str(out),
           "--tokenizer-model", str(tok), "--workers", str(workers), "--no-progress", "--overwrite",
           "--tokenizer-backend", backend]
    wall, cpu, _ = measure(cmd)
    meta = json.loads(Path(f"{out}_text_document.meta.json").read_text())
    name = "megalong" if backend == "auto" else f"megalong-{backend}"
    return {"impl": name, "workers": workers, "wall_s": wall, "cpu_s": cpu,
            "processing_s": meta["tool"]["elapsed_s"], "documents": meta["counts"]["documents"],
            "tokens": meta["counts"]["tokens"], "backend": meta["tokenizer_backend"]}


def same_files(a: str, b: str) -> bool:
    return all(Path(a + s).read_bytes() == Path(b + s).read_bytes() for s in (".bin", ".idx"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache-dir", default="/tmp/megalong_bench", help="corpus, tokenizer and outputs")
    p.add_argument("--corpus-mb", type=float, default=125, help="text megabytes in the corpus (default 125)")
    p.add_argument("--vocab-size", type=int, default=32768, help="BPE vocabulary trained (default 32768)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts (default 1 2)")
    p.add_argument("--skip-classic", action="store_true", help="run megalong only")
    p.add_argument("--with-reference", action="store_true",
                   help="also run megalong with --tokenizer-backend reference (HF tokenizers encode_batch)")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs of each megalong configuration, the fastest kept (default 3); the classic "
                        "baseline runs once (minutes long, so short noise averages out)")
    p.add_argument("--json-out", help="write the results as JSON here")
    p.add_argument("--classic-run", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.classic_run:
        corpus, tok, out, workers = args.classic_run
        print(json.dumps(run_classic(corpus, tok, out, int(workers))))
        return

    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    corpus = cache / f"corpus_{args.corpus_mb:g}mb.jsonl"
    t0 = time.time()
    info = build_corpus(corpus, args.corpus_mb)
    tok = cache / f"bpe_{args.vocab_size}.json"
    train_tokenizer(tok, corpus, args.vocab_size)
    print(f"corpus {corpus}: {info['documents']:,} documents, {info['text_bytes'] / 1e6:.1f} MB of text "
          f"({info['file_bytes'] / 1e6:.1f} MB JSONL); tokenizer {tok} (ready in {time.time() - t0:.0f} s)")

    load_before = os.getloadavg()
    rows = []
    for w in args.workers:
        plan = [] if args.skip_classic else [("classic", None)]
        plan += [("megalong", "auto")] + ([("megalong", "reference")] if args.with_reference else [])
        for impl, backend in plan:
            out = cache / f"out_{impl}_{backend or 'hf'}_w{w}"
            if impl == "classic":
                r = bench_classic(corpus, tok, out, w)
            else:
                runs = [bench_megalong(corpus, tok, out, w, backend) for _ in range(max(args.repeats, 1))]
                r = min(runs, key=lambda x: x["processing_s"])
                r["runs_processing_s"] = [x["processing_s"] for x in runs]
            r["tokens_per_s"] = r["tokens"] / r["processing_s"]
            r["tokens_per_s_per_core"] = r["tokens_per_s"] / w
            r["docs_per_s_per_core"] = r["documents"] / r["processing_s"] / w
            r["mb_per_s"] = info["text_bytes"] / 1e6 / r["processing_s"]
            r["tokens_per_cpu_s"] = r["tokens"] / r["cpu_s"]
            rows.append(r)
            print(f"  {r['impl']:<20} workers={w}: wall {r['wall_s']:.1f} s, processing {r['processing_s']:.1f} s",
                  flush=True)
    identical = None
    if not args.skip_classic:
        identical = all(same_files(str(cache / f"out_classic_hf_w{w}"), str(cache / f"out_megalong_auto_w{w}") +
                                   "_text_document") for w in args.workers)
    for r in rows:
        base = next((b for b in rows if b["impl"] == "classic" and b["workers"] == r["workers"]), None)
        r["speedup_vs_classic"] = r["tokens_per_s"] / base["tokens_per_s"] if base else None

    print(f"\n{'impl':<20}{'workers':>8}{'wall s':>9}{'proc s':>9}{'docs/s/core':>13}{'Mtok/s/core':>13}"
          f"{'MB/s':>8}{'Mtok/cpu-s':>12}{'vs classic':>12}")
    for r in rows:
        sp = f"{r['speedup_vs_classic']:.1f}x" if r["speedup_vs_classic"] else "-"
        print(f"{r['impl']:<20}{r['workers']:>8}{r['wall_s']:>9.1f}{r['processing_s']:>9.1f}"
              f"{r['docs_per_s_per_core']:>13,.0f}{r['tokens_per_s_per_core'] / 1e6:>13.2f}{r['mb_per_s']:>8.1f}"
              f"{r['tokens_per_cpu_s'] / 1e6:>12.2f}{sp:>12}")
    if identical is not None:
        print(f"classic and megalong outputs byte-identical: {identical}")
    print(f"load average (1 min) before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    result = {
        "benchmark": "preprocess", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "corpus": {"path": str(corpus), **info}, "tokenizer": {"path": str(tok), "vocab_size": args.vocab_size},
        "outputs_identical": identical, "rows": rows,
    }
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
