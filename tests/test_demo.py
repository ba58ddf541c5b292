"""`make demo` end to end in its quick mode: every step runs and the summary's numbers are sane."""
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "megalong.demo", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "megalong demo — summary" in proc.stdout
    r = json.loads((out / "summary.json").read_text())
    for stage in ("stage1", "stage2", "sft"):
        s = r[stage]
        assert s["status"] == "completed" and s["final_step"] == s["steps"] > 0
        assert math.isfinite(s["last_loss"]) and s["tokens_per_s"] > 0
        assert (Path(s["checkpoint"]) / "megalong.json").is_file()
        p = r["probes"][stage]
        assert math.isfinite(p["ppl"]["ppl"]) and p["ppl"]["ppl"] > 1
        assert 0.0 <= p["needle"]["mean_accuracy"] <= 1.0 and 0.0 <= p["jsonkv"]["mean_accuracy"] <= 1.0
    # learning happened: stage 1's loss fell well below the uniform-distribution loss ln(4096) = 8.32
    assert r["stage1"]["last_loss"] < r["stage1"]["first_loss"] - 0.5
    assert r["stage2"]["last_loss"] < r["stage1"]["first_loss"]
    assert r["export"]["new_tokens"] > 0 and r["export"]["model_class"] == "LlamaForCausalLM"
    # re-running reuses every finished step
    again = subprocess.run([sys.executable, "-m", "megalong.demo", "--quick", "--out", str(out)], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("reused") == 9
