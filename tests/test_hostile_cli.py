"""Hostile and mistaken command lines (issue 21): every one ends with a message that
names the flag or file, a non-zero exit, no traceback, no file left behind, its inputs
unchanged, and within a time limit.

The commands run in-process (``main(argv)`` in a thread, so that a hang fails the test
instead of freezing it); the few that need a real process (a closed stdout, a
scheduler that refuses) run in a subprocess.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from fixtures_data import TINY_ZOOMIN

TIME_LIMIT = 20.0
INTERNAL = "internal error"  # the top-level handler's words for a bug: a failure here


# ------------------------------------------------------------------------ inputs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A tiny model, a NaN-weights copy, three small slides, labels, ROI files."""
    from safetensors.torch import load_file, save_file

    from napari_zoomin.engine.checkpoints import _tensors_sha256, build_model, save_checkpoint

    root = tmp_path_factory.mktemp("hostile-cli-inputs")
    torch.manual_seed(0)
    model = save_checkpoint(
        root / "tiny.safetensors", build_model("zoomin", TINY_ZOOMIN), ["negative", "positive"]
    )
    tensors = load_file(model)
    with open(model, "rb") as fh:
        header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
    document = json.loads(header["__metadata__"]["napari_zoomin"])
    name = sorted(k for k in tensors if k.startswith("model.") and tensors[k].is_floating_point())
    tensors[name[0]] = torch.full_like(tensors[name[0]], math.nan)
    document["tensors_sha256"] = _tensors_sha256(tensors)
    from napari_zoomin.engine import checkpoints

    if "description_sha256" in document:
        document["description_sha256"] = checkpoints.description_sha256(document)
    nan_model = root / "nan.safetensors"
    save_file(tensors, nan_model, metadata={"napari_zoomin": json.dumps(document)})

    slides = root / "slides"
    slides.mkdir()
    rng = np.random.default_rng(0)
    for stem in ("a", "b", "c"):
        pixels = rng.integers(60, 200, (1024, 1024, 3), dtype=np.uint8)
        tifffile.imwrite(slides / f"{stem}.tif", pixels, tile=(256, 256), photometric="rgb")
    (slides / "broken.tif").write_bytes(b"II*\0" + os.urandom(2000))
    labels = root / "labels.csv"
    labels.write_text("slide,label,split\na.tif,negative,train\nb.tif,positive,train\n")
    bad_slide_labels = root / "bad-slide-labels.csv"
    bad_slide_labels.write_text(
        "slide,label,split\na.tif,negative,train\nb.tif,positive,train\nbroken.tif,positive,val\n"
    )
    rois = root / "rois"
    rois.mkdir()
    (rois / "b.geojson").write_text('{"type": "FeatureCollection", "features": [{{{')
    a_file = root / "a-file.txt"
    a_file.write_text("not a folder\n")
    binary = root / "binary.csv"
    binary.write_bytes(bytes(range(256)) * 4)
    a_folder = root / "a-folder"
    a_folder.mkdir()
    return {
        "root": root,
        "model": model,
        "nan_model": nan_model,
        "slides": slides,
        "slide": slides / "a.tif",
        "labels": labels,
        "bad_slide_labels": bad_slide_labels,
        "rois": rois,
        "file": a_file,
        "binary": binary,
        "folder": a_folder,
    }


def _tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with its SHA-256 (folders as "dir")."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_dir():
            out[str(p.relative_to(folder))] = "dir"
        elif p.stat().st_size > 2**26:
            out[str(p.relative_to(folder))] = f"{p.stat().st_size} bytes"
        else:
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_main(argv: list[str], capsys, limit: float = TIME_LIMIT) -> tuple[int, str, str]:
    """``main(argv)`` in a thread: (exit code, stdout, stderr); fails after TIME_LIMIT."""
    from napari_zoomin.cli import main

    box: dict = {}

    def target():
        try:
            box["rc"] = main(argv)
        except SystemExit as exc:  # argparse
            box["rc"] = exc.code
        except BaseException:
            import traceback

            box["rc"] = "traceback"
            box["tb"] = traceback.format_exc()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(limit)
    if thread.is_alive():
        pytest.fail(f"zoomin {' '.join(argv)} did not finish within {limit} s")
    captured = capsys.readouterr()
    err = captured.err + box.get("tb", "")
    return box["rc"], captured.out, err


# ------------------------------------------------------------------------ the corpus

BIG = str(10**9)
TRAIN = [  # a run that would train: tiny sizes, one epoch, the CPU
    "train", "--slides", "{slides}", "--labels", "{labels}", "--out", "{tmp}/m.safetensors",
    "--kind", "zoomin", "--tile", "128", "--subtile", "32", "--n", "2", "--feature-dim", "8",
    "--epochs", "1", "--batch-size", "2", "--s1", "0.0625", "--s2", "0.125",
    "--pretrain-epochs", "0", "--device", "cpu", "--val-fraction", "0",
]  # fmt: skip


