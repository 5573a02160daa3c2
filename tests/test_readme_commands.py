"""Every shell command line in README.md's ```bash blocks works as written.

Each line (comments dropped, backslash continuations joined, ``a && b`` split, ``[--optional parts]`` tried both
without and with, ``...`` placeholders dropped, ``VAR=value`` prefixes kept as its environment) is checked by
what it runs:

- ``make TARGET [VAR=value]``: ``make -n`` (a dry run) finds the target.
- ``kasa-trl ...``: the CLI's own parser accepts it; run for real when its adapter exists (one the README's
  embedded example runs wrote) and its ``--base``, if any, is a local folder.
- ``python`` / ``.venv/bin/python SCRIPT ...``: the script's own parser accepts the arguments; an example on the
  embedded tiny model (no ``--model_name_or_path``) also runs, with ``--max_steps 2`` appended, in a folder laid
  out like a fresh clone, and its chain (``&&``) runs in order. ``python -m MODULE`` must name an importable module.
- ``deepspeed`` / ``torchrun`` / ``accelerate launch`` ``... SCRIPT ...``: the launcher's parser accepts its part
  and the script's parser the rest, in the environment that launcher gives its ranks (under ``deepspeed`` with
  no ``--deepspeed``, the example must still pick a ZeRO config).
- ``git``, ``cd``, ``pip``, ``rm``, ``export``...: recognized and not run. Any other command fails the test:
  teach this file how to check it.

Parsing happens in one subprocess (a DeepSpeed config leaves process-wide state in transformers).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .distributed import processes

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
EXAMPLES = ROOT / "examples"
# What a fresh clone's README commands see besides the installed package.
CLONE_ENTRIES = ("examples", "deepspeed_configs", "integrations", "Makefile", "pyproject.toml", ".venv")
PYTHONS = {"python", "python3", ".venv/bin/python", "./.venv/bin/python"}
LAUNCHERS = {"deepspeed", "torchrun", "accelerate"}
NOT_RUN = {"git", "cd", "pip", "pip3", "rm", "export", "source", "ls", "cat", "mkdir", "nvidia-smi", "uv"}
TIMEOUT_S = 600
RUN_STEPS = ["--max_steps", "2"]


@dataclass
class Command:
    """One command of a README line: ``argv`` after the ``VAR=value`` prefixes (``env``)."""

    line: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)

    @property
    def program(self) -> str:
        # `.venv/bin/kasa-trl` is how a README reader runs a tool `make venv` installed: the tool itself.
        first = self.argv[0]
        for prefix in (".venv/bin/", "./.venv/bin/"):
            if first.startswith(prefix) and first not in PYTHONS:
                return first[len(prefix) :]
        return first


def bash_lines(markdown: str) -> list[str]:
    """The command lines of every ```bash / ```sh / ```shell block, continuations joined, comment lines out."""
    lines = []
    for block in re.findall(r"^```(?:bash|sh|shell)[ \t]*\n(.*?)^```", markdown, flags=re.S | re.M):
        joined = re.sub(r"\\\n", " ", block)
        for line in joined.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def expand_optional(line: str) -> list[str]:
    """``cmd [--a] [--b x]`` -> ``cmd``, ``cmd --a --b x`` (a usage line's optional parts: none, then all)."""
    if not re.search(r"\[[^\]]*\]", line):
        return [line]
    without = re.sub(r"\s*\[[^\]]*\]", "", line)
    with_all = re.sub(r"\[([^\]]*)\]", r"\1", line)
    return [without, with_all]


def parse_line(line: str) -> list[list[Command]]:
    """The chains of ``line``: one per optional-part variant, each a list of commands joined by ``&&``."""
    chains = []
    for variant in expand_optional(line):
        words = [w for w in shlex.split(variant, comments=True) if w != "..."]
        chain, current = [], []
        for word in [*words, "&&"]:
            if word != "&&":
                current.append(word)
                continue
            env = {}
            while current and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", current[0]):
                name, _, value = current.pop(0).partition("=")
                env[name] = value
            if current:
                chain.append(Command(line, current, env))
            current = []
        if chain:
            chains.append(chain)
    return chains


def readme_chains(markdown: str | None = None) -> list[list[Command]]:
    text = README.read_text(encoding="utf-8") if markdown is None else markdown
    return [chain for line in bash_lines(text) for chain in parse_line(line)]


def kind(command: Command) -> str:
    program = command.program
    if program in PYTHONS:
        return "python-module" if command.argv[1:2] == ["-m"] else "python"
    if program in LAUNCHERS:
        return program
    if program in {"make", "kasa-trl"} or program in NOT_RUN:
        return program
    return "unknown"


# -- the extraction itself ----------------------------------------------------------------------------------------
SAMPLE = """
Text with `inline code`.

```bash
make demo   # a comment
# a whole comment line
DS_ACCELERATOR=cpu deepspeed --num_accelerators 2 examples/sft_llama.py \\
    --deepspeed deepspeed_configs/zero3.json ...
