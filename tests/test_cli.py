"""The ``kasa-trl`` command line: in real processes (``python -m kasa_trl.cli``) and through ``main``.

The base model is a tiny Llama saved with ``save_pretrained`` (plus its tokenizer) in a temporary directory, as a
Hub checkpoint would be. Every subprocess pays for importing kasa_trl (torch, transformers and, through the
callbacks, peft: about 7 s of CPU on the shared 2-core machine), so there are three, started together in the
background, and the rest of the matrix (every command, every bad input) runs in-process through ``main``
meanwhile.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kasa_trl import KaSAConfig, apply_kasa, load_kasa_adapter, save_kasa_adapter
from kasa_trl import cli as kasa_cli
from kasa_trl.adapter_io import ADAPTER_FILE
from kasa_trl.atomic_outputs import MANIFEST
from kasa_trl.tiny import build_tiny_gpt2, build_tiny_llama, build_tokenizer

from .conftest import randomize_adapters

REPO_ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "TQDM_DISABLE": "1",
    "HF_HUB_OFFLINE": "1",
    "PYTHONWARNINGS": "ignore",
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny matrices: a second OpenMP thread only adds synchronisation, 10-50x slower on a shared 2-core CPU.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """base/ (model + tokenizer), other_base/ (same architecture, other weights), gpt2_base/, adapter/, nonempty/, out/."""
    root = tmp_path_factory.mktemp("cli")
    tokenizer = build_tokenizer()
    build_tiny_llama(len(tokenizer), seed=0).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    build_tiny_llama(len(tokenizer), seed=1).save_pretrained(root / "other_base")
    build_tiny_gpt2(len(tokenizer)).save_pretrained(root / "gpt2_base")
    # r=3: the exported LoRA has rank 6, which --pad-to-rank vllm pads to 8.
    model = apply_kasa(AutoModelForCausalLM.from_pretrained(root / "base"), KaSAConfig(r=3, lora_alpha=6))
    randomize_adapters(model, seed=5)
    save_kasa_adapter(model, root / "adapter")
    (root / "nonempty").mkdir()
    (root / "nonempty" / "keep.txt").write_text("previous")
    (root / "out").mkdir()
    (root / "logs").mkdir()
    return root


def _subprocess_cases(ws: Path) -> dict[str, list[str]]:
    """Real processes for three commands, one on bad input (exit 2); each costs a torch import (~7 s CPU)."""
    adapter, base, out = str(ws / "adapter"), str(ws / "base"), ws / "out"
    return {
        "export_lora": ["export-lora", adapter, str(out / "lora"), "--base", base, "--pad-to-rank", "vllm"],
        "merge": ["merge", adapter, str(out / "merged")],  # the base the adapter records
        "export_peft_kasa_wrong_base": [
            "export-peft-kasa",
            adapter,
            str(out / "wrong"),
            "--base",
            str(ws / "gpt2_base"),
            "--force-base",
        ],
    }


class _Runs:
    """Subprocesses started together; ``runs[name]`` waits for one and returns its ``CompletedProcess``."""

    def __init__(self, logs: Path, cases: dict[str, list[str]]) -> None:
        self._procs = {}
        for name, argv in cases.items():
            cmd = [sys.executable, "-m", "kasa_trl.cli", *argv]
            paths = (logs / f"{name}.stdout", logs / f"{name}.stderr")
            with open(paths[0], "w") as out, open(paths[1], "w") as err:
                proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=ENV, stdout=out, stderr=err)
            self._procs[name] = (cmd, proc, paths)
        self._results: dict[str, subprocess.CompletedProcess] = {}

    def __getitem__(self, name: str) -> subprocess.CompletedProcess:
        if name not in self._results:
            cmd, proc, (out, err) = self._procs[name]
            proc.wait(timeout=300)
            self._results[name] = subprocess.CompletedProcess(
                cmd, proc.returncode, out.read_text(), err.read_text()
            )
        return self._results[name]

    def wait_all(self) -> None:
        for name in self._procs:
            self[name]

    def kill(self) -> None:
        for _, proc, _ in self._procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module", autouse=True)
def runs(ws):
    """Start every subprocess case as soon as the workspace exists; the in-process tests run meanwhile."""
    started = _Runs(ws / "logs", _subprocess_cases(ws))
    yield started
    started.kill()


def _ok(result):
    assert result.returncode == 0, (
        f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _assert_one_line_error(code, stderr, message):
    assert code == 2, f"exit {code}\nstderr:\n{stderr}"
    assert "Traceback" not in stderr
    error_lines = [line for line in stderr.splitlines() if line.startswith("kasa-trl: error: ")]
    assert len(error_lines) == 1 and re.search(message, error_lines[0]), stderr


@pytest.fixture(scope="module")
def kasa_logits(ws):
    """Logits of the adapter loaded onto the base in-process: what every exported artifact must reproduce."""
    ids = torch.randint(4, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    model = load_kasa_adapter(AutoModelForCausalLM.from_pretrained(ws / "base").eval(), ws / "adapter")
    return ids, _logits(model, ids)


# --- in-process through main(), while the subprocesses run: the rest of the matrix ----------------------


def test_help_and_a_torch_free_cli_module(capsys):
    with pytest.raises(SystemExit) as exit_info:
        kasa_cli.main(["--help"])
    assert exit_info.value.code == 0
    usage = capsys.readouterr().out
    assert all(cmd in usage for cmd in ("export-lora", "export-peft-kasa", "merge", "inspect"))
    # kasa_trl.cli imports no torch/transformers (nor does the package, whose names load lazily): --help is cheap.
    probe = (
        "import sys, kasa_trl.cli; "
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'safetensors') if m in sys.modules); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, env=ENV, check=True, timeout=60)
    assert kasa_cli._ADAPTER_FILE == ADAPTER_FILE


def test_inspect_json_reports_every_layer(ws, capsys):
    assert kasa_cli.main(["inspect", str(ws / "adapter"), "--json", "--top", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["config"]["r"] == 3 and len(report["layers"]) == 14
    for layer in report["layers"]:
        assert (layer["r"], layer["n_removed"], len(layer["delta_singular_values"])) == (3, 3, 2)
        assert layer["abs_diag_min"] <= layer["abs_diag_mean"] <= layer["abs_diag_max"]
        assert layer["delta_singular_values"][0] <= layer["delta_norm"] + 1e-12


def test_export_peft_kasa_loads_in_peft(ws, capsys, kasa_logits):
    peft = pytest.importorskip("peft")
    if not hasattr(peft, "KasaConfig"):
        pytest.skip("needs peft >= 0.21")
    out = ws / "out" / "peft_kasa"
    assert kasa_cli.main(["export-peft-kasa", str(ws / "adapter"), str(out), "--base", str(ws / "base")]) == 0
    assert "PeftModel.from_pretrained" in capsys.readouterr().out
    ids, expected = kasa_logits
    loaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ws / "base"), out).eval()
    diff = (_logits(loaded, ids) - expected).abs().max().item()
    print(f"\nkasa-trl export-peft-kasa: max abs diff {diff:.3g}")
    assert diff <= TOL, f"max abs diff {diff:.3g} > {TOL}"


def test_inspect_prints_a_table_and_saves_a_png(ws, capsys, tmp_path):
    assert kasa_cli.main(["inspect", str(ws / "adapter"), "--png", str(tmp_path / "spectra.png")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "14 KaSA layers" in lines[0] and lines[1].split()[:3] == ["layer", "r", "n"]
    assert sum(line.startswith("model.layers.") for line in lines) == 14
    assert (tmp_path / "spectra.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["spectra.png"]


def test_inspect_png_without_matplotlib_is_bad_usage_and_writes_nothing(ws, capsys, tmp_path, monkeypatch):
    # An import of a module set to None in sys.modules raises ModuleNotFoundError.
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    assert kasa_cli.main(["inspect", str(ws / "adapter"), "--png", str(tmp_path / "spectra.png")]) == 2
    assert "kasa-trl: error: --png needs matplotlib: pip install 'kasa_trl[plots]'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["export-lora", "{base}", "{out}/x"], "is not a kasa_trl adapter directory"),
        (["export-lora", "{peft}", "{out}/x"], "it holds a PEFT adapter"),
        # A --base other than the one the adapter records is refused, unless forced; then its weights are checked.
        (
            ["merge", "{adapter}", "{out}/m", "--base", "{ws}/other_base"],
            "trained on base model '.*/base', not '.*/other_base'; .*--force-base",
        ),
        (
            ["merge", "{adapter}", "{out}/m", "--base", "{ws}/other_base", "--force-base"],
            "fingerprint mismatch",
        ),
        (
            ["export-lora", "{adapter}", "{out}/x", "--base", "{ws}/gpt2_base", "--force-base"],
            "does not fit base model .*gpt2_base: .*which GPT2LMHeadModel does not have",
        ),
        # The base weights are checked as load_kasa_adapter checks them, not only the architecture.
        (
            ["export-lora", "{adapter}", "{out}/x", "--base", "{ws}/other_base", "--force-base"],
            "does not fit base model .*other_base: .*fingerprint mismatch",
        ),
        (
            ["export-peft-kasa", "{adapter}", "{out}/x", "--base", "{ws}/other_base", "--force-base"],
            "does not fit base model .*fingerprint mismatch",
        ),
        (
            ["merge", "{adapter}", "{out}/m", "--base", "{ws}/no_such_base", "--force-base"],
            "base model directory .* does not exist",
        ),
        (["export-lora", "{adapter}", "{out}/x", "--pad-to-rank", "4"], "below the exported rank 6"),
        (
            ["export-lora", "{adapter}", "{adapter}"],
            "output .*adapter is .*adapter \\(the adapter directory\\)",
        ),
        (["export-lora", "{adapter}", "{ws}/nonempty/keep.txt"], "exists and is not a directory"),
        (["inspect", "{ws}/nonempty/keep.txt"], "is not a directory"),
        (["inspect", "{ws}/missing"], "adapter directory .*missing does not exist"),
        (["export-peft-kasa", "{adapter}", "{ws}/nonempty"], "exists and is not empty; .*--overwrite"),
    ],
)
def test_more_bad_inputs_exit_2_with_one_line(ws, capsys, argv, message):
    (ws / "peft").mkdir(exist_ok=True)
    (ws / "peft" / "adapter_config.json").write_text("{}")
    paths = {"adapter": ws / "adapter", "out": ws / "out", "base": ws / "base", "peft": ws / "peft", "ws": ws}
    code = kasa_cli.main([a.format(**paths) for a in argv])
    _assert_one_line_error(code, capsys.readouterr().err, message)
    assert not (ws / "out" / "x").exists() and not (ws / "out" / "m").exists()
    assert sorted(p.name for p in (ws / "nonempty").iterdir()) == ["keep.txt"]


def test_the_recorded_base_is_the_default_and_the_same_directory_under_another_name_is_no_conflict(
    ws, capsys, tmp_path
):
    out = tmp_path / "lora"
    assert kasa_cli.main(["export-lora", str(ws / "adapter"), str(out)]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        ws / "base"
    )
    (tmp_path / "link").symlink_to(ws / "base")
    for i, same in enumerate((f"{ws / 'base'}/", str(tmp_path / "link"))):
        out = tmp_path / f"k{i}"
        assert kasa_cli.main(["export-peft-kasa", str(ws / "adapter"), str(out), "--base", same]) == 0
        assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == same
    assert "warning" not in capsys.readouterr().err


def test_merge_without_base_needs_an_adapter_that_records_one(ws, capsys, tmp_path):
    model = apply_kasa(build_tiny_llama(64, seed=0), KaSAConfig(r=2, target_modules=["q_proj"]))
    adapter = save_kasa_adapter(model, tmp_path / "adapter")  # a model built in code has no name to record
    code = kasa_cli.main(["merge", str(adapter), str(tmp_path / "merged")])
    _assert_one_line_error(code, capsys.readouterr().err, "does not record its base model; pass --base MODEL")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["merge", "adapter"], "the following arguments are required: OUT_DIR"),
        (["export-lora", "adapter", "out", "--pad-to-rank", "0"], "expected a positive integer"),
        (["convert", "adapter"], "invalid choice: 'convert'"),
    ],
)
def test_usage_errors_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        kasa_cli.main(argv)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_failure_while_writing_leaves_the_previous_output(ws, capsys, monkeypatch, tmp_path):
    from transformers import PreTrainedModel

    out = tmp_path / "previous"
    assert kasa_cli.main(["export-peft-kasa", str(ws / "adapter"), str(out)]) == 0
    before = _tree(out)

    def half_write(self, directory, **kwargs):
        (Path(directory) / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", half_write)
    code = kasa_cli.main(["merge", str(ws / "adapter"), str(out), "--base", str(ws / "base"), "--overwrite"])
    assert code == 1
    err = capsys.readouterr().err
    assert "RuntimeError: killed mid-write" in err and "KASA_TRL_DEBUG" in err and "Traceback" not in err
    assert _tree(out) == before  # the old output is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["previous"]  # no temporary directory left behind


def test_overwrite_replaces_only_an_earlier_kasa_trl_output(ws, capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    code = kasa_cli.main(["export-peft-kasa", str(ws / "adapter"), str(out), "--overwrite"])
    _assert_one_line_error(code, capsys.readouterr().err, "not written by kasa_trl .* holds stale.txt")
    assert (out / "stale.txt").read_text() == "old"
    (out / "stale.txt").unlink()
    assert kasa_cli.main(["export-peft-kasa", str(ws / "adapter"), str(out), "--overwrite"]) == 0
    written = ["adapter_config.json", "adapter_model.safetensors", MANIFEST]
    assert sorted(p.name for p in out.iterdir()) == sorted(written)
    # Its own earlier output is replaced (here by another command's).
    assert kasa_cli.main(["export-lora", str(ws / "adapter"), str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(written)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 6  # export-lora's rank r + n


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (links as their target path), to compare a directory before and after."""
    return {
        str(p.relative_to(root)): os.readlink(p).encode() if p.is_symlink() else p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() or p.is_symlink()
    }


