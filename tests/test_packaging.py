"""kasa_trl as users get it: the sdist, the wheel built from it, installed into a fresh virtual environment away from
the checkout, running the demo, an example and the CLI.

``make`` installs in editable mode, which hides packaging mistakes (a data file left out of the wheel, a module
imported from the checkout). Here the sdist is built first and the wheel from it (so a file missing from the sdist
fails too); the wheel is installed by pip, with ``--no-deps``, into a new venv (no system site-packages). Its
dependencies are links, in that venv's site-packages, to every entry of this environment's site-packages except
kasa_trl's own (the editable finder, its metadata) and the .pth files: nothing of the checkout is importable in
that venv. Everything runs from a folder outside the checkout.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

import kasa_trl

from .distributed import processes

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 300
BUILD_LEFTOVERS = (
    ".git",
    ".venv",
    "*.egg-info",
    "build",
    "dist",
    "outputs",
    "runs",
    "__pycache__",
    ".*_cache",
)


def _run(cmd, **kwargs) -> subprocess.CompletedProcess:
    proc = processes.run([str(c) for c in cmd], timeout=TIMEOUT_S, **kwargs)
    assert proc.returncode == 0, (
        f"{cmd} exited with {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    )
    return proc


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dist")
    # From a copy without build leftovers: setuptools reuses an existing *.egg-info/SOURCES.txt (the editable
    # install's), which would hide a file the configuration itself leaves out.
    source = tmp_path_factory.mktemp("source") / "kasa_trl"
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(*BUILD_LEFTOVERS))
    build = f"from setuptools import build_meta; print(build_meta.build_sdist({str(out)!r}))"
    sdist = _run([sys.executable, "-c", build], cwd=source)
    wheel = _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", out,
         out / sdist.stdout.strip().splitlines()[-1]],
        cwd=out,
    )  # fmt: skip
    for log in (sdist, wheel):
        assert "BuildBackendWarning" not in log.stdout + log.stderr, log.stdout + log.stderr
    (wheel_path,) = out.glob("kasa_trl-*.whl")
    (sdist_path,) = out.glob("kasa_trl-*.tar.gz")
    return {"wheel": wheel_path, "sdist": sdist_path}


def test_wheel_contents_and_metadata(dist):
    version = kasa_trl.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+", version) and version != "0.1.0"
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert re.search(r"^## (\S+)", changelog, flags=re.M).group(1) == version, "CHANGELOG's newest entry"
    assert dist["wheel"].name == f"kasa_trl-{version}-py3-none-any.whl"
    with zipfile.ZipFile(dist["wheel"]) as wheel:
        names = set(wheel.namelist())
        metadata = wheel.read(f"kasa_trl-{version}.dist-info/METADATA").decode()
    for needed in ("kasa_trl/py.typed", "kasa_trl/data/sft.jsonl", "kasa_trl/data/dpo.jsonl",
                   "kasa_trl/integrations/peft/lora_export.py", f"kasa_trl-{version}.dist-info/licenses/LICENSE"):  # fmt: skip
        assert needed in names, needed
    # One top-level package: nothing generic (integrations, tests, examples) lands in site-packages.
    assert {n.split("/", 1)[0] for n in names} == {"kasa_trl", f"kasa_trl-{version}.dist-info"}, names
    assert f"Version: {version}" in metadata and "License-Expression: Apache-2.0" in metadata
    assert "Classifier: Typing :: Typed" in metadata
    assert (
        "Apache License" in (ROOT / "LICENSE").read_text() and "Version 2.0" in (ROOT / "LICENSE").read_text()
    )


def test_sdist_carries_what_builds_and_tests_it(dist):
    with tarfile.open(dist["sdist"]) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    for needed in ("LICENSE", "CHANGELOG.md", "README.md", "Makefile", "pyproject.toml", "kasa_trl/data/sft.jsonl",
                   "tests/conftest.py", "tests/distributed/zero_worker.py", "examples/sft_llama.py",
                   "deepspeed_configs/zero3.json"):  # fmt: skip
        assert needed in names, needed
    assert not [n for n in names if "__pycache__" in n]


@pytest.fixture(scope="module")
def venv(dist, tmp_path_factory) -> dict[str, Path]:
    """A fresh venv with only the wheel installed (dependencies linked from this environment), and a work folder;
    both outside the checkout."""
    root = tmp_path_factory.mktemp("installed")
    assert not root.resolve().is_relative_to(ROOT)
    env_dir = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", env_dir])
    python = env_dir / "bin" / "python"
    _run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", dist["wheel"]]
    )
    # Dependencies: links, in the venv's own site-packages (so that libraries which treat code outside
    # site-packages as user code, as dill does, see an ordinary install), to this environment's entries,
    # kasa_trl's own (editable) ones and .pth files left out.
    own = re.compile(r"(__editable__.*kasa_trl.*|kasa_trl(-.*\.dist-info|\.egg-link)?|.*\.pth)$")
    target_site = Path(
        _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    )
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not own.fullmatch(entry.name) and not (target_site / entry.name).exists():
            (target_site / entry.name).symlink_to(entry)
    work = root / "work"
    work.mkdir()
    return {"python": python, "cli": env_dir / "bin" / "kasa-trl", "work": work, "site": target_site}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    return env


def test_installed_package_comes_from_the_wheel(venv):
    code = (
        "import kasa_trl, kasa_trl.integrations.peft as peft, importlib.util; print(kasa_trl.__file__); "
        "print(peft.__file__); print(kasa_trl.__version__); print(importlib.util.find_spec('integrations'))"
    )
    out = _run([venv["python"], "-c", code], cwd=venv["work"], env=_env()).stdout.split()
    assert all(Path(p).resolve().is_relative_to(venv["site"].resolve()) for p in out[:2]), out
    assert out[2] == kasa_trl.__version__
    assert out[3] == "None", "a top-level 'integrations' package is installed"
    _run(
        [sys.executable, "-m", "pip", "--python", venv["python"], "check"], cwd=venv["work"]
    )  # deps satisfied


def test_demo_example_and_cli_run_from_the_wheel(venv):
    """``make demo`` (sft_llama.py, a few steps), another example and the CLI on their output, all from the
    installed wheel, in a folder outside the checkout."""
    env, work = _env(), venv["work"]
    assert "usage: kasa-trl" in _run([venv["cli"], "--help"], cwd=work, env=env).stdout
    demo = processes.start(
        [venv["python"], ROOT / "examples" / "sft_llama.py", "--max_steps", "3", "--disable_tqdm"],
        cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    example = processes.start(
        [venv["python"], ROOT / "examples" / "custom_regularizer.py", "--max_steps", "3", "--disable_tqdm"],
        cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    for process in (demo, example):
        stdout, stderr = processes.finish(process, TIMEOUT_S)
        assert process.returncode == 0, stderr[-4000:]
        assert "KaSA adapter saved to outputs/" in stdout
    adapter = work / "outputs" / "sft_llama"
    assert (adapter / "kasa_spectrum_final.png").is_file() and (adapter / "base" / "config.json").is_file()
    inspect = _run([venv["cli"], "inspect", "outputs/sft_llama", "--json"], cwd=work, env=env)
    assert "model.layers.0.self_attn.q_proj" in inspect.stdout
    # No --base: the adapter records the base folder the demo saved next to it.
    _run([venv["cli"], "export-lora", "outputs/sft_llama", "exports/lora"], cwd=work, env=env)  # integrations
    _run([venv["cli"], "merge", "outputs/sft_llama", "exports/merged"], cwd=work, env=env)
    assert (work / "exports" / "lora" / "adapter_config.json").is_file()
    assert (work / "exports" / "merged" / "config.json").is_file()