python examples/sft_llama.py && python examples/dpo_llama.py --sft_adapter outputs/sft_llama
kasa-trl inspect outputs/sft_llama [--json] [--png spectrum.png]
```

```python
print("not a shell line")
```
"""


def test_extraction_of_readme_lines():
    chains = readme_chains(SAMPLE)
    flat = [[(c.env, c.argv) for c in chain] for chain in chains]
    assert flat == [
        [({}, ["make", "demo"])],
        [({"DS_ACCELERATOR": "cpu"}, ["deepspeed", "--num_accelerators", "2", "examples/sft_llama.py",
                                      "--deepspeed", "deepspeed_configs/zero3.json"])],
        [({}, ["python", "examples/sft_llama.py"]),
         ({}, ["python", "examples/dpo_llama.py", "--sft_adapter", "outputs/sft_llama"])],
        [({}, ["kasa-trl", "inspect", "outputs/sft_llama"])],
        [({}, ["kasa-trl", "inspect", "outputs/sft_llama", "--json", "--png", "spectrum.png"])],
    ]  # fmt: skip


def test_every_readme_command_is_known():
    """A command this file cannot check fails here, so a README change never goes unchecked."""
    chains = readme_chains()
    assert chains, "no ```bash block found in README.md"
    unknown = [c.line for chain in chains for c in chain if kind(c) == "unknown"]
    assert not unknown, f"tests/test_readme_commands.py does not know how to check: {unknown}"


# -- make -----------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_targets_exist():
    commands = [c for chain in readme_chains() for c in chain if kind(c) == "make"]
    for command in commands:
        args = command.argv[1:]
        proc = subprocess.run(
            ["make", "-n", "-C", str(ROOT), *args],
            capture_output=True,
            text=True,
            env={**os.environ, **command.env},
            timeout=60,
        )
        assert proc.returncode == 0, f"`{command.line}`: make -n failed:\n{proc.stderr}"


# -- kasa-trl ------------------------------------------------------------------------------------------------------
def test_cli_commands_parse():
    from kasa_trl.cli import build_parser

    for command in [c for chain in readme_chains() for c in chain if kind(c) == "kasa-trl"]:
        try:
            build_parser().parse_args(command.argv[1:])
        except SystemExit as e:
            pytest.fail(f"`{command.line}`: kasa-trl's parser refused it (exit {e.code})")


# -- python scripts and launchers: parsed in one subprocess ----------------------------------------------------------
PARSE_SHIM = r"""
import argparse, contextlib, importlib.util, inspect, io, json, os, sys
jobs = json.loads(sys.stdin.read())
LAUNCHER_ENV = {"deepspeed": {"CROSS_RANK": "0", "CROSS_SIZE": "1", "LOCAL_SIZE": "1"}}


class Parsed(BaseException):
    pass


def load(script):
    folder = os.path.dirname(os.path.abspath(script))
    if folder not in sys.path:
        sys.path.insert(0, folder)
    name = "readme_" + os.path.splitext(os.path.basename(script))[0]
    spec = importlib.util.spec_from_file_location(name, script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def parse_script(script, argv):
    module = load(script)
    if hasattr(module, "parse_command_line"):  # the examples
        script_args, training_args = module.parse_command_line(argv)
        return {"deepspeed": training_args.deepspeed, "output_dir": training_args.output_dir}
    if hasattr(module, "parser"):
        module.parser().parse_args(argv)
        return {}
    original = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        original(self, args, namespace)
        raise Parsed

    argparse.ArgumentParser.parse_args = parse_args
    saved_argv, sys.argv = sys.argv, [script, *argv]
    try:
        module.main(argv) if inspect.signature(module.main).parameters else module.main()
    except Parsed:
        return {}
    finally:
        argparse.ArgumentParser.parse_args = original
        sys.argv = saved_argv
    raise RuntimeError("main() returned without parsing its arguments")


def launcher_split(kind, argv):
    if kind == "deepspeed":
        from deepspeed.launcher.runner import parse_args
        args = parse_args(argv)
        return args.user_script, args.user_args
    if kind == "torchrun":
        from torch.distributed.run import get_args_parser
        args = get_args_parser().parse_args(argv)
        return args.training_script, args.training_script_args
    if kind == "accelerate":
        from accelerate.commands.launch import launch_command_parser
        assert argv[0] == "launch", "only `accelerate launch` is known"
        args = launch_command_parser().parse_args(argv[1:])
        if args.config_file and not os.path.isfile(args.config_file):
            raise FileNotFoundError(f"--config_file {args.config_file} does not exist")
        return args.training_script, args.training_script_args
    return argv[0], argv[1:]


results = []
for job in jobs:
    saved = dict(os.environ)
    os.environ.update(job["env"])
    os.environ.update(LAUNCHER_ENV.get(job["kind"], {}))
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            script, argv = launcher_split(job["kind"], job["argv"])
            result = parse_script(script, argv)
        results.append({"ok": True, **result})
    except BaseException as e:  # argparse's SystemExit included
        results.append({"ok": False, "error": f"{type(e).__name__}: {e}\n{err.getvalue()[-2000:]}"})
    finally:
        os.environ.clear()
        os.environ.update(saved)
print("RESULTS " + json.dumps(results))
"""


