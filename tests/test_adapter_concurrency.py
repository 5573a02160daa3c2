"""Several processes saving into one adapter directory: none fails, and the directory always reads back whole
(the adapter file and kasa_config.json from the same writer)."""

import subprocess
import sys
import textwrap
import time

import torch

from kasa_trl.adapter_io import read_adapter

# Each writer saves a one-layer adapter of its own rank r (so a mixed directory would be caught: the config
# says r, the tensors have their writer's r), SAVES times in a row, once the test says go.
WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch
    from kasa_trl import KaSAConfig
    from kasa_trl.adapter_io import write_adapter

    directory, r, saves, ready, go = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    out, inp = 24, 16
    gen = torch.Generator().manual_seed(r)
    tensors = {
        "proj.lora_A": torch.randn(r, inp, generator=gen),
        "proj.lora_B": torch.randn(out, r, generator=gen),
        "proj.lora_diag": torch.full((r,), float(r)),
        "proj.removed_left": torch.randn(out, r, generator=gen),
        "proj.removed_right": torch.randn(r, inp, generator=gen),
        "proj.base_fingerprint": torch.zeros(5, dtype=torch.float64),
    }
    config = KaSAConfig(r=r, target_modules=["proj"])
    Path(ready).touch()
    while not Path(go).exists():
        time.sleep(0.01)
    for _ in range(saves):
        write_adapter(directory, tensors, config)
    """
)
SAVES = 40


def test_two_processes_saving_into_one_directory(tmp_path):
    directory = tmp_path / "adapter"
    go = tmp_path / "go"
    writers = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                WRITER,
                str(directory),
                str(r),
                str(SAVES),
                str(tmp_path / f"ready{r}"),
                str(go),
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (2, 3)
    ]
    try:
        while not all((tmp_path / f"ready{r}").exists() for r in (2, 3)):
            assert all(w.poll() is None for w in writers), [w.stderr.read() for w in writers]
            time.sleep(0.05)
        go.touch()
        reads = 0
        while any(w.poll() is None for w in writers):
            if (directory / "kasa_adapter.safetensors").exists():
                config, per_layer = read_adapter(directory)  # whole and consistent, every time
                assert per_layer["proj"]["lora_diag"].tolist() == [float(config.r)] * config.r
                reads += 1
        errors = [w.stderr.read() for w in writers]
        assert [w.returncode for w in writers] == [0, 0], errors
        assert not any("Traceback" in e or "Warning" in e for e in errors), errors
    finally:
        for w in writers:
            if w.poll() is None:
                w.kill()
            w.wait()
    config, per_layer = read_adapter(directory)
    assert config.r in (2, 3) and torch.equal(
        per_layer["proj"]["lora_diag"], torch.full((config.r,), float(config.r))
    )
    assert sorted(p.name for p in directory.iterdir()) == ["kasa_adapter.safetensors", "kasa_config.json"]
    assert reads > 0
