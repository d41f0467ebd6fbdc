"""benchmarks/magnet_slides.py: its slide plan, its measures, and one tiny run end to end.

The benchmark's slides are 8192² and larger; here tiny pyramids of real files (a
tissue-coloured noise with one dark "tumour" block, its region in a JSON sidecar as
the sample slides write it) and a tiny MagNet trained for one step stand in for them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from benchmarks import magnet_slides as bench

from pyramid_files import write_openslide_layout

# a tiny MagNet: 1 box, then 2 boxes of 32² (the benchmark's default is 002's (2, 3, 3))
TINY = {
    "patches": [1, 2],
    "view_size": 8,
    "sample_size": 16,
    "classifier_size": 32,
    "localiser_channels": 2,
    "encoder_channels": [4],
    "feature_dim": 8,
    "gru_hidden": 8,
    "head_hidden": [8, 8],
    "lms_copies": 3,
}


def _slide(path: Path, label: str, seed: int, sidecar: bool = True) -> Path:
    """A 512² two-level pyramid of pink noise; a positive has a 64-px purple block.

    ``sidecar``: its regions in ``<stem>.json`` (the fresh slides'; beside a training
    slide the dataset would read it as annotations)."""
    rng = np.random.default_rng(seed)
    image = np.empty((512, 512, 3), np.uint8)
    image[..., 0] = rng.integers(200, 240, (512, 512))
    image[..., 1] = rng.integers(120, 160, (512, 512))
    image[..., 2] = rng.integers(170, 210, (512, 512))
    y, x = 64 + 32 * seed % 320, 96 + 16 * seed % 320
    regions = [
        {"kind": "Tumor" if label == "positive" else "Distractor", "y": y, "x": x, "box": 64}
    ]
    if label == "positive":
        image[y : y + 64, x : x + 64] = (90, 40, 120)
    write_openslide_layout(path, image, compression="zlib", tile=128, n_levels=2)
    if sidecar:
        path.with_suffix(".json").write_text(json.dumps({"label": label, "regions": regions}))
    return path


def test_area_fraction_and_cover_are_exact():
    # a quarter, a union (two overlapping boxes count once) and a box reaching past the edge
    assert bench.area_fraction([[0, 0, 512, 512]], (1024, 1024), grid=4) == 0.25
    assert bench.area_fraction([[0, 0, 512, 512], [256, 0, 512, 512]], (1024, 1024), 4) == 0.375
    assert bench.area_fraction([[768, 768, 1000, 1000]], (1024, 1024), grid=4) == 1 / 16
    assert bench._covers([10, 20, 5, 5], (10, 20)) and not bench._covers([10, 20, 5, 5], (15, 20))


def _noop(job):  # the slide writer, skipped: only the plan (names, seeds) is tested
    return job[0]


def test_a_smaller_run_takes_the_first_of_the_demos_slides(tmp_path, monkeypatch):
    """Same names, labels and seeds as the demo's first slides, so both share a cache."""
    demo = bench.demo_script()
    monkeypatch.setattr(demo, "_write", _noop)
    full = demo.make_slides(tmp_path, 1).read_text().splitlines()
    small = demo.make_slides(tmp_path, 1, 3, 2, "small.csv").read_text().splitlines()
    train = [r for r in full if r.endswith(",train")]
    val = [r for r in full if r.endswith(",val")]
    assert len(train) == demo.N_TRAIN and len(val) == demo.N_VAL
    assert small == [full[0], *train[:3], *val[:2]]
    assert small[1] == "train-00-positive-8192-seed1000.tif,positive,train"
    assert (tmp_path / "labels.csv").is_file()  # the demo's own list is left as it was


def test_row_configs_follow_the_demo_and_the_paper():
    args = argparse.Namespace(
        epochs=3, seed=0, magnet_set="{}", magnet_lr=1e-3, magnet_batch=4, ats_set="{}"
    )
    demo = bench.demo_script().CONFIG
    ats = bench.row_config("ats", args)
    assert ats["kind"] == "ats" and ats["epochs"] == 3
    assert "tile_size" not in ats and "stage2_scale" not in ats
    for key in ("view_scale", "subtile_size", "n_samples", "roi_labels", "feature_lr"):
        assert ats[key] == demo[key]
    magnet = bench.row_config("magnet", args)
    assert magnet["kind"] == "magnet" and magnet["lr_schedule"] == "cosine"
    assert magnet["pretrain_epochs"] == 0 and magnet["model_options"] == {"patches": [2, 3, 3]}


def test_tiny_magnet_trains_and_is_measured(tmp_path):
    """One training step and the evaluation of two fresh slides, through the children's
    code; the table's numbers are those of the per-slide rows."""
    rows = []
    for k, (label, split) in enumerate(
        [("positive", "train"), ("negative", "train"), ("positive", "val")]
    ):
        _slide(tmp_path / f"t{k}.tif", label, k, sidecar=False)
        rows.append(f"t{k}.tif,{label},{split}")
    labels = tmp_path / "labels.csv"
    labels.write_text("slide,label,split\n" + "\n".join(rows) + "\n")
    fresh = [
        (str(_slide(tmp_path / f"f{k}.tif", label, 10 + k)), 512, label, 10 + k)
        for k, label in enumerate(("positive", "negative"))
    ]
    args = argparse.Namespace(
        row="magnet",
        out=tmp_path / "out",
        labels=labels,
        epochs=1,
        seed=0,
        threads=1,
        magnet_lr=1e-3,
        magnet_batch=2,
        magnet_set=json.dumps(TINY),
        ats_set="{}",
        draws=1,
        jobs_json=json.dumps(fresh),
        model=None,
    )
    trained = bench.child_train(args)
    assert Path(trained["checkpoint"]).is_file() and trained["train_seconds"] > 0
    assert [h["epoch"] for h in trained["history"]] == [1]
    args.model = trained["checkpoint"]
    evaluated = bench.child_eval(args)
    slides = evaluated["slides"]
    assert [s["label"] for s in slides] == ["positive", "negative"]
    assert slides[1]["covers_tumour"] is None  # a negative has no tumour
    for s in slides:
        assert s["zoom"] >= 1.0 and 0 < s["area"] <= 1 and 0 <= s["full_detail"] <= 1
    row = bench.summarise("tiny", trained, evaluated)
    right = sum(s["label"] == s["predicted"] for s in slides)
    assert (row["right"], row["n"], row["n_pos"], row["n_neg"]) == (right, 2, 1, 1)
    assert row["fn"] == int(slides[0]["predicted"] == "negative")
    assert row["fp"] == int(slides[1]["predicted"] == "positive")
    assert row["covers"] == int(slides[0]["covers_tumour"])
    lines = bench.table([row]).splitlines()
    assert len(lines) == 3 and lines[2].startswith(f"| tiny | {right} / 2 ")