def _train(*extra: str) -> list[str]:
    """TRAIN with ``extra`` flags (a later flag of the same name wins in argparse)."""
    return [*TRAIN, *extra]


CLASSIFY = ["classify", "{slide}", "--model", "{model}", "--out", "{tmp}/out", "--tissue", "none"]
BATCH = ["batch", "{slides}", "--model", "{model}", "--out", "{tmp}/r.csv", "--tissue", "none"]
BATCH_OK = [*BATCH, "--pattern", "a.tif", "--device", "cpu", "--workers", "1"]

# (argv template, a word the message must contain)
CASES: dict[str, tuple[list[str], str]] = {
    # classify: flags
    "classify-draws-0": ([*CLASSIFY, "--draws", "0"], "--draws"),
    "classify-draws-negative": ([*CLASSIFY, "--draws", "-3"], "--draws"),
    "classify-draws-int32-min": ([*CLASSIFY, "--draws", str(-(2**31))], "--draws"),
    "classify-draws-1e9": ([*CLASSIFY, "--draws", BIG], "--draws"),
    "classify-draws-text": ([*CLASSIFY, "--draws", "many"], "--draws"),
    "classify-seed-negative": ([*CLASSIFY, "--seed", "-1"], "--seed"),
    "classify-seed-2**64": ([*CLASSIFY, "--seed", str(2**64)], "--seed"),
    "classify-seed-float": ([*CLASSIFY, "--seed", "1e3"], "--seed"),
    "classify-device-meta": ([*CLASSIFY, "--device", "meta"], "--device"),
    "classify-device-mps": ([*CLASSIFY, "--device", "mps"], "--device"),
    "classify-device-cuda-99": ([*CLASSIFY, "--device", "cuda:99"], "--device"),
    "classify-device-gpu": ([*CLASSIFY, "--device", "gpu"], "--device"),
    "classify-mpp-0": ([*CLASSIFY, "--mpp", "0"], "--mpp"),
    "classify-mpp-nan": ([*CLASSIFY, "--mpp", "nan"], "--mpp"),
    # classify: where the results go
    "classify-out-existing-file": ([*CLASSIFY, "--out", "{file}"], "a-file.txt"),
    "classify-out-the-slide": ([*CLASSIFY, "--out", "{slide}"], "a.tif"),
    "classify-out-under-a-file": ([*CLASSIFY, "--out", "{file}/out"], "a-file.txt"),
    "classify-out-in-proc": ([*CLASSIFY, "--out", "/proc/zoomin-out"], "/proc"),
    "classify-out-empty": ([*CLASSIFY, "--out", ""], "--out"),
    # classify: models and slides
    "classify-model-nan-weights": ([*CLASSIFY, "--model", "{nan_model}"], "nan.safetensors"),
    "classify-model-is-a-slide": ([*CLASSIFY, "--model", "{slide}"], "a.tif"),
    "classify-model-is-a-folder": ([*CLASSIFY, "--model", "{folder}"], "a-folder"),
    "classify-model-missing": ([*CLASSIFY, "--model", "{tmp}/none.safetensors"], "none"),
    "classify-slide-missing": (["classify", "{tmp}/no.tif", "--model", "{model}"], "no.tif"),
    "classify-slide-broken": (
        ["classify", "{slides}/broken.tif", "--model", "{model}", "--out", "{tmp}/o"],
        "broken.tif",
    ),
    # sample
    "sample-size-1e9": (["sample", "--out", "{tmp}/s.tif", "--size", BIG], "--size"),
    "sample-size-0": (["sample", "--out", "{tmp}/s.tif", "--size", "0"], "--size"),
    "sample-size-negative": (["sample", "--out", "{tmp}/s.tif", "--size", "-5"], "--size"),
    "sample-seed-negative": (["sample", "--out", "{tmp}/s.tif", "--seed", "-1"], "--seed"),
    "sample-out-under-a-file": (["sample", "--out", "{file}/s.tif"], "a-file.txt"),
    "sample-out-a-folder": (["sample", "--out", "{folder}", "--size", "2048"], "a-folder"),
    # train: flags
    "train-n-1e9": (_train("--n", BIG), "--n"),
    "train-n-0": (_train("--n", "0"), "--n"),
    "train-subtile-0": (_train("--subtile", "0"), "--subtile"),
    "train-subtile-negative": (_train("--subtile", "-5"), "--subtile"),
    "train-subtile-larger-than-tile": (_train("--subtile", "512"), "subtile"),
    "train-tile-0": (_train("--tile", "0"), "--tile"),
    "train-tile-1e9": (_train("--tile", BIG), "--tile"),
    "train-feature-dim-1e9": (_train("--feature-dim", BIG), "--feature-dim"),
    "train-feature-dim-0": (_train("--feature-dim", "0"), "--feature-dim"),
    "train-val-fraction-1": (_train("--val-fraction", "1"), "--val-fraction"),
    "train-val-fraction-negative": (_train("--val-fraction", "-0.1"), "--val-fraction"),
    "train-val-fraction-nan": (_train("--val-fraction", "nan"), "--val-fraction"),
    "train-epochs-0": (_train("--epochs", "0"), "--epochs"),
    "train-batch-size-0": (_train("--batch-size", "0"), "--batch-size"),
    "train-lr-nan": (_train("--lr", "nan"), "--lr"),
    "train-lr-negative": (_train("--lr", "-1"), "--lr"),
    "train-s1-1e-9": (_train("--s1", "1e-9"), "--s1"),
    "train-s1-2": (_train("--s1", "2"), "--s1"),
    "train-entropy-inf": (_train("--entropy", "inf"), "--entropy"),
    "train-seed-2**64": (_train("--seed", str(2**64)), "--seed"),
    "train-device-meta": (_train("--device", "meta"), "--device"),
    "train-set-epochs-text": (_train("--set", '{"epochs": "x"}'), "epochs"),
    "train-set-epochs-0": (_train("--set", '{"epochs": 0}'), "epochs"),
    "train-set-lr-negative": (_train("--set", '{"lr": -1}'), "lr"),
    "train-set-seed-2**70": (_train("--set", f'{{"seed": {2**70}}}'), "seed"),
    "train-set-a-list": (_train("--set", "[1]"), "--set"),
    "train-set-unknown": (_train("--set", '{"bogus": 1}'), "bogus"),
    "train-set-n-float": (_train("--set", '{"n_samples": 1e9}'), "n_samples"),
    "train-set-contrastive-text": (_train("--set", '{"contrastive": "no"}'), "contrastive"),
    "train-set-roi-labels-number": (_train("--set", '{"roi_labels": 5}'), "roi_labels"),
    "train-set-layers-1e6": (
        _train("--set", '{"model_options": {"attention_layers": 1000000}}'),
        "attention_layers",
    ),
    # train: inputs and outputs, checked before the first resume state is written
    "train-out-a-folder": (_train("--out", "{folder}"), "a-folder"),
    "train-out-under-a-file": (_train("--out", "{file}/m.safetensors"), "a-file.txt"),
    "train-out-in-proc": (_train("--out", "/proc/m.safetensors"), "/proc"),
    "train-broken-roi-file": (_train("--annotations", "{rois}"), "b.geojson"),
    "train-broken-val-slide": (_train("--labels", "{bad_slide_labels}"), "broken.tif"),
    "train-init-from-nan-weights": (_train("--init-from", "{nan_model}"), "nan.safetensors"),
    # batch
    "batch-pattern-absolute": ([*BATCH, "--pattern", "/etc/*"], "--pattern"),
    "batch-pattern-empty": ([*BATCH, "--pattern", ""], "--pattern"),
    "batch-pattern-parent": ([*BATCH, "--pattern", "../*/*.tif"], "--pattern"),
    "batch-out-empty": ([*BATCH_OK, "--out", ""], "--out"),
    "batch-out-a-folder": ([*BATCH_OK, "--out", "{folder}"], "a-folder"),
    "batch-out-binary-file": ([*BATCH_OK, "--out", "{binary}"], "binary.csv"),
    "batch-out-under-a-file": ([*BATCH_OK, "--out", "{file}/r.csv"], "a-file.txt"),
    "batch-out-in-proc": ([*BATCH_OK, "--out", "/proc/r.csv"], "/proc"),
    "batch-scheduler-bogus": ([*BATCH_OK, "--scheduler", "not an address"], "--scheduler"),
    "batch-scheduler-refusing": ([*BATCH_OK, "--scheduler", "tcp://127.0.0.1:9"], "--scheduler"),
    "batch-draws-0": ([*BATCH_OK, "--draws", "0"], "--draws"),
    "batch-workers-0": ([*BATCH_OK, "--workers", "0"], "--workers"),
    "batch-workers-1e6": ([*BATCH_OK, "--workers", "1000000"], "--workers"),
    "batch-device-meta": ([*BATCH_OK, "--device", "meta"], "--device"),
    "batch-model-nan-weights": ([*BATCH_OK, "--model", "{nan_model}"], "nan.safetensors"),
    "batch-folder-missing": (["batch", "{tmp}/nowhere", "--out", "{tmp}/r.csv"], "nowhere"),
    # info
    "info-missing": (["info", "{tmp}/no.svs"], "no.svs"),
    "info-a-folder": (["info", "{folder}"], "a-folder"),
}


