"""`make demo` / `python -m megalong.demo`: the whole recipe, scaled down, on a CPU, in minutes.

corpus (Python's own files) → tokenizer → preprocess per source → pack stage 1 (1K) / stage 2 (4K) /
SFT → stage 1 (TP2) → stage 2 (CP2, RoPE 8e6 → 1.28e8) → SFT (DP2, LongAlign weighting) → HF export +
generation with transformers → probes on every stage → one summary table.

Every step runs the same tools a cluster user runs (as subprocesses, torchrun on 2 processes for
training) and records its result under OUT/.steps/; a re-run reuses finished steps (--fresh restarts).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "demo"
SOURCES = ["code_repos", "books", "textbooks", "short_mix"]


class Demo:
    def __init__(self, out: Path, fresh: bool, quick: bool, nproc: int):
        self.out, self.quick, self.nproc = out, quick, nproc
        if fresh and out.exists():
            shutil.rmtree(out)
        (out / ".steps").mkdir(parents=True, exist_ok=True)
        (out / "logs").mkdir(exist_ok=True)
        self.t0 = time.time()
        self.results: dict[str, dict] = {}
        self.steps: list[tuple[str, str, callable]] = []

    # ----------------------------------------------------------------- plumbing

    def step(self, name: str, title: str):
        def register(fn):
            self.steps.append((name, title, fn))
            return fn
        return register

    def run(self) -> dict:
        total = len(self.steps)
        for i, (name, title, fn) in enumerate(self.steps, 1):
            marker = self.out / ".steps" / f"{name}.json"
            prefix = f"[{i}/{total}] {title}"
            if marker.is_file():
                self.results[name] = json.loads(marker.read_text())
                print(f"{prefix} … reused (delete {marker} or pass --fresh to redo)", flush=True)
                continue
            print(f"{prefix} …", flush=True)
            t = time.time()
            result = fn() or {}
            result["seconds"] = round(time.time() - t, 1)
            self.results[name] = result
            marker.write_text(json.dumps(result, indent=1))
            print(f"{prefix} done in {result['seconds']:.1f} s (total {time.time() - self.t0:.0f} s)", flush=True)
        return self.results

    def sh(self, name: str, cmd: list[str], env: dict | None = None) -> None:
        """Runs a tool, its output in OUT/logs/NAME.log; on failure shows the log's tail and stops."""
        log = self.out / "logs" / f"{name}.log"
        full_env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONWARNINGS="ignore",
                        WANDB_MODE="offline", WANDB_SILENT="true", TOKENIZERS_PARALLELISM="false", **(env or {}))
        with log.open("w") as f:
            f.write("$ " + " ".join(map(str, cmd)) + "\n")
            f.flush()
            proc = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=full_env)
        if proc.returncode != 0:
            tail = log.read_text().splitlines()[-25:]
            raise SystemExit(f"megalong.demo: step '{name}' failed (exit {proc.returncode}); last lines of {log}:\n"
                             + "\n".join(tail))

    def sh_parallel(self, jobs: list[tuple[str, list]]) -> None:
        """Runs independent single-threaded tools `nproc` at a time (each pays its own imports)."""
        with ThreadPoolExecutor(max_workers=max(1, self.nproc)) as pool:
            for fut in [pool.submit(self.sh, name, cmd) for name, cmd in jobs]:
                fut.result()

    def torchrun(self, name: str, args: list[str]) -> None:
        self.sh(name, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       f"--nproc-per-node={self.nproc}", *args])

    @property
    def py(self) -> str:
        return sys.executable


