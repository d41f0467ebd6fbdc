"""Atomic writes: the umask's file mode, all-or-nothing content, no stray partial files."""

from __future__ import annotations

import contextlib
import os
import re
import stat
import threading

import pytest
import torch

from napari_zoomin.atomic import (
    atomic_open,
    atomic_path,
    partial_path,
    write_bytes_atomic,
    write_text_atomic,
)
from napari_zoomin.engine.checkpoints import load_model, save_checkpoint

posix_only = pytest.mark.skipif(os.name == "nt", reason="POSIX file modes and umask")


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_partial_names_are_hidden_siblings_unique_per_call(tmp_path):
    target = tmp_path / "result.json"
    names = {partial_path(target).name for _ in range(1000)}
    assert len(names) == 1000
    pattern = re.compile(rf"\.result\.json\.{os.getpid()}-[0-9a-f]{{8}}\.partial")
    assert all(pattern.fullmatch(n) for n in names)
    assert {partial_path(target).parent} == {tmp_path}


@posix_only
@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_mode_follows_the_umask_like_open(tmp_path, mask, expected):
    with umask(mask):
        write_bytes_atomic(tmp_path / "a.bin", b"x")
        write_text_atomic(tmp_path / "a.txt", "x")
        with atomic_path(tmp_path / "a.tif") as tmp:
            assert mode(tmp) == expected  # the partial file already has its final mode
            with open(tmp, "wb") as fh:  # as tifffile / safetensors write a path
                fh.write(b"x")
        with open(tmp_path / "plain.txt", "w") as fh:
            fh.write("x")
    assert mode(tmp_path / "plain.txt") == expected
    assert [mode(tmp_path / n) for n in ("a.bin", "a.txt", "a.tif")] == [expected] * 3


@posix_only
def test_overwriting_a_0600_file_gives_the_umask_mode(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")
    target.chmod(0o600)
    with umask(0o022):
        write_bytes_atomic(target, b"new")
    assert mode(target) == 0o644
    assert target.read_bytes() == b"new"


def test_content_is_written_exactly(tmp_path):
    data = bytes(range(256)) * 1000
    assert write_bytes_atomic(tmp_path / "b.bin", data) == tmp_path / "b.bin"
    assert (tmp_path / "b.bin").read_bytes() == data
    write_text_atomic(tmp_path / "t.txt", "Zoom-In µm α\n")
    assert (tmp_path / "t.txt").read_bytes() == "Zoom-In µm α\n".encode()
    write_text_atomic(tmp_path / "rows.csv", "a,b\r\n1,2\r\n", newline="")
    assert (tmp_path / "rows.csv").read_bytes() == b"a,b\r\n1,2\r\n"
    with atomic_open(tmp_path / "b.bin", "wb") as fh:  # replaces, never appends
        fh.write(b"short")
    assert (tmp_path / "b.bin").read_bytes() == b"short"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.bin", "rows.csv", "t.txt"]


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_failure_midway_keeps_the_old_file_and_leaves_nothing_behind(tmp_path, error):
    target = tmp_path / "result.json"
    target.write_text("old, complete")
    with pytest.raises(type(error)), atomic_open(target, "w", encoding="utf-8") as fh:
        fh.write("new and half")
        fh.flush()
        raise error
    assert target.read_text() == "old, complete"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]

    with pytest.raises(type(error)), atomic_path(tmp_path / "new.tif") as tmp:
        tmp.write_bytes(b"half a tiff")
        raise error
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_target_changes_only_when_the_block_ends(tmp_path):
    target = tmp_path / "slide.tif"
    target.write_bytes(b"old")
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
        assert target.read_bytes() == b"old"
        assert tmp.parent == tmp_path and tmp.name.startswith(".slide.tif.")
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["slide.tif"]


def test_missing_folder_raises_and_writes_nothing(tmp_path):
    with pytest.raises(FileNotFoundError):
        write_bytes_atomic(tmp_path / "no" / "such.bin", b"x")
    assert list(tmp_path.iterdir()) == []


def test_only_whole_file_modes_are_accepted(tmp_path):
    for bad in ("a", "ab", "r+", "x"):
        with (
            pytest.raises(ValueError, match="mode must be 'w' or 'wb'"),
            atomic_open(tmp_path / "f", bad),
        ):
            pass
    assert list(tmp_path.iterdir()) == []


def test_concurrent_writers_end_with_one_complete_file(tmp_path):
    target = tmp_path / "shared.bin"
    size, n_threads, rounds = 256 * 1024, 8, 5
    payloads = [bytes([i]) * size for i in range(n_threads)]
    start = threading.Barrier(n_threads)
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            for _ in range(rounds):
                start.wait()
                with atomic_open(target, "wb") as fh:
                    for k in range(0, size, 4096):  # interleave the writes of all threads
                        fh.write(payloads[i][k : k + 4096])
        except BaseException as exc:  # reported by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert target.read_bytes() in payloads
    assert [p.name for p in tmp_path.iterdir()] == ["shared.bin"]


@posix_only
@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o077, 0o600)])
def test_save_checkpoint_gets_the_umask_mode(tmp_path, mask, expected):
    demo = load_model("demo")
    with umask(mask):
        path = save_checkpoint(tmp_path / "model.safetensors", demo.model, demo.classes)
    assert mode(path) == expected
    reloaded = load_model(path)
    assert reloaded.classes == demo.classes
    for name, value in demo.model.state_dict().items():
        assert torch.equal(reloaded.model.state_dict()[name], value)
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
