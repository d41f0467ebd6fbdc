"""The zoomin command line on real files."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures_data import TINY_ZOOMIN, write_cohort
from napari_zoomin.cli import main


def test_info_prints_json(cmu_svs, capsys):
    assert main(["info", str(cmu_svs)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["vendor"] == "aperio"
    assert info["level_shapes"] == [[2967, 2220]]
    assert info["mpp"] == [0.499, 0.499]
    assert info["associated_images"] == ["label", "macro", "thumbnail"]


def test_info_forced_backend(pyramids, capsys):
    path = str(pyramids["openslide", "zlib"])
    assert main(["info", path, "--backend", "openslide"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backend"] == "openslide" and info["level_count"] == 3
    assert main(["info", path]) == 0
    assert json.loads(capsys.readouterr().out)["backend"] == "tifffile"


def test_console_script_is_installed(cmu_svs):
    """The `zoomin` entry point of the installed package, as a user runs it."""
    exe = Path(sys.executable).parent / "zoomin"
    done = subprocess.run([exe, "info", str(cmu_svs)], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout)["vendor"] == "aperio"
    bad = subprocess.run([exe, "info", "/no/such/slide.svs"], capture_output=True, text=True)
    assert bad.returncode == 1
    assert bad.stderr.strip() == "zoomin: error: /no/such/slide.svs: no such file. Check the path."


def test_the_command_exits_as_python_would_less_its_teardown(cmu_svs):
    """``zoomin`` ends with os._exit (issue 22: 0.13 s of a classification process),
    after what a normal exit guarantees: other threads finished, exit handlers run,
    buffered output flushed, the exit status kept."""
    program = """
import atexit, sys, threading, time
from napari_zoomin.cli import run
atexit.register(lambda: print("handler ran"))
threading.Thread(target=lambda: (time.sleep(0.3), print("thread finished"))).start()
sys.argv = ["zoomin", *sys.argv[1:]]
run()
"""
    done = subprocess.run(
        [sys.executable, "-c", program, "info", str(cmu_svs)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    info, *rest = done.stdout.strip().rsplit("}", 1)
    assert json.loads(info + "}")["vendor"] == "aperio"
    assert rest[0].split() == ["thread", "finished", "handler", "ran"]  # in Python's order
    bad = subprocess.run(
        [sys.executable, "-c", program, "info", "/no/such/slide.svs"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and bad.stdout.split() == ["thread", "finished", "handler", "ran"]
    assert bad.stderr.strip() == "zoomin: error: /no/such/slide.svs: no such file. Check the path."


def test_classify_writes_result_json_and_outputs(tmp_path, capsys):
    from napari_zoomin.engine.checkpoints import build_model, save_checkpoint
    from napari_zoomin.samples import write_sample_slide

    slide = write_sample_slide(tmp_path / "s.tif", size=8192, label="positive", seed=5).path
    model = build_model(
        "zoomin",
        {
            "view_scale": 1 / 16,
            "stage2_scale": 1 / 8,
            "tile_size": (256, 256),
            "subtile_size": (32, 32),
            "n_samples": 8,
            "feature_dim": 16,
            "feature_hidden": 16,
        },
    )
    ckpt = save_checkpoint(tmp_path / "m.safetensors", model, ["negative", "positive"])
    out = tmp_path / "out"
    code = main(
        [
            "classify",
            str(slide),
            "--model",
            str(ckpt),
            "--out",
            str(out),
            "--draws",
            "2",
            "--seed",
            "3",
            "--device",
            "cpu",
            "--threads",
            "1",
        ]
    )
    assert code == 0
    summary = capsys.readouterr().out.splitlines()[0]
    assert summary.startswith("s.tif: ") and "over 2 draws" in summary
    result = json.loads((out / "result.json").read_text())
    for key in (
        "label",
        "probabilities",
        "subtiles",
        "pixels_decoded",
        "pixels_needed",
        "seconds",
        "model_sha256",
    ):
        assert key in result
    assert result["label"] in ("negative", "positive")
    assert result["threads"] == 1  # what reproduces it
    assert sum(result["probabilities"].values()) == __import__("pytest").approx(1.0)
    assert result["pixels_needed"] <= result["pixels_decoded"]
    assert (out / "sampled.geojson").is_file() and (out / "stage1_attention.ome.tif").is_file()


@pytest.mark.parametrize("bad", ["0", "two", "-3", "2000"])
def test_classify_bad_threads_is_a_clear_error(tmp_path, capsys, bad):
    with pytest.raises(SystemExit) as info:
        main(["classify", str(tmp_path / "s.tif"), "--threads", bad])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--threads" in err and "Traceback" not in err


def test_classify_unknown_model_is_a_clear_error(tmp_path, capsys, pyramids):
    assert main(["classify", str(pyramids["openslide", "zlib"]), "--model", "nosuch"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == (
        "zoomin: error: unknown model name 'nosuch'. Use 'demo' or the path of a "
        ".safetensors checkpoint."
    )


# ---------------------------------------------------------------- defaults, as a user runs them
# Every test above passes --device; these run with none (the default "auto"), which is
# how a user runs ``zoomin batch`` and ``zoomin classify`` (a batch once failed on every
# slide with "Expected one of cpu, cuda, ... device type at start of device string: auto").


@pytest.fixture(scope="module")
def two_slides(tmp_path_factory, cmu_svs):
    return write_cohort(tmp_path_factory.mktemp("cohort"), ("a", "b"), cmu_svs)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    import torch

    from napari_zoomin.engine.checkpoints import build_model, save_checkpoint

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "zoomin.safetensors"
    return save_checkpoint(path, build_model("zoomin", TINY_ZOOMIN), ["negative", "positive"])


def _auto_device() -> str:
    from napari_zoomin.engine.runtime import select_device

    return str(select_device("auto"))


def test_batch_with_default_device(two_slides, tiny_model, tmp_path, capsys):
    out = tmp_path / "results.csv"
    code = main(["batch", str(two_slides), "--model", str(tiny_model), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"2 slides in {out} (0 failed)" in captured.out
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [row["name"] for row in rows] == ["a.tif", "b.tif"]
    for row in rows:
        assert row["error"] == "", row["error"]
        assert row["label"] in ("negative", "positive")
        assert row["device"] == _auto_device() and row["draws"] == "16"


def test_classify_with_default_device(two_slides, tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        ["classify", str(two_slides / "a.tif"), "--model", str(tiny_model), "--out", str(out)]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.startswith("a.tif: ")
    result = json.loads((out / "result.json").read_text())
    assert result["label"] in ("negative", "positive")
    assert result["device"] == _auto_device()