def build(demo: Demo) -> None:
    out = demo.out
    raw, docs, packed, runs = out / "raw", out / "docs", out / "packed", out / "runs"
    tok = out / "tokenizer" / "tokenizer.json"
    steps = {"stage1": 12 if demo.quick else 24, "stage2": 2 if demo.quick else 8, "sft": 2 if demo.quick else 8}

    @demo.step("corpus", "assemble a real corpus from this Python installation")
    def _():
        from megalong.demo.corpus import build_corpus
        return {k: v["records"] for k, v in build_corpus(raw).items()}

    @demo.step("tokenizer", "train a 4K-vocabulary byte-level BPE tokenizer (Llama-3 special tokens)")
    def _():
        from megalong.demo.corpus import train_tokenizer
        train_tokenizer(sorted(raw.glob("*.jsonl")), tok, vocab_size=4096)
        return {"path": str(tok)}

    @demo.step("preprocess", "tools/preprocess_data.py per source (code: one document per repository)")
    def _():
        for src in SOURCES:
            extra = ["--group-by", "repo", "--sort-by", "path"] if src == "code_repos" else []
            demo.sh(f"preprocess_{src}", [demo.py, "tools/preprocess_data.py", "--input", raw / f"{src}.jsonl",
                                          "--output-prefix", docs / src, "--tokenizer-type", "HuggingFaceTokenizer",
                                          "--tokenizer-model", tok, "--workers", "2", "--source-name", src,
                                          "--overwrite", *extra])
        demo.sh("prepare_sft", [demo.py, "tools/prepare_sft.py", "--input", raw / "chat.jsonl", "--output-prefix",
                                docs / "chat_sft", "--tokenizer-model", tok, "--template", "llama3",
                                "--max-length", "1024", "--overwrite", "--no-progress"])
        return {src: json.loads((docs / f"{src}_text_document.meta.json").read_text())["counts"] for src in SOURCES}

    @demo.step("pack", "tools/pack_dataset.py: stage 1 (1K), held-out, stage 2 (4K), SFT")
    def _():
        demo.sh_parallel([(f"pack_{name}", [demo.py, "tools/pack_dataset.py", EXAMPLES / recipe, "--data-root", docs,
                                            "--output", packed / name, "--quiet", *extra])
                          for name, recipe, extra in [
                              ("stage1", "pack_stage1.yaml", []),
                              ("stage1_heldout", "pack_stage1.yaml", ["--set", "seed=99", "--set", "total_tokens=16K"]),
                              ("stage2", "pack_stage2.yaml", []), ("sft", "pack_sft.yaml", [])]])
        metas = {n: json.loads((packed / f"{n}.meta.json").read_text()) for n in ("stage1", "stage2", "sft")}
        return {n: {"samples": m.get("num_samples", m.get("samples")), "waste": m.get("waste")} for n, m in metas.items()}

    def train(stage: str, recipe: str, data: str, extra: list[str]):
        save = runs / stage
        demo.torchrun(f"train_{stage}", ["-m", "megalong.train", "--config", EXAMPLES / recipe,
                                         f"data.datasets=[{{path: {packed / data}}}]", f"train.save_dir={save}",
                                         f"train.steps={steps[stage]}", *extra])
        summary = json.loads((save / "summary.json").read_text())
        losses = [json.loads(l) for l in (save / "metrics.jsonl").read_text().splitlines() if l.strip()]
        train_losses = [r["loss"] for r in losses if "loss" in r]
        summary["first_loss"] = train_losses[0] if train_losses else None
        return summary

    @demo.step("stage1", "stage 1: 1K sequences, RoPE base 8e6, TP2 (torchrun, 2 processes)")
    def _():
        return train("stage1", "stage1.yaml", "stage1",
                     [f"eval.datasets=[{{path: {packed / 'stage1_heldout'}}}]"])

    @demo.step("stage2", "stage 2: 4K sequences, RoPE base 1.28e8, from stage 1's weights, CP2")
    def _():
        return train("stage2", "stage2.yaml", "stage2", [f"train.init_from={runs / 'stage1'}"])

    @demo.step("sft", "SFT: packed chats, assistant-only loss, LongAlign per-sequence weighting, DP2")
    def _():
        return train("sft", "sft.yaml", "sft", [f"train.init_from={runs / 'stage2'}"])

    @demo.step("export", "export to HuggingFace, load with transformers and generate a reply")
    def _():
        hf = out / "hf"
        shutil.rmtree(hf, ignore_errors=True)
        demo.sh("export", [demo.py, "tools/convert_checkpoint.py", "megalong-to-hf", "--ckpt", runs / "sft",
                           "--out", hf, "--no-progress"])
        demo.sh("generate", [demo.py, "-m", "megalong.demo.generate", "--hf-dir", hf, "--tokenizer", tok,
                             "--out", out / "generation.json"])
        return json.loads((out / "generation.json").read_text())

    @demo.step("probes", "probes (perplexity by position, needle, JSON-KV) on stage 1, stage 2 and SFT")
    def _():
        res = {}
        sizes = (["--lengths", "256", "--depths", "0,1", "--samples", "1", "--num-docs", "2"] if demo.quick else
                 ["--lengths", "256,1K", "--depths", "0,0.5,1", "--samples", "2", "--num-docs", "4"])
        stages = ("stage1", "stage2", "sft")
        demo.sh_parallel([(f"probes_{stage}", [demo.py, "-m", "megalong.eval", "all", "--ckpt", runs / stage,
                                               "--tokenizer", tok, "--data", docs / "books_text_document", *sizes,
                                               "--out", out / "probes" / stage, "--device", "cpu"])
                          for stage in stages])
        for stage in stages:
            summary = out / "probes" / stage / "summary.json"
            res[stage] = json.loads(summary.read_text()) if summary.is_file() else {}
        return res


