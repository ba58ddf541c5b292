"""HELMET (princeton-nlp/HELMET, installed by the user, not vendored) on an exported model.

Three steps, each usable alone: `check_export` (config.json, rope_theta, max length, tokenizer,
weights — the mistakes that silently ruin a long-context evaluation), `write_helmet_configs` (HELMET
config YAMLs for the chosen categories at 32K/64K/128K, in HELMET's own format: comma-separated
per-dataset lists), and `helmet_commands` / `run_helmet` (`python eval.py --config ...` in the HELMET
checkout, after checking that its data is downloaded).

The dataset table mirrors HELMET's `scripts/generate_configs.py` (test files, demo files, generation
lengths and name postfixes per input length) and its per-category settings.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path
from typing import Optional, Sequence

from megalong.eval.adapters import hf_rope_theta
from megalong.eval.common import EvalError, check_lengths, format_length

HELMET_LENGTHS = (32768, 65536, 131072)
_COL = {32768: 0, 65536: 1, 131072: 2}  # column of the per-length tables below

# category -> (HELMET options, datasets). Options as in generate_configs.helmet_configs().
CATEGORIES = {
    "recall": (dict(use_chat_template=False, max_test_samples=100, shots=2, stop_new_line=False),
               ["ruler_niah_mk_2", "ruler_niah_mk_3", "ruler_niah_mv", "json_kv"]),
    "rag": (dict(use_chat_template=False, max_test_samples=100, shots=2, stop_new_line=True),
            ["kilt_nq", "kilt_triviaqa", "kilt_hotpotqa", "kilt_popqa"]),
    "rerank": (dict(use_chat_template=False, max_test_samples=100, shots=2, stop_new_line=True),
               ["msmarco_rerank_psg"]),
    "cite": (dict(use_chat_template=True, max_test_samples=100, shots=2, stop_new_line=False),
             ["alce_asqa", "alce_qampari"]),
    "longqa": (dict(use_chat_template=True, max_test_samples=100, shots=2, stop_new_line=False),
               ["narrativeqa", "infbench_qa_eng", "infbench_choice_eng"]),
    "summ": (dict(use_chat_template=True, max_test_samples=100, shots=2, stop_new_line=False),
             ["infbench_sum_eng", "multi_lexsum"]),
    "icl": (dict(use_chat_template=False, max_test_samples=500, shots=0, stop_new_line=True),
            ["icl_trec_coarse", "icl_trec_fine", "icl_banking77", "icl_clinic150", "icl_nlu"]),
}
_RULER = {"ruler_niah_mk_2": ("niah_multikey_2", 50), "ruler_niah_mk_3": ("niah_multikey_3", 100),
          "ruler_niah_mv": ("niah_multivalue", 50)}
_KILT = {"kilt_nq": ("nq-dev-multikilt_1000_k{k}_dep6.jsonl", "nq-train-multikilt_1000_k3_dep6.jsonl", ""),
         "kilt_triviaqa": ("triviaqa-dev-multikilt_1000_k{k}_dep6.jsonl", "triviaqa-train-multikilt_1000_k3_dep6.jsonl", ""),
         "kilt_hotpotqa": ("hotpotqa-dev-multikilt_1000_k{k}_dep3.jsonl", "hotpotqa-train-multikilt_1000_k3_dep3.jsonl", ""),
         "kilt_popqa": ("popqa_test_1000_k{k}_dep6.jsonl", "popqa_test_1000_k3_dep6.jsonl", "_3")}
_KILT_K = ("220", "440", "1000")
_ICL_SHOTS = {"icl_trec_coarse": ("1600", "3300", "6600"), "icl_trec_fine": ("1600", "3200", "6400"),
              "icl_banking77": ("1450", "2900", "5900"), "icl_clinic150": ("1750", "3525", "7050"),
              "icl_nlu": ("2040", "4080", "8296")}
_LONG_TEXT = {"narrativeqa": (100, 300), "infbench_qa_eng": (10, 210), "infbench_choice_eng": (10, 210),
              "infbench_sum_eng": (1200, 1400), "multi_lexsum": (400, 700)}  # (generation, truncation margin)
_ALCE = {"alce_asqa": ("data/alce/asqa_eval_gtr_top2000.json", "prompts/asqa_revised.json"),
         "alce_qampari": ("data/alce/qampari_eval_gtr_top2000.json", "prompts/qampari_revised.json")}


def dataset_entry(name: str, length: int) -> dict:
    """HELMET's settings for one dataset at one input length (32K, 64K or 128K)."""
    if length not in _COL:
        raise EvalError(f"HELMET length {length}: the configs cover {', '.join(map(format_length, HELMET_LENGTHS))}")
    i = _COL[length]
    e = {"input_max_length": length, "datasets": name, "generation_max_length": 20, "test_files": "",
         "demo_files": ""}
    if name in _RULER:
        sub, gen = _RULER[name]
        e.update(generation_max_length=gen, test_files=f"data/ruler/{sub}/validation_{length}.jsonl")
    elif name == "json_kv":
        e.update(generation_max_length=100, test_files=f"data/json_kv/test_k{('440', '900', '1800')[i]}_dep6.jsonl")
    elif name in _KILT:
        test, demo, post = _KILT[name]
        e.update(datasets=name + post, test_files="data/kilt/" + test.format(k=_KILT_K[i]), demo_files="data/kilt/" + demo)
    elif name == "msmarco_rerank_psg":
        e.update(generation_max_length=200, demo_files="data/msmarco/test_reranking_data_k10_dep3.jsonl",
                 test_files=f"data/msmarco/test_reranking_data_k{('285', '600', '1000')[i]}_dep3.jsonl")
    elif name in _ALCE:
        test, demo = _ALCE[name]
        e.update(datasets=name + ("_165", "_345", "_700")[i], generation_max_length=300, test_files=test, demo_files=demo)
    elif name in _LONG_TEXT:
        gen, margin = _LONG_TEXT[name]
        e.update(datasets=f"{name}_{length - margin}", generation_max_length=gen)
    elif name in _ICL_SHOTS:
        e.update(datasets=f"{name}_{_ICL_SHOTS[name][i]}shot_balance")
    else:
        raise EvalError(f"unknown HELMET dataset {name!r}")
    return e