# --- real processes: python -m kasa_trl.cli (started by the `runs` fixture) --------------------------------


def test_export_lora_writes_an_exact_peft_lora(runs, ws, kasa_logits):
    peft = pytest.importorskip("peft")
    _ok(runs["export_lora"])
    out = ws / "out" / "lora"
    assert "--max-lora-rank 8" in runs["export_lora"].stdout
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (8, 8, str(ws / "base"))
    ids, expected = kasa_logits
    served = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ws / "base"), out).eval()
    diff = (_logits(served, ids) - expected).abs().max().item()
    print(f"\nkasa-trl export-lora: max abs diff {diff:.3g}")
    assert diff <= TOL, f"max abs diff {diff:.3g} > {TOL}"


def test_merge_saves_a_plain_model_with_the_tokenizer(runs, ws, kasa_logits):
    _ok(runs["merge"])
    out = ws / "out" / "merged"
    ids, expected = kasa_logits
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    diff = (_logits(merged, ids) - expected).abs().max().item()
    print(f"\nkasa-trl merge: max abs diff {diff:.3g}")
    assert diff <= TOL, f"max abs diff {diff:.3g} > {TOL}"
    assert (
        AutoTokenizer.from_pretrained(out).get_vocab()
        == AutoTokenizer.from_pretrained(ws / "base").get_vocab()
    )


def test_bad_input_in_a_real_process_exits_2_with_one_line(runs, ws):
    result = runs["export_peft_kasa_wrong_base"]
    _assert_one_line_error(
        result.returncode, result.stderr, "does not fit base model .*gpt2_base: .* does not have"
    )
    assert not (ws / "out" / "wrong").exists()


def test_no_temporary_directories_are_left_behind(runs, ws):
    runs.wait_all()
    for directory in (ws, ws / "out"):
        leftovers = [p.name for p in directory.iterdir() if p.name.startswith(".")]
        assert leftovers == [], leftovers
