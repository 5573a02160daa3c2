"""The example scripts: their command line (bare boolean flags, defaults and --help, output folders, the DeepSpeed
launcher's default config, a stale DeepSpeed build lock) and end-to-end runs on the embedded tiny model.

The runs start each script as a subprocess (in its own process group, killed whole on a timeout or a Ctrl-C)
with ``sys.executable``. Most of a run is importing torch / transformers / TRL, single-threaded, so the three are
started together (one thread each) and every test waits for its own. Parsing is tested in this process, except
where a DeepSpeed config is parsed: that leaves a process-wide ZeRO-3 flag in transformers, so it runs apart.
"""

import importlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from kasa_trl import KaSAConfig, apply_kasa, save_kasa_adapter
from kasa_trl.adapter_io import read_adapter_info
from kasa_trl.tiny import build_tiny_llama, build_tokenizer

from .distributed import processes

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TIMEOUT_S = 240
SCRIPTS = ("sft_llama", "dpo_llama", "custom_regularizer")


@pytest.fixture(scope="module")
def examples(monkeypatch_module):
    """``{script name: module}``, imported from examples/ (their ``_common`` on ``sys.path``)."""
    monkeypatch_module.syspath_prepend(str(EXAMPLES))
    return {name: importlib.import_module(name) for name in SCRIPTS}


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture
def clean_env(monkeypatch):
    """No launcher variables; whatever parsing sets in the environment (OMP_NUM_THREADS, DS_ACCELERATOR) is undone
    after the test."""
    saved = dict(os.environ)
    for name in ("CROSS_RANK", "CROSS_SIZE", "LOCAL_SIZE", "RANK", "LOCAL_RANK"):
        os.environ.pop(name, None)
    yield monkeypatch
    os.environ.clear()
    os.environ.update(saved)


# -- command line ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", SCRIPTS)
def test_boolean_flags_work_bare(examples, clean_env, script):
    """`--bf16` alone means True, as in TRL's scripts (transformers gives `bool | None` fields no bare form)."""
    _, args = examples[script].parse_command_line(
        ["--bf16", "--activation_checkpointing", "--disable_tqdm", "--logging_first_step"]
    )
    assert (args.bf16, args.activation_checkpointing, args.disable_tqdm, args.logging_first_step) == (
        True, True, True, True,
    )  # fmt: skip
    _, args = examples[script].parse_command_line(["--bf16", "False", "--disable_tqdm", "false"])
    assert (args.bf16, args.disable_tqdm) == (False, False)


def test_defaults_raise_no_deprecation_warning(examples, clean_env):
    """TRL's configs give the deprecated gradient_checkpointing a value; the scripts move it to the new name, for
    the embedded model (off) and a real one (TRL's default, on), and a user's own flag still decides."""
    parse = examples["sft_llama"].parse_command_line
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, tiny = parse([])
        _, real = parse(["--model_name_or_path", "some/model"])
    assert [str(w.message) for w in caught if "checkpointing" in str(w.message)] == []
    assert (tiny.activation_checkpointing, tiny.gradient_checkpointing) == (False, False)
    assert (real.activation_checkpointing, real.gradient_checkpointing) == (True, True)
    assert real.learning_rate == 2e-5 and real.max_steps == -1  # TRL's defaults with a real model
    assert (tiny.learning_rate, tiny.max_steps) == (1e-2, 100)
    with pytest.warns(
        FutureWarning, match="gradient_checkpointing"
    ):  # the user's own deprecated flag: theirs
        _, user = parse(["--model_name_or_path", "some/model", "--no_gradient_checkpointing"])
    assert user.activation_checkpointing is False