def category_config(category: str, lengths: Sequence[int], model_path: Optional[str],
                    use_chat_template: Optional[bool] = None) -> dict:
    """One HELMET config (a YAML mapping) running `category` at every length in `lengths`."""
    if category not in CATEGORIES:
        raise EvalError(f"unknown HELMET category {category!r}; choose from {', '.join(CATEGORIES)}")
    options, names = CATEGORIES[category]
    entries = [dataset_entry(n, L) for n in names for L in lengths]
    cfg = {k: ",".join(str(e[k]) for e in entries) for k in entries[0]}
    cfg.update(options)
    if use_chat_template is not None:
        cfg["use_chat_template"] = bool(use_chat_template)
    cfg["model_name_or_path"] = model_path
    return cfg


def write_helmet_configs(out_dir: str | Path, lengths: Sequence[int], categories: Sequence[str],
                         model_path: Optional[str] = None, use_chat_template: Optional[bool] = None) -> list[str]:
    import yaml

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tag = "_".join(format_length(L).lower() for L in sorted(lengths))
    paths = []
    for c in categories:
        path = out / f"{c}_{tag}.yaml"
        path.write_text(yaml.safe_dump(category_config(c, sorted(lengths), model_path, use_chat_template),
                                       sort_keys=False))
        paths.append(str(path))
    return paths


# ---------------------------------------------------------------- the export