def _fmt(x, spec=".3f"):
    return "—" if x is None else format(x, spec)


def print_summary(demo: Demo) -> None:
    r = demo.results
    print("\n" + "=" * 78)
    print("megalong demo — summary")
    print("=" * 78)
    print(f"{'stage':<8} {'steps':>6} {'first loss':>11} {'last loss':>10} {'tokens/s':>10}  probes (ppl · needle · jsonkv)")
    for stage in ("stage1", "stage2", "sft"):
        s, p = r.get(stage, {}), r.get("probes", {}).get(stage, {})
        probe = f"{_fmt(p.get('ppl', {}).get('ppl'), '.1f')} · {_fmt(p.get('needle', {}).get('mean_accuracy'), '.2f')}" \
                f" · {_fmt(p.get('jsonkv', {}).get('mean_accuracy'), '.2f')}"
        print(f"{stage:<8} {s.get('final_step', '—'):>6} {_fmt(s.get('first_loss')):>11} "
              f"{_fmt(s.get('last_loss')):>10} {_fmt(s.get('tokens_per_s'), '.0f'):>10}  {probe}")
    gen = r.get("export", {})
    print(f"\nHF export: {demo.out / 'hf'}  (transformers generated: {gen.get('reply', '')[:60]!r})")
    print(f"checkpoints: {demo.out / 'runs'}/{{stage1,stage2,sft}}   W&B (offline): {demo.out / 'runs'}/*/wandb")
    pngs = sorted(str(p) for p in (demo.out / "probes").rglob("*.png")) + sorted(
        str(p) for p in (demo.out / "packed").glob("*.png"))
    print("plots:\n  " + "\n  ".join(pngs[:12]))
    print(f"total {time.time() - demo.t0:.0f} s; results in {demo.out / '.steps'}")
    (demo.out / "summary.json").write_text(json.dumps(r, indent=1, default=str))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m megalong.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo_out", help="output directory (default demo_out/)")
    ap.add_argument("--fresh", action="store_true", help="start over instead of reusing finished steps")
    ap.add_argument("--quick", action="store_true", help="fewer training steps (CI)")
    ap.add_argument("--nproc", type=int, default=2, help="processes per training stage (default 2)")
    args = ap.parse_args(argv)
    demo = Demo(Path(args.out).resolve(), args.fresh, args.quick, args.nproc)
    build(demo)
    demo.run()
    print_summary(demo)
    return 0


if __name__ == "__main__":
    sys.exit(main())