def _fill(argv: list[str], inputs: dict[str, Path], tmp: Path) -> list[str]:
    names = {k: str(v) for k, v in inputs.items()} | {"tmp": str(tmp)}
    out = []
    for arg in argv:
        for key, value in names.items():
            arg = arg.replace("{" + key + "}", value)
        out.append(arg)
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_command_line(name, inputs, tmp_path, capsys):
    argv, word = CASES[name]
    if name == "classify-device-mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    work = tmp_path / "work"
    work.mkdir()
    argv = _fill(argv, inputs, work)
    before_inputs, before_work = _tree(inputs["root"]), _tree(work)
    rc, out, err = run_main(argv, capsys)
    assert rc not in (0, "traceback"), f"exit {rc}\n{out}\n{err}"
    assert "Traceback" not in err and INTERNAL not in err, err
    assert word in err, f"{word!r} not in: {err}"
    assert _tree(work) == before_work, "files left behind"
    assert _tree(inputs["root"]) == before_inputs, "an input changed"
    assert not (Path("/proc") / "zoomin-out").exists()


def test_corpus_size():
    assert len(CASES) >= 60


# ------------------------------------------------------------------------ real processes


def _zoomin(*args: str, **kwargs) -> subprocess.CompletedProcess:
    code = "import sys; from napari_zoomin.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60, **kwargs
    )