def fix_config(hf_dir: str | Path) -> dict:
    """Adds top-level rope_theta / rope_scaling from transformers-5 `rope_parameters` (backup kept)."""
    path = Path(hf_dir) / "config.json"
    cfg = json.loads(path.read_text())
    params = cfg.get("rope_parameters") or {}
    if cfg.get("rope_theta") is None and params.get("rope_theta") is not None:
        Path(str(path) + ".orig").write_text(path.read_text())
        cfg["rope_theta"] = params["rope_theta"]
        if params.get("rope_type", "default") != "default" and cfg.get("rope_scaling") is None:
            cfg["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
        path.write_text(json.dumps(cfg, indent=2) + "\n")
    return cfg


def check_export(hf_dir: str | Path, lengths: Sequence[int], max_length_override: Optional[int] = None,
                 expect_rope_theta: Optional[float] = None) -> dict:
    """Checks what HELMET will read from the export; raises one EvalError listing every problem."""
    d = Path(hf_dir)
    if not (d / "config.json").is_file():
        raise EvalError(f"--hf-dir {d}: no config.json; pass the directory written by tools/convert_checkpoint.py")
    try:
        cfg = json.loads((d / "config.json").read_text())
    except ValueError as e:
        raise EvalError(f"{d}/config.json is not valid JSON ({e})") from None
    problems, notes = [], []
    top, theta = cfg.get("rope_theta"), hf_rope_theta(cfg)
    if theta is None:
        problems.append("config.json has no rope_theta (top level or rope_parameters): the model would run with "
                        "a default RoPE base; re-export with the trained rope_base")
    elif top is None:
        problems.append(f"config.json keeps rope_theta={theta:g} only in rope_parameters (transformers ≥ 5 format); "
                        "HELMET's transformers 4.x reads the top-level key and would silently use 10000 — "
                        "pass --fix-config to add rope_theta/rope_scaling at the top level")
    elif hf_rope_theta({"rope_parameters": cfg.get("rope_parameters") or {}}) not in (None, float(top)):
        problems.append(f"config.json: rope_theta {top} disagrees with rope_parameters.rope_theta "
                        f"{cfg['rope_parameters']['rope_theta']}")
    if theta is not None and expect_rope_theta is not None and abs(theta - expect_rope_theta) > 1e-6 * expect_rope_theta:
        problems.append(f"rope_theta is {theta:g} but --expect-rope-theta says {expect_rope_theta:g}: wrong export?")
    max_pos = int(cfg.get("max_position_embeddings") or 0)
    try:
        check_lengths(list(lengths), max_pos, max_length_override, "HELMET")
    except EvalError as e:
        problems.append(str(e))
    if not ((d / "tokenizer.json").is_file() or (d / "tokenizer.model").is_file()):
        problems.append("no tokenizer.json or tokenizer.model: export the tokenizer with the model")
    if not (d / "tokenizer_config.json").is_file():
        notes.append("no tokenizer_config.json: AutoTokenizer falls back to defaults for special tokens")
    chat = False
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
        chat = bool(getattr(tok, "chat_template", None))
        if len(tok) > int(cfg.get("vocab_size", 0)):
            problems.append(f"the tokenizer has {len(tok)} tokens but config.json vocab_size is {cfg.get('vocab_size')}")
    except Exception as e:  # transformers raises many types for a broken tokenizer
        first = (str(e).strip().splitlines() or [""])[0][:200]
        problems.append(f"transformers cannot load the tokenizer ({type(e).__name__}: {first})")
    index = d / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        missing = [s for s in shards if not (d / s).is_file()]
        if missing:
            problems.append(f"weight shards listed in {index.name} are missing: {missing[:5]}")
    elif not list(d.glob("*.safetensors")) and not list(d.glob("pytorch_model*.bin")):
        problems.append("no weights (*.safetensors or pytorch_model*.bin)")
    if problems:
        raise EvalError(f"export {d} is not ready for HELMET:\n  - " + "\n  - ".join(problems))
    return {"path": str(d), "model_type": cfg.get("model_type"), "rope_theta": theta,
            "rope_scaling": cfg.get("rope_scaling") or (cfg.get("rope_parameters") or {}).get("rope_type"),
            "max_position_embeddings": max_pos, "vocab_size": cfg.get("vocab_size"), "chat_template": chat,
            "notes": notes}


# ---------------------------------------------------------------- the HELMET checkout


def check_helmet_checkout(helmet_dir: str | Path, config_paths: Sequence[str]) -> None:
    """eval.py present and every data file the configs name downloaded (HELMET's data is ~34 GB)."""
    import yaml

    h = Path(helmet_dir)
    if not (h / "eval.py").is_file():
        raise EvalError(f"--helmet-dir {h}: no eval.py; clone https://github.com/princeton-nlp/HELMET and "
                        "install its requirements (pip install -r requirements.txt) in its own environment")
    missing = []
    for p in config_paths:
        cfg = yaml.safe_load(Path(p).read_text())
        for key in ("test_files", "demo_files"):
            missing += [f for f in str(cfg.get(key) or "").split(",") if f and not (h / f).exists()]
    if missing:
        raise EvalError(f"HELMET data missing under {h}: {sorted(set(missing))[:6]} ({len(set(missing))} files); "
                        "run `bash scripts/download_data.sh` in the HELMET checkout")


def helmet_commands(config_paths: Sequence[str], hf_dir: str, output_dir: str, tag: str = "megalong",
                    seed: int = 42, python: str = "python", extra: Sequence[str] = ()) -> list[list[str]]:
    return [[python, "eval.py", "--config", str(Path(p).resolve()), "--model_name_or_path", str(Path(hf_dir).resolve()),
             "--output_dir", str(Path(output_dir).resolve()), "--tag", tag, "--seed", str(seed), *extra]
            for p in config_paths]


def run_helmet(hf_dir: str, out_dir: str, lengths: Sequence[int] = HELMET_LENGTHS,
               categories: Sequence[str] = tuple(CATEGORIES), helmet_dir: Optional[str] = None,
               max_length_override: Optional[int] = None, expect_rope_theta: Optional[float] = None,
               do_fix_config: bool = False, use_chat_template: Optional[bool] = None, tag: str = "megalong",
               seed: int = 42, python: str = "python", extra: Sequence[str] = (), execute: bool = True) -> dict:
    """Checks the export, writes configs under `out_dir/helmet_configs`, prints the commands and, with
    a HELMET checkout, runs them one by one (stopping at the first failure)."""
    if do_fix_config:
        fix_config(hf_dir)
    report = check_export(hf_dir, lengths, max_length_override, expect_rope_theta)
    if use_chat_template is None:
        use_chat_template = False if not report["chat_template"] else None  # base models: never a chat template
    configs = write_helmet_configs(Path(out_dir) / "helmet_configs", lengths, categories, str(Path(hf_dir).resolve()),
                                   use_chat_template)
    commands = helmet_commands(configs, hf_dir, str(Path(out_dir) / "helmet_output"), tag, seed, python, extra)
    print(f"export {report['path']}: {report['model_type']}, rope_theta {report['rope_theta']:g}, max position "
          f"{report['max_position_embeddings']}, chat template {'yes' if report['chat_template'] else 'no'}")
    for n in report["notes"]:
        print(f"  note: {n}")
    print(f"HELMET configs ({', '.join(categories)} at {', '.join(map(format_length, lengths))}):")
    for c in configs:
        print(f"  {c}")
    where = helmet_dir or "<your HELMET checkout>"
    print(f"commands (run in {where}):")
    for cmd in commands:
        print("  " + shlex.join(cmd))
    result = {"export": report, "configs": configs, "commands": commands, "returncodes": []}
    if helmet_dir and execute:
        check_helmet_checkout(helmet_dir, configs)
        for cmd in commands:
            rc = subprocess.run(cmd, cwd=helmet_dir, env=dict(os.environ)).returncode
            result["returncodes"].append(rc)
            if rc != 0:
                raise EvalError(f"HELMET exited with {rc} on {cmd[3]}; see its output above")
        print(f"HELMET results: {Path(out_dir) / 'helmet_output'} (*.json.score per dataset)")
    return result
