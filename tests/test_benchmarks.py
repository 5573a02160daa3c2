"""The benchmark scripts run end to end (``run_all.py --quick``) and write the JSON they promise.

Timings are never asserted: on a shared CI machine they mean nothing at --quick sizes.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
RUN_ALL = ROOT / "examples" / "benchmarks" / "run_all.py"
BENCHMARKS = {"init_time", "zero3_init", "step_time", "load_time", "merged_inference"}
GOAL_KEYS = {"figure", "peer", "goal", "measured", "unit", "met", "note"}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, str(RUN_ALL), "--quick", "--out-dir", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (
        f"run_all --quick failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    assert (out / "quick.md").read_text().startswith("# KaSA benchmarks")
    return json.loads((out / "quick.json").read_text())


def test_every_benchmark_ran(report):
    assert report["quick"] is True
    assert report["errors"] == {}
    assert set(report["benchmarks"]) == BENCHMARKS


def test_goals_are_well_formed(report):
    figures = {g["figure"] for g in report["goals"]}
    assert {
        "KaSA initialization time",
        "removed part vs float64 SVD",
        "initialization on 2 ranks under ZeRO-3 (CPU, gloo)",
        "training step time",
        "peak memory during training",
        "adapter load time onto a fresh base",
        "merged model inference",
    } <= figures
    for g in report["goals"]:
        assert set(g) == GOAL_KEYS
        assert isinstance(g["met"], bool)
        assert isinstance(g["measured"], float) and g["measured"] >= 0


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_benchmark_result_structure(report, name):
    result = report["benchmarks"][name]
    assert result["benchmark"] == name
    assert result["table"].startswith("| ")
    assert result["rows"] and result["goals"]
    assert result["environment"]["device"] == "cpu"
    assert result["settings"]["spec"]["hidden"] == 64  # --quick shapes


def test_figures_are_sane(report):
    bench = report["benchmarks"]
    init = {row["peer"]: row for row in bench["init_time"]["rows"]}
    kasa = init["kasa_trl apply_kasa (auto)"]
    assert kasa["max_r_err"] < 1e-6  # accuracy is deterministic, unlike timings
    assert all(t > 0 for t in kasa["time_s"]["all"])

    step = {row["peer"]: row for row in bench["step_time"]["rows"]}
    assert set(step) >= {"PEFT LoRA", "PEFT KaSA", "kasa_trl in_place", "kasa_trl non_destructive"}
    for peer in ("PEFT LoRA", "PEFT KaSA", "kasa_trl in_place", "kasa_trl non_destructive"):
        memory = step[peer]["memory"]
        assert memory["peak_mb"] >= memory["before_mb"] > 0
    # Same targets and rank: KaSA adds exactly r singular values per layer to LoRA's A and B.
    assert step["kasa_trl in_place"]["trainable_params"] == step["PEFT KaSA"]["trainable_params"]

    load = {row["peer"]: row for row in bench["load_time"]["rows"]}
    assert load["kasa_trl load_kasa_adapter (in_place)"]["w_trunc_max_abs_diff"] == 0.0  # bit-identical

    merged = {row["peer"]: row for row in bench["merged_inference"]["rows"]}
    assert merged["kasa_trl merged (in_place)"]["merge_max_abs_diff"] < 1e-4

    zero3 = {row["ranks"]: row for row in bench["zero3_init"]["rows"]}
    assert set(zero3) == {1, 2}
    assert len(zero3[2]["decompose_s_per_rank"][0]) == 2