def test_closed_stdout_is_no_traceback(inputs):
    """``zoomin info slide | (exit)``: the reader went away; one line at most, no traceback."""
    code = "import sys; from napari_zoomin.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "info", str(inputs["slide"])],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # nobody reads: the first print meets a broken pipe
    _, err = proc.communicate(timeout=60)
    err = err.decode()
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert proc.returncode != 0


def test_stdout_closed_fd_is_no_traceback(inputs, tmp_path):
    proc = subprocess.run(
        f"{sys.executable} -c 'import sys; from napari_zoomin.cli import main; "
        f"sys.exit(main(sys.argv[1:]))' info {inputs['slide']} >&-",
        shell=True,
        capture_output=False,
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
    )
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr


def test_refusing_scheduler_fails_fast(inputs, tmp_path):
    import time

    start = time.perf_counter()
    done = _zoomin(
        "batch", str(inputs["slides"]), "--model", str(inputs["model"]), "--out",
        str(tmp_path / "r.csv"), "--scheduler", "tcp://127.0.0.1:9", "--device", "cpu",
    )  # fmt: skip
    assert time.perf_counter() - start < 25
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "--scheduler" in done.stderr and "tcp://127.0.0.1:9" in done.stderr
    assert not (tmp_path / "r.csv").exists()


# ------------------------------------------------------------------------ the top-level handler


def test_unexpected_error_is_one_line_and_a_saved_traceback(monkeypatch, capsys, tmp_path):
    from napari_zoomin import cli

    monkeypatch.setenv("NAPARI_ZOOMIN_DATA", str(tmp_path / "data"))

    def boom(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "_cmd_info", boom)
    assert cli.main(["info", "x.svs"]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "RuntimeError: a bug" in lines[0] and "Traceback" not in err
    saved = Path(lines[0].rsplit(" ", 1)[-1].rstrip("."))
    assert saved.is_file() and saved.is_relative_to(tmp_path / "data")
    text = saved.read_text()
    assert "Traceback" in text and "RuntimeError: a bug" in text and "info x.svs" in text


def test_interrupt_is_one_line_and_130(monkeypatch, capsys):
    from napari_zoomin import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_info", interrupted)
    assert cli.main(["info", "x.svs"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "zoomin: interrupted"


def test_train_refusal_leaves_no_resume_file(inputs, tmp_path, capsys):
    """The broken ROI file is found before training writes anything."""
    out = tmp_path / "m.safetensors"
    argv = _fill(_train("--annotations", "{rois}", "--out", str(out)), inputs, tmp_path)
    rc, _, err = run_main(argv, capsys)
    assert rc == 1 and "b.geojson" in err
    assert sorted(tmp_path.iterdir()) == []


def test_batch_draws_0_rows_are_not_written(inputs, tmp_path, capsys):
    out = tmp_path / "r.csv"
    argv = _fill([*BATCH_OK, "--draws", "0", "--out", str(out)], inputs, tmp_path)
    rc, _, err = run_main(argv, capsys)
    assert rc == 2 and "--draws" in err and not out.exists()
