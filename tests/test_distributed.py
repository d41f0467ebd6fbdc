"""Training on several processes (torch.distributed, gloo on the CPU), through the CLI:
two processes train as one, only rank 0 writes, a run resumes on another number of
processes, and a killed process is a clear error on the other, not a hang."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from napari_zoomin.cli import main
from napari_zoomin.engine.checkpoints import load_checkpoint
from napari_zoomin.training import read_saved_run
from napari_zoomin.training.distributed import World, shard

#: the tiny model of tests/test_trainer.py (a few thousand parameters)
TINY = {
    "view_scale": 1 / 64,
    "stage2_scale": 1 / 4,
    "tile_size": 128,
    "subtile_size": 16,
    "n_samples": 4,
    "feature_dim": 8,
    "feature_hidden": 16,
    "feature_channels": [4, 8],
    "val_draws": 2,
    "num_workers": 1,
    "contrastive_warmup_epochs": 1,
}
#: one thread per process (2 shared cores), a short collective timeout
ENV = {"OMP_NUM_THREADS": "1", "ZOOMIN_DIST_TIMEOUT": "30"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    """Four 8192² sample slides (2 + 2) for training and two for validation, with ROIs
    beside them, and their labels CSV."""
    from napari_zoomin.samples import write_sample_slide

    folder = tmp_path_factory.mktemp("dist-slides")
    rows = ["slide,label,split"]
    for k, split in enumerate(["train"] * 4 + ["val"] * 2):
        label = ("negative", "positive")[k % 2]
        write_sample_slide(folder / f"s{k}.tif", size=8192, label=label, seed=40 + k)
        rows.append(f"s{k}.tif,{label},{split}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder


def train_args(slides, out, epochs: int = 1) -> list[str]:
    """``zoomin train`` of the tiny model; batch 3 of 4 slides: steps of 3 and 1 slides,
    split 2 + 1 and 1 + 0 over two processes (uneven, and a process without a slide)."""
    return [
        "train",
        "--slides",
        str(slides),
        "--labels",
        str(slides / "labels.csv"),
        "--out",
        str(out),
        "--epochs",
        str(epochs),
        "--batch-size",
        "3",
        "--lr",
        "1e-3",
        "--pretrain-epochs",
        "0",
        "--patience",
        "0",
        "--device",
        "cpu",
        "--set",
        json.dumps(TINY),
    ]


def max_difference(a, b) -> float:
    wa, wb = load_checkpoint(a).model.state_dict(), load_checkpoint(b).model.state_dict()
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def test_shard_splits_a_batch_into_contiguous_nearly_equal_parts():
    batch = [7, 3, 9, 1, 5]
    parts = [shard(batch, World(r, 3)) for r in range(3)]
    assert parts == [[7, 3], [9, 1], [5]]
    assert [shard([4], World(r, 2)) for r in range(2)] == [[4], []]
    assert shard(batch, World()) == batch


@pytest.mark.slow
def test_two_processes_train_as_one_and_resume_on_one(slides, tmp_path, capsys):
    """One epoch under ``torchrun --nproc_per_node=2`` gives the weights, losses and
    validation of one process with the same global batch and seed; its training state
    resumes on one process exactly as one process's own does."""
    one, two = tmp_path / "one" / "m.safetensors", tmp_path / "two" / "m.safetensors"
    one.parent.mkdir()
    two.parent.mkdir()
    start = time.perf_counter()
    assert main([*train_args(slides, one), "--distributed"]) == 0
    seconds_one = time.perf_counter() - start
    start = time.perf_counter()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    run = subprocess.run(
        [*torchrun, "--nproc_per_node=2", "-m", "napari_zoomin.cli", *train_args(slides, two)],
        env={**os.environ, **ENV},
        capture_output=True,
        text=True,
        timeout=300,
    )
    seconds_two = time.perf_counter() - start
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("training zoomin on 4 slides") == 1  # reported once
    assert "in 2 processes" in run.stdout
    written = sorted(p.name for p in two.parent.iterdir())
    # and the stage-1 view cache (engine/view_cache.py), shared by the ranks
    assert written == ["m.history.csv", "m.last.safetensors", "m.safetensors", "m.views"]
    difference = max_difference(one, two)
    with capsys.disabled():
        print(
            f"\n1 process {seconds_one:.1f} s, 2 processes {seconds_two:.1f} s; {difference=:.3g}"
        )
    assert difference <= 1e-6
    h1, h2 = read_saved_run(one).state.history, read_saved_run(two).state.history
    keys = ("train_loss", "train_accuracy", "train_pixel", "val_loss", "val_accuracy")
    for key in (*keys, "val_roi_attention_stage1", "val_roi_attention_stage2"):
        assert h2[0][key] == pytest.approx(h1[0][key], abs=1e-6), key

    # a second epoch on one process, from the state one and two processes wrote
    for out in (one, two):
        assert main([*train_args(slides, out, epochs=2), "--distributed"]) == 0
    assert read_saved_run(two).state.epoch == 2
    assert max_difference(one, two) <= 1e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_killed_process_is_a_clear_error_on_the_other(slides, tmp_path):
    """Two processes started as torchrun starts them (its variables), each told to write
    in its own folder: only rank 0 writes; SIGKILL to rank 1 mid-run makes rank 0 stop
    within seconds with a message, and its last training state stays."""
    port = _free_port()
    procs = []
    for rank in range(2):
        (tmp_path / f"r{rank}").mkdir()
        env = {
            **os.environ,
            **ENV,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        args = train_args(slides, tmp_path / f"r{rank}" / "m.safetensors", epochs=100)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "napari_zoomin.cli", *args],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    try:
        for line in procs[0].stderr:  # rank 0's progress: wait for the end of epoch 1
            if "val_accuracy" in line:
                break
        assert procs[0].poll() is None
        assert (tmp_path / "r0" / "m.last.safetensors").is_file()
        procs[1].send_signal(signal.SIGKILL)
        killed = time.perf_counter()
        _, err = procs[0].communicate(timeout=60)
        waited = time.perf_counter() - killed
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    print(f"rank 0 stopped {waited:.1f} s after rank 1 was killed: {err.strip()[-300:]}")
    assert procs[0].returncode == 1
    assert "zoomin: error: process 0 of 2 lost contact with the others" in err
    assert "Traceback" not in err
    # rank 1 never wrote a model, a training state or a history (at most its view cache)
    assert [p.name for p in (tmp_path / "r1").iterdir() if p.name != "m.views"] == []
    assert read_saved_run(tmp_path / "r0" / "m.safetensors").state.epoch >= 1
