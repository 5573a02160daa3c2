"""The benchmark scripts: their shared harness (alternation, paired ratios, forwarded options, fresh processes,
profiler scopes), that none patches the library, and that they run end to end (``run_all.py --quick``) and write
the JSON they promise.

Timings are never asserted: on a shared CI machine they mean nothing at --quick sizes.
"""

import ast
import json
import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile, record_function

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / "examples" / "benchmarks"
RUN_ALL = BENCH_DIR / "run_all.py"
BENCHMARKS = {"init_time", "zero3_init", "step_time", "load_time", "merged_inference"}
GOAL_KEYS = {"figure", "peer", "goal", "measured", "unit", "met", "note"}

sys.path.insert(0, str(BENCH_DIR))
import harness  # noqa: E402
import measure  # noqa: E402
import zero3_init  # noqa: E402

# -- the harness ----------------------------------------------------------------------------------------------


def test_compare_rotates_the_order_every_repetition(monkeypatch):
    calls = []
    monkeypatch.setattr(measure.gc, "collect", lambda: calls.append("gc"))
    times = measure.compare(
        ["a", "b", "c"], lambda peer, rep: calls.append((rep, peer)) or len(calls) / 2, 3, log=False
    )
    assert calls[::2] == ["gc"] * 9  # a collection before every measurement
    assert calls[1::2] == [
        (0, "a"),
        (0, "b"),
        (0, "c"),
        (1, "b"),
        (1, "c"),
        (1, "a"),
        (2, "c"),
        (2, "a"),
        (2, "b"),
    ]
    assert times.times == {"a": [1, 6, 8], "b": [2, 4, 9], "c": [3, 5, 7]}  # each peer's figures in rep order


def test_ratios_pair_repetitions_and_report_median_and_quartiles():
    times = measure.Comparison({"kasa": [1.0, 4.0, 9.0, 2.0, 5.0], "peft": [1.0, 2.0, 3.0, 1.0, 1.0]})
    ratio = times.ratio("kasa", "peft")
    assert ratio["per_rep"] == [1.0, 2.0, 3.0, 2.0, 5.0]  # rep by rep, not median over median (5 / 1)
    assert (ratio["median"], ratio["q1"], ratio["q3"], ratio["min"], ratio["max"]) == (
        2.0,
        2.0,
        3.0,
        1.0,
        5.0,
    )
    assert measure.quartiles(ratio) == "quartiles 2-3 over 5 repetitions"
    single = measure.Comparison({"a": [3.0], "b": [2.0]}).ratio("a", "b")
    assert single["median"] == single["q1"] == single["q3"] == 1.5


def test_shared_options_are_forwarded_only_when_given_and_parse_back():
    args = harness.parser("run all", repeats=0).parse_args(
        ["--quick", "--r", "8", "--cond", "1e4", "--threads", "2"]
    )
    argv = harness.shared_argv(args)
    assert argv == ["--quick", "--r", "8", "--threads", "2"]  # --cond 1e4 is the default: not repeated
    again = zero3_init.parser().parse_args(argv)
    assert (again.quick, again.r, again.threads, again.cond, again.repeats) == (True, 8, 2, 1e4, None)
    assert harness.repeats_from_args(again) == 1  # zero3_init's own --quick default


def test_a_fresh_process_returns_its_result_or_names_its_error():
    ctx = mp.get_context("fork")  # the benchmarks' forkserver only starts processes faster
    assert measure.in_fresh_process(ctx, int, "12") == 12
    with pytest.raises(RuntimeError, match=r"int\('x',\) failed in its process: ValueError: invalid literal"):
        measure.in_fresh_process(ctx, int, "x")


