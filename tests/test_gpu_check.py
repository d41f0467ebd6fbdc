"""The GPU check script (benchmarks/gpu_check.py) runs its CPU-runnable parts, so it cannot
rot while no GPU is lent; and the mixed-precision switch it times really switches."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from napari_zoomin.models.device import autocast, grad_scaler, mixed_precision

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_quick_on_cpu_writes_its_table(tmp_path, cmu_svs):
    out = tmp_path / "out"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.gpu_check",
            "--device",
            "cpu",
            "--quick",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((out / "gpu_check.json").read_text())["rows"]
    assert rows[0] == {"part": "CUDA tests", "result": "not run: no CUDA device"}
    classify = [r for r in rows if r["part"].startswith("classify")]
    assert len(classify) == 2 and all(0.0 <= r["probability"] <= 1.0 for r in classify)
    assert classify[0]["probability"] == classify[1]["probability"]  # same seed, same answer
    assert all(r["peak_mb"] is None for r in rows if "peak_mb" in r)  # no CUDA number faked
    trained = [r for r in rows if r["part"].startswith("train")]
    assert len(trained) == 2 and all(r["train_loss"] == r["train_loss"] for r in trained)
    # on a CPU AMP is off both times, so the two epochs are the same computation
    assert trained[0]["train_loss"] == pytest.approx(trained[1]["train_loss"], rel=1e-5)
    table = (out / "gpu_check.md").read_text()
    assert "71.76 MB" in table and table.count("\n|") == 2 + len(rows)  # header, rule, rows


def test_mixed_precision_switch_restores_and_disables():
    cuda = torch.device("cuda")
    with mixed_precision(False):
        assert not grad_scaler(cuda).is_enabled()
        with autocast(cuda):
            assert not torch.is_autocast_enabled("cuda")
    with mixed_precision(False):
        pass
    from napari_zoomin.models import device as dev_module

    assert dev_module._MIXED_PRECISION[0] is True


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mixed_precision_on_cuda_by_default():
    cuda = torch.device("cuda")
    assert grad_scaler(cuda).is_enabled()
    with autocast(cuda):
        assert torch.is_autocast_enabled("cuda")
