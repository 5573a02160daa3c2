"""The example scripts run end to end (a few steps on the embedded tiny model) and save an adapter.

Each script runs as a subprocess with ``sys.executable``. Most of a run is importing torch / transformers / TRL,
single-threaded, so the three are started together (one thread each) and every test waits for its own.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kasa_trl import KaSAConfig, apply_kasa, save_kasa_adapter
from kasa_trl.tiny import build_tiny_llama, build_tokenizer

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start every example with ``--max_steps 3``; ``{script: (process, output_dir)}``."""
    root = tmp_path_factory.mktemp("examples")
    # An SFT adapter for dpo_llama.py's --sft_adapter: its untrained init is enough to exercise the merge.
    sft_adapter = root / "sft_adapter"
    save_kasa_adapter(
        apply_kasa(build_tiny_llama(len(build_tokenizer()), seed=0), KaSAConfig(r=4)), sft_adapter
    )
    extra = {
        "sft_llama.py": [],
        "dpo_llama.py": ["--sft_adapter", str(sft_adapter)],
        "custom_regularizer.py": [],
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = {}
    for script, args in extra.items():
        out = root / script.removesuffix(".py")
        command = [sys.executable, str(EXAMPLES / script), "--max_steps", "3", "--output_dir", str(out)]
        command += ["--disable_tqdm", "True", *args]
        process = subprocess.Popen(
            command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        started[script] = (process, out)
    yield started
    for process, _ in started.values():
        if process.poll() is None:
            process.kill()
            process.communicate()


def finish(runs, script):
    process, out = runs[script]
    stdout, stderr = process.communicate(timeout=TIMEOUT_S)
    assert process.returncode == 0, f"{script} exited with {process.returncode}:\n{stderr[-4000:]}"
    assert (out / "kasa_adapter.safetensors").is_file() and (out / "kasa_config.json").is_file()
    assert f"KaSA adapter saved to {out}" in stdout
    return stdout


@pytest.mark.slow
def test_sft_llama(runs):
    stdout = finish(runs, "sft_llama.py")
    assert "steps: 3" in stdout
    process, out = runs["sft_llama.py"]
    assert (out / "kasa_spectrum.jsonl").is_file()  # SpectrumCallback ran


@pytest.mark.slow
def test_dpo_llama(runs):
    stdout = finish(runs, "dpo_llama.py")
    assert "steps: 3" in stdout and "rewards/accuracies" in stdout


@pytest.mark.slow
def test_custom_regularizer(runs):
    stdout = finish(runs, "custom_regularizer.py")
    assert "kasa/update_frobenius:" in stdout
