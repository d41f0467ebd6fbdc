"""engine.runtime: the one home of the device list, device resolution, out-of-memory test
and provenance versions (the engine, batch runs, the CLI and the widgets use it)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from fixtures_data import TINY_ZOOMIN
from napari_zoomin.engine import inference, runtime
from napari_zoomin.engine.checkpoints import (
    build_model,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from napari_zoomin.engine.runtime import (
    available_devices,
    choose_threads,
    is_oom,
    resolve_device,
    select_device,
    torch_threads,
    versions,
)
from napari_zoomin.errors import ClassificationError
from napari_zoomin.models.device import select_device as device_select_device


def test_is_oom_on_every_device():
    cpu = "DefaultCPUAllocator: can't allocate memory: you tried to allocate 123 bytes."
    assert is_oom(RuntimeError(cpu))
    assert is_oom(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_oom(MemoryError())
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None:
        assert is_oom(oom("CUDA out of memory."))
    assert not is_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"))
    assert not is_oom(ValueError("out of memory"))  # only a RuntimeError's message counts


def test_available_devices_all_work():
    devices = available_devices()
    assert devices[:2] == ["auto", "cpu"]
    assert len(set(devices)) == len(devices)
    for name in devices:
        assert isinstance(select_device(name), torch.device)
        assert resolve_device(name) == select_device(name)
    if torch.cuda.is_available():
        assert "cuda:0" in devices


def test_resolve_device():
    assert runtime.select_device is device_select_device  # re-exported, not copied
    assert resolve_device("auto") == resolve_device(None) == select_device()
    assert resolve_device("cpu") == resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ClassificationError, match="cannot use device 'gpu'") as err:
        resolve_device("gpu")
    assert err.value.fix == "Use --device cpu or auto."
    with pytest.raises(ClassificationError, match="Choose cpu or auto"):
        resolve_device("gpu", fix="Choose cpu or auto.")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_resolve_device_without_cuda():
    with pytest.raises(ClassificationError, match=r"cannot use device 'cuda:0'.*not available"):
        resolve_device("cuda:0")


def test_checkpoints_resolve_their_device(tmp_path):
    config = TINY_ZOOMIN
    path = save_checkpoint(tmp_path / "m.safetensors", build_model("zoomin", config), ["a", "b"])
    expected = select_device("auto")
    for ckpt in (load_model(path, "auto"), load_checkpoint(path, "auto")):
        assert next(ckpt.model.parameters()).device.type == expected.type
    assert next(load_model(path).model.parameters()).device.type == "cpu"  # the default
    with pytest.raises(ClassificationError, match="cannot use device 'gpu'"):
        load_model(path, "gpu")


def test_versions_and_one_home():
    found = versions()
    assert {"napari_zoomin", "torch", "python", "numpy", "tifffile"} <= set(found)
    assert found["torch"] == torch.__version__
    # the engine uses runtime's rules, it keeps no copies of its own
    assert not hasattr(inference, "_is_oom")
    assert inference.versions is versions and inference.is_oom is is_oom
    assert "versions" not in inference.__all__


# -- torch threads from the load ---------------------------------------------------------


def test_threads_given_are_used_and_bad_counts_refused():
    assert choose_threads(None) is None  # torch's own setting, untouched
    assert choose_threads(3) == 3 and choose_threads("2") == 2
    for bad in (0, -1, "0", "many", "1.5"):
        with pytest.raises(ValueError, match="threads"):
            choose_threads(bad)


def test_torch_threads_restores_the_setting():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), torch_threads(1):
        raise RuntimeError("inside")
    assert torch.get_num_threads() == before


def test_auto_threads_back_off_when_other_work_keeps_the_cpus_busy():
    """Every CPU this process may use kept busy by other processes: one thread, not all
    of them (two threads took 2.0-2.6x as long as one on a busy machine)."""
    import os
    import subprocess
    import sys
    import time

    if not os.path.exists("/proc/stat"):
        pytest.skip("needs Linux's /proc/stat")
    cpus = len(os.sched_getaffinity(0))
    spin = [sys.executable, "-S", "-c", "while True: pass"]
    busy = [subprocess.Popen(spin) for _ in range(cpus)]
    try:
        time.sleep(0.5)  # a bare interpreter starts in tens of milliseconds
        assert choose_threads("auto", ceiling=cpus) == 1
    finally:
        for p in busy:
            p.kill()
            p.wait()
    assert 1 <= choose_threads("auto", ceiling=cpus) <= cpus
    assert choose_threads("auto", ceiling=1) == 1  # never above torch's own setting


def test_a_load_measured_while_this_process_works_counts_only_other_work():
    """A classification measures the load while it detects tissue: its own threads'
    CPU time is subtracted, so its own work never makes it back off to one thread."""
    import os
    import threading
    import time

    import numpy as np

    if not os.path.exists("/proc/self/stat"):
        pytest.skip("needs Linux's /proc")
    cpus = runtime.usable_cpus()
    load = runtime.CpuLoad()
    end = time.monotonic() + 0.4

    def spin() -> None:  # numpy releases the GIL: every CPU busy with this process
        a = np.ones((300, 300))
        while time.monotonic() < end:
            a @ a

    workers = [threading.Thread(target=spin) for _ in range(cpus)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    busy, seen = load.busy()
    assert seen == cpus
    assert busy < cpus - 0.5  # without the subtraction: about `cpus`


_REUSE = """
import resource, sys
import numpy as np
from napari_zoomin.engine.runtime import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
faults = []
for _ in range(4):  # a 64 MB block allocated, written and freed, as a stage's batch is
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = np.ones(64 * 2**20, np.uint8)
    del block
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, sum(faults[1:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_kept_freed_memory_is_reused_without_new_page_faults():
    """After ``keep_freed_memory`` a freed 64 MB block is reused: the next ones cost no
    page faults (glibc otherwise unmaps it, and each new block faults in 16,384 pages,
    or 32 huge ones)."""

    def run(mode: str) -> tuple[str, int]:
        out = subprocess.run(
            [sys.executable, "-c", _REUSE, mode], capture_output=True, text=True, check=True
        )
        kept, faults = out.stdout.split()
        return kept, int(faults)

    kept, faults_kept = run("keep")
    _, faults_default = run("default")
    assert kept == "True"
    assert faults_kept < 100 <= faults_default