def parse_jobs() -> list[tuple[Command, dict]]:
    jobs = []
    for chain in readme_chains():
        for command in chain:
            k = kind(command)
            if k == "python":
                jobs.append((command, {"kind": "python", "argv": command.argv[1:], "env": command.env}))
            elif k in LAUNCHERS:
                jobs.append((command, {"kind": k, "argv": command.argv[1:], "env": command.env}))
    return jobs


@pytest.mark.slow
def test_python_and_launcher_commands_parse():
    jobs = parse_jobs()
    assert jobs, "no python / launcher command in README.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    process = processes.start(
        [sys.executable, "-c", PARSE_SHIM],
        cwd=ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    process.stdin.write(json.dumps([job for _, job in jobs]))
    process.stdin.close()
    process.stdin = None
    stdout, stderr = processes.finish(process, TIMEOUT_S)
    assert process.returncode == 0, stderr[-4000:]
    results = json.loads(stdout.split("RESULTS ", 1)[1])
    failures = [f"`{c.line}`:\n{r['error']}" for (c, _), r in zip(jobs, results, strict=True) if not r["ok"]]
    assert not failures, "README commands that do not parse:\n" + "\n\n".join(failures)
    for (command, job), result in zip(jobs, results, strict=True):
        if job["kind"] == "deepspeed" and "output_dir" in result:  # an example (it reports its config)
            assert result["deepspeed"], f"`{command.line}` would train without ZeRO"


def test_python_modules_exist():
    import importlib.util

    for command in [c for chain in readme_chains() for c in chain if kind(c) == "python-module"]:
        module = command.argv[2]
        assert importlib.util.find_spec(module) is not None, f"`{command.line}`: no module {module}"


# -- running what the embedded model allows ---------------------------------------------------------------------------
def runnable_example(command: Command) -> bool:
    """An example script on the embedded model, run directly by python (not by a launcher)."""
    if kind(command) != "python" or len(command.argv) < 2:
        return False
    script = Path(command.argv[1])
    return (
        script.parent.as_posix() == "examples"
        and script.suffix == ".py"
        and "--model_name_or_path" not in command.argv
        and "--dataset_path" not in command.argv
    )


def clone_dir(root: Path) -> Path:
    """A folder laid out like a fresh clone (links to the checkout's files), where outputs/ starts empty."""
    root.mkdir(parents=True)
    for entry in CLONE_ENTRIES:
        if (ROOT / entry).exists():
            (root / entry).symlink_to(ROOT / entry)
    return root


def interpreter(command: Command) -> list[str]:
    return [sys.executable, *command.argv[1:]]


@pytest.mark.slow
def test_embedded_commands_run(tmp_path):
    """The README's commands on the embedded model run as written (a few steps), chains in order, then the
    kasa-trl commands whose adapter those runs wrote."""
    chains = [chain for chain in readme_chains() if all(runnable_example(c) for c in chain)]
    assert chains, "README.md shows no example run on the embedded model"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    env.pop("OMP_NUM_THREADS", None)  # as a user runs them
    # Each chain in its own clone, started together (most of a run is single-threaded imports); a chain's
    # commands one after another.
    folders = [clone_dir(tmp_path / f"clone{i}") for i in range(len(chains))]
    pending = [list(chain) for chain in chains]
    running: dict[int, tuple[Command, subprocess.Popen]] = {}

    def start_next(i: int) -> None:
        if pending[i]:
            command = pending[i].pop(0)
            process = processes.start(
                [*interpreter(command), *RUN_STEPS, "--disable_tqdm"],
                cwd=folders[i],
                env={**env, **command.env},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            running[i] = (command, process)

    for i in range(len(chains)):
        start_next(i)
    while running:
        i = next(iter(running))
        command, process = running.pop(i)
        stdout, stderr = processes.finish(process, TIMEOUT_S)
        assert process.returncode == 0, f"`{command.line}` failed:\n{stderr[-4000:]}"
        assert "KaSA adapter saved to" in stdout, stdout[-2000:]
        start_next(i)

    cli = Path(sys.executable).with_name("kasa-trl")
    ran = []
    for command in [c for chain in readme_chains() for c in chain if kind(c) == "kasa-trl"]:
        adapter = command.argv[2] if len(command.argv) > 2 else ""
        folder = next((f for f in folders if adapter and (f / adapter).is_dir()), None)
        base = command.argv[command.argv.index("--base") + 1] if "--base" in command.argv else None
        if folder is None or (base is not None and not (folder / base).exists()):
            continue  # needs a model from the hub or a path this README never writes: parsed above only
        proc = processes.run([str(cli), *command.argv[1:]], cwd=folder, env=env, timeout=TIMEOUT_S)
        assert proc.returncode == 0, f"`{command.line}` failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
        ran.append(command.line)
    assert ran or not any(kind(c) == "kasa-trl" for chain in readme_chains() for c in chain), (
        "no kasa-trl command of the README runs on the embedded example's output"
    )