def test_help_gives_both_defaults(examples, clean_env, capsys):
    parse = examples["sft_llama"].parse_command_line
    with pytest.raises(SystemExit) as exit_info:
        parse(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 100 for the embedded tiny model; with --model_name_or_path: -1)" in text
    assert "(default: 0.01 for the embedded tiny model; with --model_name_or_path: 2e-05)" in text
    assert "(default: constant for the embedded tiny model; with --model_name_or_path: linear)" in text
    with pytest.raises(SystemExit):
        parse(["--model_name_or_path", "some/model", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: -1 with --model_name_or_path; for the embedded tiny model: 100)" in text


def test_each_kind_of_run_has_its_own_output_dir(examples, clean_env):
    common = sys.modules["_common"]
    assert common.default_output_dir("sft_llama", None, None) == "outputs/sft_llama"
    assert (
        common.default_output_dir("sft_llama", None, "deepspeed_configs/zero3.json")
        == "outputs/sft_llama-zero3"
    )
    assert (
        common.default_output_dir("sft_llama", "meta-llama/Llama-3.2-1B/", "zero2.json")
        == "outputs/sft_llama-Llama-3.2-1B-zero2"
    )
    _, args = examples["dpo_llama"].parse_command_line([])
    assert args.output_dir == "outputs/dpo_llama"
    assert common.default_output_dir("sft_llama", None, None, distributed=True) == "outputs/sft_llama-ddp"
    assert (
        common.default_output_dir("sft_llama", None, "zero3.json", distributed=True)
        == "outputs/sft_llama-zero3"
    )


def test_the_summary_of_a_single_logged_step_says_so(examples, capsys):
    from types import SimpleNamespace

    common = sys.modules["_common"]

    def trainer(history):
        state = SimpleNamespace(global_step=len(history), log_history=history)
        return SimpleNamespace(state=state, is_world_process_zero=lambda: True)

    common.print_summary(trainer([{"loss": 5.4, "step": 1}]), "out")
    assert "loss: 5.4 (one logged step)\n" in capsys.readouterr().out
    common.print_summary(trainer([{"loss": 5.4, "step": 1}, {"loss": 4.5, "step": 2}]), "out")
    assert "loss: 5.4000 (first log) -> 4.5000 (last log)\n" in capsys.readouterr().out


def test_no_default_zero3_has_its_own_help(examples, capsys):
    with pytest.raises(SystemExit):
        examples["sft_llama"].parse_command_line(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert (
        "--no_default_zero3, --no-default-zero3 Train plain DDP under the deepspeed launcher when no --deepspeed "
        "config is given." in text
    )
    assert text.count("train with ZeRO-3") == 1


def test_rerun_announces_that_it_replaces_the_previous_run(examples, clean_env, tmp_path, capsys):
    common = sys.modules["_common"]
    script_args, args = examples["sft_llama"].parse_command_line(["--output_dir", str(tmp_path)])
    common.prepare_run(script_args, args)
    assert "replaces" not in capsys.readouterr().out
    (tmp_path / "kasa_adapter.safetensors").write_bytes(b"earlier run")
    common.prepare_run(script_args, args)
    assert f"{tmp_path} holds an earlier run: this run replaces it" in capsys.readouterr().out
    assert (tmp_path / "kasa_adapter.safetensors").read_bytes() == b"earlier run"  # replaced by training only


def test_stale_deepspeed_build_lock_stops_the_run_with_the_fix(examples, clean_env, tmp_path):
    """A lock left by a killed build: the script exits at once naming the file and the command, not waiting
    forever as DeepSpeed would; the lock is left where it is (removing it is the user's call)."""
    common = sys.modules["_common"]
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    lock.touch()
    clean_env.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    script_args, args = examples["sft_llama"].parse_command_line(["--output_dir", str(tmp_path / "out")])
    args.deepspeed = "deepspeed_configs/zero3.json"  # as parsed from --deepspeed (not parsed here: see above)
    with pytest.raises(SystemExit) as exit_info:
        common.prepare_run(script_args, args)
    assert f"rm {lock}" in str(exit_info.value.code) and "killed" in str(exit_info.value.code)
    assert lock.is_file()
    clean_env.setenv("LOCAL_RANK", "1")  # the other ranks of the node stop too, without repeating the message
    with pytest.raises(SystemExit) as exit_info:
        common.prepare_run(script_args, args)
    assert exit_info.value.code == 1 and lock.is_file()


def test_first_deepspeed_cpu_build_is_announced_and_needs_a_compiler(examples, clean_env, tmp_path, capsys):
    common = sys.modules["_common"]
    clean_env.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # nothing built there yet
    script_args, args = examples["sft_llama"].parse_command_line(["--output_dir", str(tmp_path / "out")])
    args.deepspeed = "deepspeed_configs/zero3.json"
    common.prepare_run(script_args, args)
    assert (
        f"DeepSpeed is compiling its CPU op (deepspeed_shm_comm) into {tmp_path}" in capsys.readouterr().out
    )
    clean_env.setenv("CXX", "no-such-compiler")
    with pytest.raises(SystemExit) as exit_info:
        common.prepare_run(script_args, args)
    assert "needs a C++ compiler" in str(exit_info.value.code) and "no-such-compiler" in str(
        exit_info.value.code
    )
    (tmp_path / "deepspeed_shm_comm").mkdir()
    (tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").touch()
    common.prepare_run(script_args, args)  # built: no compiler needed, nothing announced
    assert "compiling" not in capsys.readouterr().out


DEEPSPEED_PARSE = """
import contextlib, io, json, os, sys
sys.path.insert(0, sys.argv[1])
import sft_llama
out = {}
for case, env, argv in json.loads(sys.argv[2]):
    for name in ("CROSS_RANK", "CROSS_SIZE", "LOCAL_SIZE"):
        os.environ.pop(name, None)
    os.environ.update(env)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        _, args = sft_llama.parse_command_line(argv)
    out[case] = [args.deepspeed, args.output_dir, printed.getvalue()]
print(json.dumps(out))
"""


@pytest.mark.slow
def test_deepspeed_launcher_without_a_config_uses_zero3(tmp_path):
    """Under the deepspeed launcher (its environment), no --deepspeed means the shipped ZeRO-3 config;
    --no_default_zero3 opts out; an explicit config wins; outside the launcher nothing changes."""
    launcher = {"CROSS_RANK": "0", "CROSS_SIZE": "1", "LOCAL_SIZE": "1"}
    cases = [
        ("launcher", launcher, []),
        ("opt_out", launcher, ["--no_default_zero3"]),
        ("explicit", launcher, ["--deepspeed", "deepspeed_configs/zero2.json"]),
        ("explicit_zero3", launcher, ["--deepspeed", "deepspeed_configs/zero3.json"]),
        ("plain", {}, []),
    ]
    proc = processes.run(
        [sys.executable, "-c", DEEPSPEED_PARSE, str(EXAMPLES), json.dumps(cases)],
        timeout=TIMEOUT_S,
        cwd=EXAMPLES.parent,
        env={**os.environ, "DS_ACCELERATOR": "cpu"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    announced = (
        "DeepSpeed launcher: ZeRO-3 with deepspeed_configs/zero3.json (the default when no --deepspeed is "
        "given; --no_default_zero3 trains plain DDP instead)\n"
    )
    assert result == {
        "launcher": ["deepspeed_configs/zero3.json", "outputs/sft_llama-zero3", announced],
        # plain DDP under the launcher: its own folder, not the single-process demo's
        "opt_out": [None, "outputs/sft_llama-ddp", ""],
        "explicit": ["deepspeed_configs/zero2.json", "outputs/sft_llama-zero2", ""],
        # the default file given explicitly: not called the default
        "explicit_zero3": ["deepspeed_configs/zero3.json", "outputs/sft_llama-zero3", ""],
        "plain": [None, "outputs/sft_llama", ""],
    }


# -- end-to-end runs ---------------------------------------------------------------------------------------------
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
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    env.pop("OMP_NUM_THREADS", None)  # as a user runs them: the scripts pick one thread themselves
    started = {}
    for script, args in extra.items():
        out = root / script.removesuffix(".py")
        command = [sys.executable, str(EXAMPLES / script), "--max_steps", "3", "--output_dir", str(out)]
        command += ["--disable_tqdm", *args]  # bare boolean flag
        process = processes.start(
            command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        started[script] = (process, out)
    yield started
    for process, _ in started.values():
        processes.stop(process)


def finish(runs, script):
    process, out = runs[script]
    stdout, stderr = processes.finish(process, TIMEOUT_S)
    assert process.returncode == 0, f"{script} exited with {process.returncode}:\n{stderr[-4000:]}"
    assert (out / "kasa_adapter.safetensors").is_file() and (out / "kasa_config.json").is_file()
    assert f"KaSA adapter saved to {out}" in stdout
    # No noise from the project's own choices (transformers' deprecation of gradient_checkpointing, DeepSpeed's
    # accelerator guess, a progress bar for saving the base).
    for noise in (
        "FutureWarning",
        "gradient_checkpointing",
        "Setting accelerator to CPU",
        "Writing model shards",
    ):
        assert noise not in stderr + stdout, f"{script} printed {noise!r}:\n{stderr[-4000:]}"
    return stdout


def assert_embedded_base(out: Path, merged_sft: bool = False) -> None:
    """``<out>/base`` holds the embedded base the adapter was trained on (its config names the folder)."""
    base = out / "base"
    model = AutoModelForCausalLM.from_pretrained(base)
    reference = build_tiny_llama(len(build_tokenizer()), seed=0).state_dict()
    saved = load_file(base / "model.safetensors")
    same = all(torch.equal(saved[k], reference[k]) for k in saved)
    assert same != merged_sft  # the DPO base after merging an SFT adapter differs from the raw tiny Llama
    assert set(saved) <= set(reference) and model.config.vocab_size == len(build_tokenizer())
    assert (base / "tokenizer.json").is_file()


@pytest.mark.slow
def test_sft_llama(runs):
    stdout = finish(runs, "sft_llama.py")
    assert "steps: 3" in stdout
    process, out = runs["sft_llama.py"]
    assert (out / "kasa_spectrum.jsonl").is_file()  # SpectrumCallback ran
    assert_embedded_base(out)
    assert f"its base model saved to {out / 'base'}" in stdout
    # The adapter records that folder: kasa-trl merge / export-lora need no --base.
    assert read_adapter_info(out).base_model_name_or_path == str((out / "base").resolve())


@pytest.mark.slow
def test_dpo_llama(runs):
    stdout = finish(runs, "dpo_llama.py")
    assert "steps: 3" in stdout and "rewards/accuracies" in stdout
    # The SFT adapter's untrained init has dW = 0, but its truncation is merged: the DPO base is W_trunc.
    assert_embedded_base(runs["dpo_llama.py"][1], merged_sft=True)


@pytest.mark.slow
def test_custom_regularizer(runs):
    stdout = finish(runs, "custom_regularizer.py")
    assert "kasa/update_frobenius:" in stdout
