"""The command line never destroys an input: outputs that overlap an input are refused, ``--overwrite`` replaces
only an earlier kasa_trl output, temporary names cannot be planted, and a killed writer's leftovers are cleaned
up (or named) by the next run.

Every refusal is checked against a snapshot of the whole workspace: not one byte changed. The killed writers are
real processes killed with SIGKILL; they import ``kasa_trl.atomic_outputs`` alone (standard library only), so
they cost no torch import.
"""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from kasa_trl import KaSAConfig, apply_kasa, save_kasa_adapter
from kasa_trl import atomic_outputs as atomic
from kasa_trl import cli as kasa_cli
from kasa_trl.atomic_files import host_tag
from kasa_trl.atomic_outputs import MANIFEST
from kasa_trl.integrations.peft import export_lora, export_peft_kasa
from kasa_trl.tiny import build_tiny_llama

from .conftest import VOCAB, randomize_adapters

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """run/adapter (+ run/notes.txt, and a link to store/real.bin inside the adapter), base/, alias -> run/adapter."""
    root = tmp_path_factory.mktemp("safety")
    build_tiny_llama(VOCAB, seed=0).save_pretrained(root / "base")
    model = apply_kasa(
        AutoModelForCausalLM.from_pretrained(root / "base"), KaSAConfig(r=2, target_modules=["q_proj"])
    )
    randomize_adapters(model, seed=3)
    save_kasa_adapter(model, root / "run" / "adapter")
    (root / "run" / "notes.txt").write_text("the user's notes")
    (root / "store").mkdir()
    (root / "store" / "real.bin").write_bytes(b"data kept elsewhere")
    (root / "run" / "adapter" / "linked.bin").symlink_to(root / "store" / "real.bin")
    (root / "alias").symlink_to(root / "run" / "adapter")
    return root


def _tree(root: Path) -> dict[str, bytes]:
    """Every file and link under ``root``: links as their target, files as their bytes."""
    return {
        str(p.relative_to(root)): b"-> " + os.readlink(p).encode() if p.is_symlink() else p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() or p.is_symlink()
    }


def _one_error(capsys, code: int) -> str:
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("kasa-trl: error: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "relation", "input_shown"),
    [
        # The reported case: OUT_DIR is the run directory that holds the adapter.
        (["export-lora", "{ws}/run/adapter", "{ws}/run", "--overwrite"], "contains", "{ws}/run/adapter"),
        (["export-lora", "{ws}/run/adapter", "{ws}/run/adapter/lora"], "lies inside", "{ws}/run/adapter"),
        (["export-lora", "{ws}/run/adapter", "{ws}/run/adapter/kasa_config.json"], "lies inside", "adapter"),
        (["export-peft-kasa", "{ws}/run/adapter", "{ws}/alias", "--overwrite"], "is", "{ws}/run/adapter"),
        (["export-peft-kasa", "{ws}/alias", "{ws}/run", "--overwrite"], "contains", "{ws}/alias"),
        # A file of the adapter that links elsewhere protects its target.
        (["export-lora", "{ws}/run/adapter", "{ws}/store", "--overwrite"], "contains", "{ws}/store/real.bin"),
        (["merge", "{ws}/run/adapter", "{ws}/base", "--base", "{ws}/base", "--overwrite"], "is", "{ws}/base"),
        (
            ["merge", "{ws}/run/adapter", "{ws}/base/merged", "--base", "{ws}/base"],
            "lies inside",
            "{ws}/base",
        ),
        (["merge", "{ws}/run/adapter", "{ws}", "--base", "{ws}/base", "--overwrite"], "contains", "{ws}/"),
        (["inspect", "{ws}/run/adapter", "--png", "{ws}/run/adapter/spectra.png"], "lies inside", "adapter"),
        (
            ["inspect", "{ws}/run/adapter", "--png", "{ws}/run/adapter/kasa_config.json"],
            "lies inside",
            "adapter",
        ),
        (["inspect", "{ws}/run/adapter", "--png", "{ws}/store/real.bin"], "is", "{ws}/store/real.bin"),
    ],
)
def test_an_output_overlapping_an_input_is_refused_and_nothing_changes(
    ws, capsys, argv, relation, input_shown
):
    before = _tree(ws)
    code = kasa_cli.main([a.format(ws=ws) for a in argv])
    line = _one_error(capsys, code)
    output = argv[2] if argv[0] != "inspect" else argv[-1]
    assert f"output {output.format(ws=ws)} {relation} " in line, line
    assert input_shown.format(ws=ws) in line and "nothing was written" in line, line
    assert _tree(ws) == before


@pytest.mark.parametrize("export", [export_lora, export_peft_kasa])
def test_the_python_exports_refuse_an_output_overlapping_an_input(ws, export):
    before = _tree(ws)
    with pytest.raises(
        ValueError, match=rf"output {re.escape(str(ws / 'run'))} contains .*adapter directory"
    ):
        export(ws / "run" / "adapter", ws / "run", overwrite=True)
    with pytest.raises(ValueError, match=r"output .*base is .*base \(the base model directory\)"):
        export(ws / "run" / "adapter", ws / "base", base_model_name_or_path=str(ws / "base"), overwrite=True)
    assert _tree(ws) == before


