#!/usr/bin/env python
"""Raw text (JSONL / Parquet) → tokenized Megatron document datasets (.bin/.idx + .meta.json).

Takes Megatron-LM's `tools/preprocess_data.py` flags where they mean the same, so an existing command
line works. See docs/data_preprocessing.md.

    python tools/preprocess_data.py --input data/books/ --output-prefix out/books \
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model /models/llama3 --append-eod --workers 16
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir)))

from megalong.config import ConfigError, from_dict  # noqa: E402
from megalong.data.preprocess import BadRecordError, PreprocessConfig, PreprocessError, preprocess  # noqa: E402
from megalong.data.readers import InputError  # noqa: E402
from megalong.data.tokenizer import TokenizerError  # noqa: E402


def unescape(text: str) -> str:
    r"""`\n`, `\t`, `\\` and `\uXXXX` typed on a command line become the characters (others kept)."""
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("input data")
    g.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="JSON Lines files (.jsonl/.json, optionally .gz or .zst), Parquet files, globs "
                        "(quote them) or directories (searched recursively); read in sorted order")
    g.add_argument("--json-keys", nargs="+", default=["text"], metavar="KEY",
                   help="record fields (Parquet columns) to tokenize; one dataset per key "
                        "(default: text). A record bad in any key is skipped for all keys")
    g.add_argument("--group-by", metavar="KEY",
                   help="concatenate the records sharing this field (e.g. repo) into one document "
                        "(ProLong's code repositories); holds the input's texts in memory")
    g.add_argument("--sort-by", metavar="KEY",
                   help="order the records of a group by this field (e.g. path) before joining "
                        "(default: input order)")
    g.add_argument("--group-separator", default="\\n\\n", metavar="STR",
                   help="text placed between the records of a group; backslash escapes such as \\n "
                        "are understood (default: \\n\\n)")
    g.add_argument("--source-name", metavar="NAME",
                   help="name of this source in .meta.json (default: the first input's file or "
                        "directory name, e.g. books for data/books.jsonl.zst)")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", default="HuggingFaceTokenizer",
                   help="HuggingFaceTokenizer (alias hf) for a tokenizer.json or a HF tokenizer "
                        "directory; SentencePieceTokenizer / GPTSentencePieceTokenizer / Llama2Tokenizer "
                        "(alias sentencepiece) for a .model file (default: HuggingFaceTokenizer)")
    g.add_argument("--tokenizer-model", required=True, metavar="PATH",
                   help="the tokenizer: tokenizer.json, a directory holding it, or a SentencePiece .model "
                        "(local files only)")
    g.add_argument("--tokenizer-backend", default="auto", choices=["auto", "gigatoken", "reference"],
                   help="auto: gigatoken for HF BPE tokenizers when it reproduces HF tokenizers' ids on "
                        "probe texts at load, else the reference; gigatoken: require it; reference: HF "
                        "tokenizers / sentencepiece only (default: auto)")
    g.add_argument("--eod-id", type=int, metavar="ID",
                   help="end-of-document id (default: the tokenizer's eos token)")
    g.add_argument("--bos-id", type=int, metavar="ID",
                   help="beginning-of-sequence id (default: the tokenizer's bos token)")
    g.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                   help="append the EOD token to every document (default: on; --no-append-eod disables)")
    g.add_argument("--prepend-bos", action="store_true",
                   help="put the BOS token before every document (off by default: no special token is "
                        "added implicitly)")
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True, metavar="PREFIX",
                   help="writes {PREFIX}_{key}_document.bin/.idx/.meta.json for each json key "
                        "(Megatron-LM's naming); parent directories are created")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an existing complete dataset (refused otherwise)")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=0,
                   help="worker processes tokenizing in parallel; 1 runs in this process "
                        "(default: 0 = every available core). Output bytes do not depend on it")
    g.add_argument("--partitions", type=int, default=1,
                   help="accepted for Megatron-LM command lines; megalong splits the work across "
                        "--workers itself, so the value does not change anything")
    g.add_argument("--chunk-bytes", default="2M", metavar="N",
                   help="uncompressed bytes of records per work item sent to a worker (default: 2M)")
    g.add_argument("--log-interval", type=int, default=100_000, metavar="DOCS",
                   help="documents between progress lines when stderr is not a terminal (a terminal "
                        "gets a live progress bar) (default: 100000)")
    g.add_argument("--no-progress", action="store_true", help="print no progress, only the summary")
    g.add_argument("--strict", action="store_true",
                   help="stop at the first bad record (invalid JSON or UTF-8, missing key, non-string "
                        "or empty text) with its file:line; default: skip it, count it and report it")
    g = p.add_argument_group("not supported (kept so Megatron-LM command lines get a clear message)")
    g.add_argument("--keep-sequential-samples", action="store_true",
                   help="no effect: megalong always keeps the input order")
    g.add_argument("--split-sentences", action="store_true", help="not supported (an error)")
    g.add_argument("--vocab-file", help="not supported: pass a tokenizer.json as --tokenizer-model")
    g.add_argument("--merge-file", help="not supported: pass a tokenizer.json as --tokenizer-model")
    return p


def config_from_args(args: argparse.Namespace) -> PreprocessConfig:
    if args.split_sentences:
        raise PreprocessError("--split-sentences is not supported: megalong writes one document per record")
    if args.vocab_file or args.merge_file:
        raise PreprocessError("--vocab-file/--merge-file (GPT2BPETokenizer) are not supported: convert the "
                              "tokenizer to a tokenizer.json (e.g. with transformers' AutoTokenizer "
                              ".save_pretrained) and pass it as --tokenizer-model")
    if args.partitions != 1:
        print(f"note: --partitions {args.partitions} has no effect; {args.workers or 'all'} worker(s) "
              "share the work", file=sys.stderr)
    return from_dict(PreprocessConfig, {
        "input": args.input, "output_prefix": args.output_prefix,
        "tokenizer_model": args.tokenizer_model, "tokenizer_type": args.tokenizer_type,
        "tokenizer_backend": args.tokenizer_backend, "json_keys": args.json_keys,
        "append_eod": args.append_eod, "prepend_bos": args.prepend_bos,
        "eod_id": args.eod_id, "bos_id": args.bos_id, "source_name": args.source_name,
        "group_by": args.group_by, "sort_by": args.sort_by, "group_separator": unescape(args.group_separator),
        "workers": args.workers, "chunk_bytes": args.chunk_bytes, "strict": args.strict,
        "overwrite": args.overwrite, "progress": not args.no_progress, "log_interval": args.log_interval,
    }, where="command line")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        preprocess(config_from_args(args))
    except BadRecordError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (PreprocessError, InputError, TokenizerError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no dataset was written (partial files removed)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
