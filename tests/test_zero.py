"""DeepSpeed ZeRO-2/ZeRO-3 with 2 real processes (gloo, CPU) give the single-process result.

Each case launches ``tests/distributed/zero_worker.py`` with torchrun and compares the final adapter, the
logged regularizer values and the truncation with a single-process run on the same global batch
(8 = per-device batch x accumulation 2 x ranks). ``stage3_param_persistence_threshold`` is 0, so every
parameter, adapters included, is really partitioned.
"""

import os
import socket
import sys
from pathlib import Path

import pytest
import torch

from .distributed import processes

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow

WORKER = Path(__file__).parent / "distributed" / "zero_worker.py"
RTOL = 1e-5
ADAPTER_KEYS = ("lora_A", "lora_B", "lora_diag")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(out: Path, *args: str, nproc: int = 1) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    if nproc == 1:
        cmd = [sys.executable, str(WORKER)]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            f"--master_port={_free_port()}",
            str(WORKER),
        ]
    processes.check_build_locks()  # DeepSpeed would wait forever on a lock a killed build left
    proc = processes.run([*cmd, "--out", str(out), *args], env=env, timeout=900)
    assert proc.returncode == 0, (
        f"worker failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    return torch.load(out / "result.pt", weights_only=False)


def _relative_difference(a: dict, b: dict) -> float:
    keys = [k for k in a["adapter"] if k.rsplit(".", 1)[-1] in ADAPTER_KEYS]
    assert keys and sorted(keys) == sorted(k for k in b["adapter"] if k.rsplit(".", 1)[-1] in ADAPTER_KEYS)
    return max(
        float((a["adapter"][k] - b["adapter"][k]).norm() / a["adapter"][k].norm().clamp(min=1e-12))
        for k in keys
    )


def _assert_same_logs(a: dict, b: dict) -> float:
    worst = 0.0
    steps_a = [e for e in a["log_history"] if "loss" in e]
    steps_b = [e for e in b["log_history"] if "loss" in e]
    assert len(steps_a) == len(steps_b) > 0
    for x, y in zip(steps_a, steps_b, strict=True):
        for key in ("kasa/singular_value_l2", "kasa/orthogonality", "kasa/regularization"):
            worst = max(worst, abs(x[key] - y[key]) / abs(x[key]))
    assert worst <= RTOL, f"logged regularizer values differ by {worst:.2e} (relative)"
    return worst


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    runs = {}

    def get(steps: int) -> dict:
        if steps not in runs:
            runs[steps] = _run(tmp_path_factory.mktemp(f"single{steps}"), "--steps", str(steps))
        return runs[steps]

    return get


def test_zero2_equals_single_process(tmp_path, single):
    result = _run(tmp_path, "--stage", "2", "--steps", "3", nproc=2)
    diff = _relative_difference(single(3), result)
    assert diff <= RTOL, f"ZeRO-2 adapter differs from single process by {diff:.2e} (relative)"
    _assert_same_logs(single(3), result)


def test_zero3_equals_single_process_and_shards_decomposition(tmp_path, single):
    result = _run(tmp_path, "--stage", "3", "--steps", "3", "--checkpointing", "non_reentrant", nproc=2)
    assert result["partitioned"], "parameters were not partitioned: the test would prove nothing"
    diff = _relative_difference(single(3), result)
    assert diff <= RTOL, f"ZeRO-3 adapter differs from single process by {diff:.2e} (relative)"
    _assert_same_logs(single(3), result)
    # The truncation is bit-identical to the single-process one on every rank, each rank decomposed only its
    # share, and no weight was gathered again to build the layers (each rank truncated its own partition).
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    reference = single(3)["truncated"]
    for rank in ranks:
        for name, weight in reference.items():
            torch.testing.assert_close(rank["truncated"][name], weight, rtol=0, atol=0, msg=name)
    counts = [rank["decomposed"] for rank in ranks]
    assert sum(counts) == len(reference) and max(counts) - min(counts) <= 1, counts
    assert [rank["layer_gathers"] for rank in ranks] == [0, 0]


@pytest.mark.parametrize(
    "base_mode, extra",
    [("in_place", ("--gather_layers",)), ("non_destructive", ())],
    ids=["in_place-gathered-fallback", "non_destructive"],
)
def test_zero3_other_layer_build_paths(tmp_path, single, base_mode, extra):
    """In-place truncation through gathered weights (when partitions cannot be written: hpZ, quantized, NVMe)
    and the non-destructive mode (nothing written) give the single process's training run too."""
    result = _run(tmp_path, "--stage", "3", "--steps", "3", "--base_mode", base_mode, *extra, nproc=2)
    diff = _relative_difference(single(3), result)
    assert diff <= RTOL, f"ZeRO-3 {base_mode} adapter differs from single process by {diff:.2e} (relative)"
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    n_layers = len(single(3)["truncated"])
    assert [rank["layer_gathers"] for rank in ranks] == [n_layers if extra else 0] * 2
    if base_mode == "in_place":
        for rank in ranks:
            for name, weight in single(3)["truncated"].items():
                torch.testing.assert_close(rank["truncated"][name], weight, rtol=0, atol=0, msg=name)


def test_zero3_reentrant_checkpointing_and_resume(tmp_path, single):
    first = _run(
        tmp_path, "--stage", "3", "--steps", "2", "--save_steps", "2", "--checkpointing", "reentrant", nproc=2
    )
    diff = _relative_difference(single(2), first)
    assert diff <= RTOL, f"ZeRO-3 (reentrant checkpointing) differs by {diff:.2e}"
    checkpoint = tmp_path / "checkpoint-2"
    assert (checkpoint / "kasa_adapter.safetensors").is_file()
    resumed = _run(
        tmp_path,
        "--stage", "3", "--steps", "4", "--save_steps", "2", "--checkpointing", "reentrant",
        "--resume", str(checkpoint),
        nproc=2,
    )  # fmt: skip
    diff = _relative_difference(single(4), resumed)
    assert diff <= RTOL, f"resumed ZeRO-3 run differs from an uninterrupted run by {diff:.2e}"
    # The checkpoint's adapter loads in a single process.
    from kasa_trl import load_kasa_adapter
    from kasa_trl.tiny import build_tiny_llama, build_tokenizer

    model = load_kasa_adapter(build_tiny_llama(len(build_tokenizer()), seed=0), checkpoint)
    assert len([n for n, _ in model.named_modules() if n.endswith(("q_proj", "down_proj"))]) == 4


def test_deepspeed_launcher_runs_the_sft_example(tmp_path):
    """`deepspeed examples/sft_llama.py` on a CPU-only machine, no --deepspeed: 2 ranks under the shipped ZeRO-3
    config (said in the log), clean exit, no noise from the project's defaults, a loadable adapter, and the
    embedded base saved whole (not a ZeRO-3 partition) next to it."""
    launcher = Path(sys.executable).with_name("deepspeed")
    if not launcher.exists():
        pytest.skip("deepspeed launcher not installed next to the interpreter")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [
        str(launcher), "--num_accelerators", "2", "--master_port", str(_free_port()),
        str(root / "examples" / "sft_llama.py"),
        "--max_steps", "3", "--output_dir", str(tmp_path), "--disable_tqdm",
    ]  # fmt: skip
    processes.check_build_locks()
    proc = processes.run(cmd, env=env, timeout=900, cwd=root)
    log = proc.stdout[-6000:] + proc.stderr[-6000:]
    assert proc.returncode == 0, log
    assert log.count("exits successfully") == 2, log
    assert "DeepSpeed launcher: ZeRO-3 with deepspeed_configs/zero3.json" in log, log
    for noise in ("find_unused_parameters", "FutureWarning", "OMP_NUM_THREADS/MKL_NUM_THREADS unset"):
        assert noise not in proc.stdout + proc.stderr, f"{noise!r} in:\n{log}"
    assert (tmp_path / "kasa_adapter.safetensors").is_file()
    from safetensors.torch import load_file

    from kasa_trl import load_kasa_adapter
    from kasa_trl.tiny import build_tiny_llama, build_tokenizer

    base = build_tiny_llama(len(build_tokenizer()), seed=0)
    saved = load_file(tmp_path / "base" / "model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in base.state_dict().items() if k in saved) and saved
    load_kasa_adapter(base, tmp_path)
