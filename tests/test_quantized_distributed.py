"""KaSA on a 4-bit base with 2 real processes (gloo, CPU): DDP and DeepSpeed ZeRO-2 give the single-process
result; ZeRO-3 is refused before anything changes. Each case runs ``tests/distributed/quantized_worker.py``."""

import os
import socket
import sys
from pathlib import Path

import pytest
import torch

from .distributed import processes

pytest.importorskip(
    "bitsandbytes",
    minversion="0.50",
    reason="bitsandbytes >= 0.50 runs 4-bit/8-bit layers on CPU: pip install 'kasa_trl[quantization]'",
)
pytestmark = pytest.mark.slow

WORKER = Path(__file__).parent / "distributed" / "quantized_worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(out: Path, *args: str, nproc: int = 1) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(WORKER)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
        cmd += [f"--master_port={_free_port()}", str(WORKER)]
    if "--stage" in args:
        processes.check_build_locks()  # DeepSpeed would wait forever on a lock a killed build left
    proc = processes.run([*cmd, "--out", str(out), *args], env=env, timeout=900)
    assert proc.returncode == 0, (
        f"worker failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    return torch.load(out / "result.pt", weights_only=False)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("single"))


@pytest.mark.parametrize("stage", [None, 2], ids=["ddp", "zero2"])
def test_two_ranks_train_as_one_process(tmp_path, single, stage):
    if stage:
        pytest.importorskip("deepspeed")
    run = _run(tmp_path, *(["--stage", str(stage)] if stage else []), nproc=2)
    assert run["world"] == 2 and run["bytes_unchanged"] and single["bytes_unchanged"]
    for key, value in single["adapter"].items():
        if key.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "lora_diag"):
            torch.testing.assert_close(
                run["adapter"][key], value, rtol=1e-5, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}"
            )


def test_zero3_is_refused_before_anything_changes(tmp_path):
    pytest.importorskip("deepspeed")
    run = _run(tmp_path, "--stage", "3")
    assert "DeepSpeed ZeRO-3 cannot train on a quantized (bitsandbytes) base" in run["refused"]
    assert "ZeRO-1/2" in run["refused"] and run["layers"] == 0