def test_overwrite_refuses_files_kasa_trl_did_not_write_or_that_changed(ws, capsys, tmp_path):
    out = tmp_path / "out"
    assert kasa_cli.main(["export-lora", str(ws / "run" / "adapter"), str(out)]) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["written_by"] == "kasa_trl"
    assert sorted(manifest["files"]) == ["adapter_config.json", "adapter_model.safetensors"]

    (out / "README.md").write_text("my notes on this export")
    before = _tree(out)
    code = kasa_cli.main(["export-lora", str(ws / "run" / "adapter"), str(out), "--overwrite"])
    assert "files kasa_trl did not write: README.md" in _one_error(capsys, code)
    assert _tree(out) == before

    (out / "README.md").unlink()
    config = out / "adapter_config.json"
    config.write_text(config.read_text().replace('"r": 4', '"r": 4 '))  # edited by hand: no longer ours
    before = _tree(out)
    code = kasa_cli.main(["export-lora", str(ws / "run" / "adapter"), str(out), "--overwrite"])
    assert "files changed since kasa_trl wrote them: adapter_config.json" in _one_error(capsys, code)
    assert _tree(out) == before


def test_overwrite_without_an_atomic_exchange_leaves_no_trace(ws, tmp_path, monkeypatch):
    out = tmp_path / "out"
    export_lora(ws / "run" / "adapter", out)
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)  # e.g. not Linux: two renames
    export_peft_kasa(ws / "run" / "adapter", out, overwrite=True)
    assert "kasa_config" in json.loads((out / "adapter_config.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --- planted links and killed writers -----------------------------------------------------------------------


def test_inspect_png_follows_no_planted_link_and_replaces_only_its_own_png(ws, capsys, tmp_path):
    config = ws / "run" / "adapter" / "kasa_config.json"
    before = _tree(ws)
    png = tmp_path / "spectra.png"
    planted = tmp_path / ".spectra.png.tmp"  # the fixed temporary name an earlier version wrote through
    planted.symlink_to(config)
    assert kasa_cli.main(["inspect", str(ws / "run" / "adapter"), "--png", str(png)]) == 0
    assert png.read_bytes().startswith(b"\x89PNG") and not png.is_symlink()
    assert planted.is_symlink() and os.readlink(planted) == str(config)
    assert _tree(ws) == before
    # Its own picture is replaced; any other file is not.
    assert kasa_cli.main(["inspect", str(ws / "run" / "adapter"), "--png", str(png)]) == 0
    other = tmp_path / "holiday.png"
    other.write_bytes(b"\x89PNG\r\n\x1a\nsomeone's picture")
    code = kasa_cli.main(["inspect", str(ws / "run" / "adapter"), "--png", str(other)])
    assert re.search(r"holiday.png exists and is not a PNG written by kasa_trl", _one_error(capsys, code))
    assert other.read_bytes() == b"\x89PNG\r\n\x1a\nsomeone's picture"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".spectra.png.tmp", "holiday.png", "spectra.png"]


_KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from kasa_trl import atomic_outputs as atomic
assert "torch" not in sys.modules
out, mode = Path(sys.argv[1]), sys.argv[2]
kill = lambda: os.kill(os.getpid(), signal.SIGKILL)
if mode == "directory":  # killed while writing the new output
    with atomic.atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "adapter_model.safetensors").write_bytes(b"half of it")
        kill()
elif mode == "between_renames":  # no atomic exchange; killed after moving the old output aside
    atomic._exchange = lambda a, b: False
    real_replace = os.replace
    def replace_then_die(src, dst):
        real_replace(src, dst)
        kill()
    os.replace = replace_then_die
    with atomic.atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "adapter_model.safetensors").write_bytes(b"new")
elif mode == "file":
    with atomic.atomic_output_file(out, is_ours=lambda path: True) as tmp:
        tmp.write_bytes(b"half a picture")
        kill()
"""


def _killed_writer(out: Path, mode: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _KILLED_WRITER, str(out), mode], cwd=REPO_ROOT, capture_output=True, timeout=60
    )
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()


def _hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_a_run_killed_while_writing_is_cleaned_up_by_the_next(ws, capsys, tmp_path):
    out = tmp_path / "lora"
    _killed_writer(out, "directory")
    [stale] = _hidden(tmp_path)
    assert stale.startswith(".lora.kasa-trl-") and stale.endswith(".tmp") and not out.exists()
    assert kasa_cli.main(["export-lora", str(ws / "run" / "adapter"), str(out)]) == 0
    err = capsys.readouterr().err
    assert f"kasa-trl: warning: removed {tmp_path / stale}, left by a kasa_trl process" in err, err
    assert _hidden(tmp_path) == [] and (out / MANIFEST).is_file()


def test_a_run_killed_between_its_two_renames_gets_the_previous_output_restored(ws, capsys, tmp_path):
    out = tmp_path / "lora"
    export_lora(ws / "run" / "adapter", out)
    previous = _tree(out)
    _killed_writer(out, "between_renames")
    assert not out.exists() and len(_hidden(tmp_path)) == 2  # the parked old output and the new one
    # The next run (here without --overwrite) puts the previous output back, then refuses to replace it.
    code = kasa_cli.main(["export-lora", str(ws / "run" / "adapter"), str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert f"kasa-trl: warning: restored the previous output {out}" in err and "removed" in err, err
    assert _tree(out) == previous and _hidden(tmp_path) == []


def test_a_killed_png_writer_is_cleaned_up_and_a_live_writers_file_is_left_alone(ws, capsys, tmp_path):
    png = tmp_path / "spectra.png"
    _killed_writer(png, "file")
    [stale] = _hidden(tmp_path)
    live = tmp_path / f".spectra.png.kasa-trl-{host_tag()}-{os.getpid()}-abcdefgh.tmp"
    live.write_bytes(b"being written by a process that still exists")
    assert kasa_cli.main(["inspect", str(ws / "run" / "adapter"), "--png", str(png)]) == 0
    err = capsys.readouterr().err
    assert f"removed {tmp_path / stale}" in err and f"left {live} alone: process {os.getpid()}" in err, err
    assert _hidden(tmp_path) == [live.name] and png.read_bytes().startswith(b"\x89PNG")
