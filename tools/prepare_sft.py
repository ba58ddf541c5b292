#!/usr/bin/env python
r"""SFT conversations (JSONL / Parquet `{"messages": [...]}`) → an SFT document dataset with a loss mask.

    python tools/prepare_sft.py --input ultrachat_200k/train_sft.jsonl --output-prefix data/docs/ultrachat \
        --tokenizer-model /models/Meta-Llama-3-8B-Instruct --template llama3 --max-length 64K

Writes {PREFIX}.bin/.idx/.meta.json (kind "documents": one document per conversation) and
{PREFIX}_loss.bin/.idx (uint8, 1 on assistant tokens incl. their end-of-turn token). Pack it for
training with tools/pack_dataset.py and a recipe such as examples/data/prolong_sft_64k.yaml (packed
examples are kept whole, one segment each), or train on it unpacked with sorted batching
(DataConfig.sorted_batching). Bad records are skipped, counted by reason and reported with file:line.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

import megalong  # noqa: E402
from megalong.config import ConfigError, parse_int  # noqa: E402
from megalong.data.indexed import META_SUFFIX, DatasetWriter, is_complete, token_dtype  # noqa: E402
from megalong.data.packing import LOSS_SUFFIX  # noqa: E402
from megalong.data.readers import InputError, default_source_name, expand_inputs, iter_blocks  # noqa: E402
from megalong.data.sft import REASONS, BadRecord, SFTFormatter  # noqa: E402
from megalong.data.tokenizer import TokenizerError, load_tokenizer  # noqa: E402

EXAMPLES_PER_REASON = 5


@dataclass
class Result:
    tokens: np.ndarray
    masks: np.ndarray
    lengths: np.ndarray
    bad: list[tuple[str, str, str]] = field(default_factory=list)  # (reason, location, detail)
    records: int = 0
    truncated_examples: int = 0
    truncated_tokens: int = 0
    raw_bytes: int = 0  # input bytes this block accounts for (progress)


_FORMATTER: SFTFormatter | None = None


def _init(args: argparse.Namespace) -> None:
    global _FORMATTER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tok = load_tokenizer(args.tokenizer_type, args.tokenizer_model, args.eod_id, args.bos_id,
                         args.tokenizer_backend)
    model = Path(args.tokenizer_model)
    template_dir = args.chat_template_dir or str(model if model.is_dir() else model.parent)
    _FORMATTER = SFTFormatter(tok, args.template, template_dir, args.max_length, args.overflow)


def parse_records(block, path: str) -> tuple[list, list[str], list[tuple[str, str, str]], int]:
    """A block of lines / Parquet rows → (records, their locations, invalid-JSON entries, count)."""
    import json

    records, where, bad = [], [], []
    if block.columns is not None:
        rows = block.columns["messages"].to_pylist()
        for i, messages in enumerate(rows):
            records.append({"messages": messages})
            where.append(f"{path}:row {block.first_line + i}")
        return records, where, bad, len(rows)
    count = 0
    for i, raw in enumerate((block.data or b"").split(b"\n")):
        if not raw.strip():
            continue
        count += 1
        loc = f"{path}:{block.first_line + i}"
        try:
            records.append(json.loads(raw.decode("utf-8")))
            where.append(loc)
        except (UnicodeDecodeError, ValueError) as e:
            bad.append(("invalid_json", loc, str(BadRecord("invalid_json", str(e)[:120]))))
    return records, where, bad, count


def format_block(item: tuple) -> Result:
    block, path = item
    records, where, bad, count = parse_records(block, path)
    toks, masks, lengths = [], [], []
    res = Result(np.zeros(0, np.int64), np.zeros(0, np.uint8), np.zeros(0, np.int64), bad, count,
                 raw_bytes=block.raw_bytes)
    for loc, out in zip(where, _FORMATTER.format_batch(records)):
        if isinstance(out, BadRecord):
            res.bad.append((out.reason, loc, str(out)))
            continue
        toks.append(out.tokens)
        masks.append(out.target_mask)
        lengths.append(len(out.tokens))
        res.truncated_examples += out.truncated_tokens > 0
        res.truncated_tokens += out.truncated_tokens
    if toks:
        res.tokens, res.masks = np.concatenate(toks), np.concatenate(masks)
        res.lengths = np.asarray(lengths, np.int64)
    return res


def _results(items, args: argparse.Namespace):
    if args.workers <= 1:
        yield from map(format_block, items)
        return
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with mp.get_context(method).Pool(args.workers, initializer=_init, initargs=(args,)) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.apply_async(format_block, (item,)))
            if len(pending) >= 2 * args.workers + 2:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def prepare(args: argparse.Namespace) -> dict:
    """Runs the conversion; returns the meta written."""
    from tqdm import tqdm

    files = expand_inputs(args.input)
    _init(args)  # here first: a bad tokenizer or template fails once, not in every worker
    tok = _FORMATTER.tokenizer
    if is_complete(args.output_prefix) and not args.overwrite:
        raise ConfigError(f"{args.output_prefix}.bin/.idx/.meta.json already exist; pass --overwrite")
    dtype = token_dtype(tok.vocab_size)
    skipped = {r: {"count": 0, "examples": []} for r in REASONS}
    counts = {"records": 0, "documents": 0, "tokens": 0, "target_tokens": 0, "truncated_examples": 0,
              "truncated_tokens": 0}
    items = ((block, f.path) for i, f in enumerate(files)
             for block in iter_blocks(i, f, 1 << 20, ["messages"]))
    with DatasetWriter(args.output_prefix, dtype) as tok_out, \
            DatasetWriter(args.output_prefix + LOSS_SUFFIX, np.uint8) as mask_out:
        bar = tqdm(total=sum(f.size for f in files), unit="B", unit_scale=True, desc="formatting",
                   disable=args.no_progress)
        for res in _results(items, args):
            for reason, loc, detail in res.bad:
                if args.strict:
                    raise ConfigError(f"{loc}: bad record: {detail} (drop --strict to skip and count these)")
                skipped[reason]["count"] += 1
                if len(skipped[reason]["examples"]) < EXAMPLES_PER_REASON:
                    skipped[reason]["examples"].append(f"{loc}: {detail}")
            if len(res.lengths):
                tok_out.add_documents(res.tokens.astype(dtype), res.lengths)
                mask_out.add_documents(res.masks, res.lengths)
            counts["records"] += res.records
            counts["documents"] += len(res.lengths)
            counts["tokens"] += int(res.lengths.sum())
            counts["target_tokens"] += int(res.masks.sum())
            counts["truncated_examples"] += res.truncated_examples
            counts["truncated_tokens"] += res.truncated_tokens
            bar.update(res.raw_bytes)
        bar.close()
        if counts["documents"] == 0:
            raise ConfigError(f"no usable conversation in {' '.join(args.input)}: "
                              + "; ".join(f"{r}: {v['count']}" for r, v in skipped.items() if v["count"]))
        counts["skipped"] = sum(v["count"] for v in skipped.values())
        Path(args.output_prefix + META_SUFFIX).unlink(missing_ok=True)  # old dataset invalid from here
        mask_out.commit({"kind": "loss_mask", "of": Path(args.output_prefix).name, "dtype": "uint8"})
        meta = {"kind": "documents", "format_version": 1,
                "source_name": args.source_name or default_source_name(args.input),
                "tokenizer": tok.describe(), "dtype": np.dtype(dtype).name, "append_eod": False,
                "sft": {"template": args.template, "chat_template_dir": args.chat_template_dir,
                        "max_length": args.max_length, "overflow": args.overflow, "loss_mask": LOSS_SUFFIX},
                "counts": counts, "skipped": {r: v for r, v in skipped.items() if v["count"]},
                "inputs": [{"path": f.path, "bytes": f.size} for f in files],
                "tool": {"name": "megalong prepare_sft", "version": megalong.__version__}}
        return tok_out.commit(meta)


def summary(meta: dict) -> str:
    c = meta["counts"]
    lines = [f"{c['records']:,} records → {c['documents']:,} conversations, {c['tokens']:,} tokens "
             f"({c['target_tokens']:,} assistant targets); {c['truncated_examples']:,} left-truncated "
             f"({c['truncated_tokens']:,} tokens cut)"]
    if meta["skipped"]:
        lines.append(f"skipped {c['skipped']:,} records:")
        for reason, v in meta["skipped"].items():
            lines.append(f"  {reason}: {v['count']:,}, e.g. {v['examples'][0]}")
    else:
        lines.append("no bad records")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="JSON Lines (.jsonl/.json, optionally .gz/.zst) or Parquet files, globs or directories; "
                        "each record has 'messages': [{'role': system|user|assistant, 'content': str}, ...]")
    p.add_argument("--output-prefix", required=True, metavar="PREFIX",
                   help="writes PREFIX.bin/.idx/.meta.json and PREFIX_loss.bin/.idx")
    p.add_argument("--tokenizer-type", default="HuggingFaceTokenizer",
                   help="HuggingFaceTokenizer (hf) or SentencePieceTokenizer (sentencepiece) (default: hf)")
    p.add_argument("--tokenizer-model", required=True, metavar="PATH",
                   help="tokenizer.json, a HF tokenizer directory, or a SentencePiece .model (local files)")
    p.add_argument("--tokenizer-backend", default="auto", choices=["auto", "gigatoken", "reference"],
                   help="encoder for HF tokenizers (see tools/preprocess_data.py; default: auto)")
    p.add_argument("--eod-id", type=int, help="end-of-document id (default: the tokenizer's eos)")
    p.add_argument("--bos-id", type=int, help="BOS id (default: the tokenizer's bos)")
    p.add_argument("--template", default="llama3", choices=["llama3", "hf"],
                   help="llama3: Meta's Llama-3 instruct format (built in); hf: the chat_template of a local "
                        "HF tokenizer directory via transformers (default: llama3)")
    p.add_argument("--chat-template-dir", metavar="DIR",
                   help="HF tokenizer directory holding the chat_template (default: --tokenizer-model)")
    p.add_argument("--max-length", type=parse_int, metavar="N",
                   help="longest example in tokens, e.g. 64K (default: no limit; the packer applies the "
                        "recipe's lengths)")
    p.add_argument("--overflow", default="truncate_left", choices=["truncate_left", "drop"],
                   help="longer examples: keep the last N tokens (the answer and latest turns) or drop them; "
                        "both are counted (default: truncate_left)")
    p.add_argument("--source-name", help="name recorded in .meta.json (default: from the first input)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (default: 1, in this process)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset at the prefix")
    p.add_argument("--strict", action="store_true", help="stop at the first bad record instead of counting it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        meta = prepare(args)
    except (ConfigError, InputError, TokenizerError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(meta))
    print(f"wrote {args.output_prefix}.bin/.idx/.meta.json and {args.output_prefix}{LOSS_SUFFIX}.bin/.idx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
