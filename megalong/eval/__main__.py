"""`python -m megalong.eval {ppl,needle,jsonkv,all,compare,helmet} ...` — see docs/evaluation.md."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megalong.eval.common import EvalError, default_lengths, parse_depths, parse_length, parse_lengths

DEFAULT_DEPTHS = "0,0.25,0.5,0.75,1"


def _model_args(p: argparse.ArgumentParser, many: bool = False) -> None:
    g = p.add_argument_group("model (one of)")
    action = "append" if many else "store"
    more = " (repeat to compare several models on one plot)" if many else ""
    g.add_argument("--ckpt", action=action, default=[] if many else None,
                   help="megalong checkpoint: a run's checkpoint directory (its 'latest') or one iter_* "
                        "directory; saved at any TP/PP, loaded in this one process" + more)
    g.add_argument("--hf-dir", action=action, default=[] if many else None,
                   help="exported HuggingFace model directory (config.json, *.safetensors, tokenizer), "
                        "loaded with transformers from local files only" + more)
    g.add_argument("--tokenizer", help="tokenizer.json / HF tokenizer directory / SentencePiece .model; "
                   "default: the export's own tokenizer, or the one the checkpoint records")
    g.add_argument("--tokenizer-type", default="HuggingFaceTokenizer",
                   help="HuggingFaceTokenizer (hf) or SentencePieceTokenizer (default: %(default)s)")
    g.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    g.add_argument("--dtype", default="auto", help="HF exports: auto (as saved), float32, bfloat16 (default: auto)")
    g.add_argument("--attention-backend", help="megalong checkpoints: attention kernel override (e.g. reference)")


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output directory for JSON tables and PNG figures")
    p.add_argument("--seed", type=int, default=0, help="seed for document choice and probe draws (default 0)")
    p.add_argument("--max-length-override", type=parse_length,
                   help="allow lengths up to this many tokens, above the model's max_position_embeddings")
    p.add_argument("--max-batch-tokens", type=int, default=16384,
                   help="tokens per forward pass (rows × length) (default %(default)s)")
    p.add_argument("--wandb-run", help="also log to W&B: [entity/]project/run_id of the training run (resumed)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _ppl_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("perplexity by position")
    g.add_argument("--data", help="held-out document dataset or packed dataset prefix ({prefix}.bin/.idx/.meta.json)")
    g.add_argument("--ppl-length", type=parse_length,
                   help="tokens per evaluated sample (default: the largest --lengths, else the model maximum)")
    g.add_argument("--num-docs", type=int, default=8, help="samples to evaluate (default %(default)s)")
    g.add_argument("--bucket-size", type=parse_length, help="tokens per position bucket (default: length/16–32, a power of 2)")


def _recall_args(p: argparse.ArgumentParser, needle: bool) -> None:
    g = p.add_argument_group("recall probes")
    g.add_argument("--lengths", help="comma-separated lengths, e.g. 1K,2K,4K (default: powers of two from 1K "
                   "to the model maximum)")
    g.add_argument("--depths", default=DEFAULT_DEPTHS, help="needle depths in [0, 1] (default %(default)s)")
    g.add_argument("--samples", type=int, default=4, help="prompts per (length, depth) cell (default %(default)s)")
    g.add_argument("--value-digits", type=int, default=7, help="digits of the needle's number (default %(default)s)")
    g.add_argument("--key-chars", type=int, default=8, help="letters of the needle's key (default %(default)s)")
    g.add_argument("--kv-chars", type=int, default=8, help="hex characters of JsonKV keys/values (default %(default)s)")
    if needle:
        g.add_argument("--haystack", help="document dataset whose text fills the haystack (default: --data)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m megalong.eval", description=(
        "Long-context evaluation of megalong checkpoints and HF exports: perplexity by position, "
        "needle-in-a-haystack and JSON key-value recall by length and depth, and HELMET."))
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ppl", help="loss by position bucket on held-out long documents (several models: one plot)")
    _model_args(p, many=True)
    _common_args(p)
    _ppl_args(p)
    p.add_argument("--lengths", help=argparse.SUPPRESS)
    for name, text in (("needle", "needle-in-a-haystack exact match, depth × length heatmap"),
                       ("jsonkv", "JSON key-value retrieval (HELMET JsonKV style), depth × length heatmap")):
        p = sub.add_parser(name, help=text)
        _model_args(p)
        _common_args(p)
        _recall_args(p, needle=name == "needle")
        if name == "needle":
            p.add_argument("--data", help="document dataset for the haystack (same as --haystack)")
        else:
            p.add_argument("--data", help="accepted and not used (JsonKV needs no text), so that one command "
                                          "line (e.g. slurm/eval.sh's) serves every probe")
    p = sub.add_parser("all", help="ppl + needle + jsonkv on one model (the built-in probe suite)")
    _model_args(p)
    _common_args(p)
    _ppl_args(p)
    _recall_args(p, needle=True)
    p = sub.add_parser("compare", help="plot several ppl.json results on one figure")
    p.add_argument("results", nargs="+", help="ppl.json files written by the ppl/all commands")
    p.add_argument("--out", required=True, help="PNG path to write")
    p = sub.add_parser("helmet", help="check an HF export and run HELMET on it (32K/64K/128K)")
    p.add_argument("--hf-dir", required=True, help="exported HuggingFace model directory")
    p.add_argument("--out", required=True, help="directory for HELMET configs and outputs")
    p.add_argument("--lengths", default="32K,64K,128K", help="HELMET input lengths, from 32K,64K,128K (default %(default)s)")
    p.add_argument("--categories", default="recall,rag,rerank,cite,longqa,summ,icl",
                   help="HELMET categories (default: all seven: %(default)s)")
    p.add_argument("--helmet-dir", help="a HELMET checkout: run eval.py there (else only print the commands)")
    p.add_argument("--python", default="python", help="python of HELMET's environment (default %(default)s)")
    p.add_argument("--expect-rope-theta", type=float, help="fail unless config.json has this rope_theta (e.g. 8e6)")
    p.add_argument("--fix-config", action="store_true",
                   help="add top-level rope_theta/rope_scaling to a transformers-5 config.json (backup kept)")
    p.add_argument("--use-chat-template", choices=["true", "false"],
                   help="override HELMET's per-category chat-template setting (default: false without a chat template)")
    p.add_argument("--tag", default="megalong", help="HELMET --tag (default %(default)s)")
    p.add_argument("--seed", type=int, default=42, help="HELMET --seed (default %(default)s)")
    p.add_argument("--max-length-override", type=parse_length, help="allow lengths above max_position_embeddings")
    p.add_argument("--dry-run", action="store_true", help="check and write configs, but do not run HELMET")
    return ap


def _tokenizer(args, adapter):
    from megalong.data.tokenizer import TokenizerError, load_tokenizer

    from megalong.eval.adapters import hf_tokenizer

    try:
        if args.tokenizer:
            return load_tokenizer(args.tokenizer_type, args.tokenizer)
        if getattr(adapter, "config", None) is not None:  # an HF export carries its tokenizer
            return hf_tokenizer(adapter.path)
        rec = adapter.tokenizer_record
        if rec and Path(rec.get("path", "")).exists():
            return load_tokenizer(rec["type"], rec["path"], rec.get("eod_id"), rec.get("bos_id"))
    except TokenizerError as e:
        raise EvalError(str(e)) from None
    raise EvalError(f"--ckpt {args.ckpt}: the checkpoint does not point at an existing tokenizer; pass --tokenizer")


def _adapter(args, ckpt=None, hf_dir=None):
    from megalong.eval.adapters import load_adapter

    return load_adapter(ckpt=ckpt, hf_dir=hf_dir, device=args.device, dtype=args.dtype,
                        attention_backend=args.attention_backend)


def _recall_config(args):
    from megalong.eval.recall import RecallConfig

    return RecallConfig(samples=args.samples, value_digits=args.value_digits, key_chars=args.key_chars,
                        kv_chars=args.kv_chars)


def cmd_probes(args, probes) -> int:
    from megalong.eval.probes import run_probes

    adapter = _adapter(args, args.ckpt, args.hf_dir)
    tokenizer = _tokenizer(args, adapter)
    limit = args.max_length_override or adapter.max_length
    lengths = parse_lengths(args.lengths) if getattr(args, "lengths", None) else default_lengths(limit)
    haystack = getattr(args, "haystack", None) or getattr(args, "data", None)
    run_probes(adapter, tokenizer, haystack, lengths, parse_depths(getattr(args, "depths", DEFAULT_DEPTHS)),
               args.out, args.seed, probes=probes, ppl_data=getattr(args, "data", None),
               ppl_length=getattr(args, "ppl_length", None), num_docs=getattr(args, "num_docs", 8),
               bucket_size=getattr(args, "bucket_size", None),
               recall=_recall_config(args) if probes != ("ppl",) else None,
               max_length_override=args.max_length_override, max_batch_tokens=args.max_batch_tokens,
               progress=not args.no_progress, wandb_run=args.wandb_run)
    return 0


def cmd_ppl(args) -> int:
    """One model: the probe runner. Several: each evaluated on the same samples, one plot, one table."""
    models = [("ckpt", c) for c in args.ckpt] + [("hf", h) for h in args.hf_dir]
    if not models:
        raise EvalError("give at least one model: --ckpt DIR or --hf-dir DIR")
    if len(models) == 1:
        args.ckpt, args.hf_dir = (models[0][1], None) if models[0][0] == "ckpt" else (None, models[0][1])
        return cmd_probes(args, ("ppl",))
    from megalong.eval.common import check_lengths
    from megalong.eval.perplexity import evaluate_perplexity, format_ppl_table
    from megalong.eval.plots import plot_ppl_curves
    from megalong.eval.probes import check_data_tokenizer, check_model_tokenizer, write_json

    if not args.data:
        raise EvalError("ppl needs --data (a held-out document or packed dataset)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for kind, path in models:
        adapter = _adapter(args, path if kind == "ckpt" else None, path if kind == "hf" else None)
        tokenizer = _tokenizer(args, adapter)
        length = args.ppl_length or args.max_length_override or adapter.max_length
        check_lengths([length], adapter.max_length, args.max_length_override, adapter.name)
        notes = [check_model_tokenizer(adapter, tokenizer), check_data_tokenizer(tokenizer, args.data, "data")]
        print("\n".join(f"{adapter.name}: {n}" for n in notes))
        results.append(evaluate_perplexity(adapter, args.data, length, args.num_docs, args.seed, args.bucket_size,
                                           args.max_batch_tokens, not args.no_progress))
    print(format_ppl_table(results))
    print(f"files: {write_json(out / 'ppl.json', results)}, {plot_ppl_curves(results, out / 'ppl.png')}")
    return 0


def cmd_compare(args) -> int:
    from megalong.eval.perplexity import format_ppl_table
    from megalong.eval.plots import plot_ppl_curves

    results = []
    for f in args.results:
        try:
            data = json.loads(Path(f).read_text())
        except (OSError, ValueError) as e:
            raise EvalError(f"{f}: cannot read a ppl result ({e})") from None
        results += data if isinstance(data, list) else [data]
    if any(r.get("probe") != "ppl" for r in results):
        raise EvalError("compare takes ppl.json files written by `ppl` or `all`")
    print(format_ppl_table(results))
    print(f"figure: {plot_ppl_curves(results, args.out)}")
    return 0


def cmd_helmet(args) -> int:
    from megalong.eval.helmet import run_helmet

    lengths = parse_lengths(args.lengths)
    chat = None if args.use_chat_template is None else args.use_chat_template == "true"
    run_helmet(args.hf_dir, args.out, lengths, [c.strip() for c in args.categories.split(",") if c.strip()],
               args.helmet_dir, args.max_length_override, args.expect_rope_theta, args.fix_config, chat, args.tag,
               args.seed, args.python, execute=not args.dry_run)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "ppl":
            return cmd_ppl(args)
        if args.command in ("needle", "jsonkv"):
            return cmd_probes(args, (args.command,))
        if args.command == "all":
            return cmd_probes(args, ("ppl", "needle", "jsonkv"))
        if args.command == "compare":
            return cmd_compare(args)
        return cmd_helmet(args)
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
