"""Long-context evaluation: built-in probes (perplexity by position, needle and JSON key-value
recall by length and depth) on megalong checkpoints and HF exports, and a HELMET launcher.

CLI: `python -m megalong.eval {ppl,needle,jsonkv,all,compare,helmet} --help`; docs/evaluation.md.
"""
from megalong.eval.adapters import HFModel, LanguageModelAdapter, MegalongModel, load_adapter
from megalong.eval.common import EvalError
from megalong.eval.perplexity import evaluate_perplexity
from megalong.eval.probes import run_probes
from megalong.eval.recall import RecallConfig, evaluate_recall

__all__ = ["EvalError", "HFModel", "LanguageModelAdapter", "MegalongModel", "RecallConfig", "evaluate_perplexity",
           "evaluate_recall", "load_adapter", "run_probes"]