def _scoped_run() -> list[measure.Scope]:
    """The scopes of one simulated sharded apply_kasa: a group gathered and decomposed, then a fallback gather
    around a truncation, then a truncation alone."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with (
            record_function(zero3_init.SHARDED_DECOMPOSE),
            record_function(zero3_init.GATHER),
            record_function(zero3_init.DECOMPOSE),
        ):
            torch.ones(4).sum()
        with record_function(zero3_init.GATHER), record_function(zero3_init.TRUNCATE):
            torch.ones(4).sum()
        with record_function(zero3_init.TRUNCATE), record_function("not_ours"):
            torch.ones(4).sum()
    return measure.profiled_scopes(prof)


def test_profiled_scopes_keep_the_nesting_and_only_the_prefix():
    scopes = {(s.name, s.within) for s in _scoped_run()}
    assert scopes == {
        ("kasa_trl.sharded_decompose", ()),
        ("kasa_trl.gather", ("kasa_trl.sharded_decompose",)),
        ("kasa_trl.decompose", ("kasa_trl.gather", "kasa_trl.sharded_decompose")),
        ("kasa_trl.gather", ()),
        ("kasa_trl.truncate", ("kasa_trl.gather",)),
        ("kasa_trl.truncate", ()),
    }
    outer = next(s for s in _scoped_run() if s.name == "kasa_trl.sharded_decompose")
    assert [s.name for s in outer.inner] == ["kasa_trl.gather"]


def test_zero3_phases_count_each_scope_where_it_belongs():
    scopes = _scoped_run()
    seconds = {(s.name, s.within): s.seconds for s in scopes}
    phases = zero3_init.phases(scopes)
    assert (
        phases["decompose"]
        == seconds[("kasa_trl.decompose", ("kasa_trl.gather", "kasa_trl.sharded_decompose"))]
    )
    assert phases["sharded_decompose"] == seconds[("kasa_trl.sharded_decompose", ())]
    assert phases["truncation_gathers"] == seconds[("kasa_trl.gather", ())]  # not the schedule's own gather
    truncations = [s.seconds for s in scopes if s.name == "kasa_trl.truncate"]
    assert len(truncations) == 2 and phases["truncation"] == sum(truncations)
    assert zero3_init.phases([]) == dict.fromkeys(zero3_init.PHASES, 0.0)


def test_the_library_opens_the_scopes_zero3_init_reads(tiny_llama):
    from kasa_trl import KaSAConfig, apply_kasa

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        apply_kasa(tiny_llama, KaSAConfig(r=2, target_modules=["q_proj", "down_proj"], base_mode="in_place"))
    names = [s.name for s in measure.profiled_scopes(prof)]
    # One decomposition and one truncation per target; the gathers and the schedule only open under ZeRO-3
    # (the end-to-end run below checks those).
    assert sorted(set(names)) == [zero3_init.DECOMPOSE, zero3_init.TRUNCATE]
    assert (
        names.count(zero3_init.DECOMPOSE)
        == names.count(zero3_init.TRUNCATE)
        == 2 * tiny_llama.config.num_hidden_layers
    )


def _patched_library_names(tree: ast.Module) -> list[str]:
    """Assignments (``x.attr = ...``, ``setattr(x, ...)``) to anything imported from kasa_trl."""
    library = {"kasa_trl"}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kasa_trl"):
            library |= {alias.asname or alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            library |= {
                alias.asname or alias.name.split(".")[0]
                for alias in node.names
                if alias.name.startswith("kasa_trl")
            }
    patched = []
    for node in ast.walk(tree):
        targets = (
            node.targets
            if isinstance(node, ast.Assign)
            else [node.target]
            if isinstance(node, ast.AugAssign)
            else []
        )
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr":
            targets = [node.args[0]]
        for target in targets:
            while isinstance(target, (ast.Attribute, ast.Subscript)):
                target = target.value
                if isinstance(target, ast.Name) and target.id in library:
                    patched.append(ast.unparse(node).splitlines()[0])
    return patched


def test_no_benchmark_patches_the_library():
    patching = "import kasa_trl.model\nfrom kasa_trl import layer as L\nkasa_trl.model.gathered = None\nL.KaSALinear.__init__ = f\n"
    assert len(_patched_library_names(ast.parse(patching))) == 2  # the check sees both forms
    for path in sorted(BENCH_DIR.glob("*.py")):
        assert _patched_library_names(ast.parse(path.read_text())) == [], f"{path.name} patches kasa_trl"


# -- end to end -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    pytest.importorskip("peft")
    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, str(RUN_ALL), "--quick", "--out-dir", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (
        f"run_all --quick failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    assert (out / "quick.md").read_text().startswith("# KaSA benchmarks")
    return json.loads((out / "quick.json").read_text())


@pytest.mark.slow
def test_every_benchmark_ran(report):
    assert report["quick"] is True
    assert report["errors"] == {}
    assert set(report["benchmarks"]) == BENCHMARKS


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_benchmark_result_structure(report, name):
    result = report["benchmarks"][name]
    assert result["benchmark"] == name
    assert result["table"].startswith("| ")
    assert result["rows"] and result["goals"]
    assert result["environment"]["device"] == "cpu"
    assert result["settings"]["spec"]["hidden"] == 64  # --quick shapes


@pytest.mark.slow
def test_figures_are_sane(report):
    bench = report["benchmarks"]
    init = {row["peer"]: row for row in bench["init_time"]["rows"]}
    kasa = init["kasa_trl apply_kasa (auto)"]
    assert kasa["max_r_err"] < 1e-6  # accuracy is deterministic, unlike timings
    assert all(t > 0 for t in kasa["time_s"]["all"])
    ratio = kasa["ratio_to_peft"]
    assert ratio["min"] <= ratio["q1"] <= ratio["median"] <= ratio["q3"] <= ratio["max"]

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
    # The library's profiler scopes reached the benchmark: both ranks decomposed, inside the sharded schedule.
    for rank in zero3[2]["phases_per_rank"][0]:
        assert 0 < rank["decompose"] <= rank["sharded_decompose"]
