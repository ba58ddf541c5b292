"""TP, PP, CP, DP (and the distributed optimizer) give the one-process loss, gradients and update.

One 4-process gloo launch runs every layout (process launches cost 5–9 s of imports each); the
worker compares each against plain single-process autograd + torch AdamW on the same weights/data.
"""
import json
from pathlib import Path

import pytest

from tests.launch import torchrun

WORKER = Path(__file__).parent / "workers" / "parity_worker.py"


@pytest.fixture(scope="module")
def parity_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("parity") / "results.json"
    torchrun(WORKER, 4, [str(out)], timeout=600)
    return {r["layout"]: r for r in json.loads(out.read_text())}


EXPECTED = ["TP1 PP1 CP1 DP4 distopt token", "TP1 PP1 CP1 DP4 token", "TP2 PP1 CP1 DP2 token",
            "TP1 PP2 CP1 DP2 token", "TP1 PP1 CP2 DP2 token", "TP2 PP2 CP1 DP1 token",
            "TP2 PP1 CP2 DP1 distopt token", "TP1 PP2 CP2 DP1 token", "TP2 PP2 CP1 DP1 tied token",
            "TP1 PP1 CP1 DP4 distopt sequence", "TP1 PP1 CP2 DP2 sequence", "TP2 PP2 CP1 DP1 sequence"]


def test_every_layout_ran(parity_results):
    assert sorted(parity_results) == sorted(EXPECTED)


@pytest.mark.parametrize("layout", EXPECTED)
def test_layout_matches_single_process(parity_results, layout):
    r = parity_results[layout]
    assert r["loss1_abs"] < 1e-5 and r["loss2_abs"] < 1e-5, r
    if "grad1_rel" in r:
        assert r["grad1_rel"] < 1e-5 and r["grad2_rel"] < 1e-5, r
    assert r["param_abs_after_step"] < 1e-6, r
