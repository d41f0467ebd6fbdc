"""run_batch(): a LocalCluster of 2 worker processes over real sample slides and a corrupt file."""

from __future__ import annotations

import csv
import hashlib

import pandas as pd
import pytest
import torch

from fixtures_data import TINY_ZOOMIN, write_cohort
from napari_zoomin.engine.batch import classify_task, csv_columns, discover_slides, run_batch
from napari_zoomin.engine.checkpoints import build_model, save_checkpoint
from napari_zoomin.errors import ZoominError

CONFIG = TINY_ZOOMIN


@pytest.fixture(scope="module")
def folder(tmp_path_factory, cmu_svs):
    folder = write_cohort(tmp_path_factory.mktemp("cohort"), ("a", "b", "c"), cmu_svs)
    # a valid TIFF header pointing at a directory of noise
    (folder / "broken.tif").write_bytes(b"II*\x00\x08\x00\x00\x00" + bytes(range(256)) * 8)
    (folder / ".hidden.tif").write_bytes(b"not a slide")
    (folder / "notes.txt").write_text("not a slide")
    return folder


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "zoomin.safetensors"
    return save_checkpoint(path, build_model("zoomin", CONFIG), ["negative", "positive"])


def test_discover_slides(folder):
    assert [p.name for p in discover_slides(folder)] == ["a.tif", "b.tif", "broken.tif", "c.tif"]
    assert [p.name for p in discover_slides(folder, "[ab].tif")] == ["a.tif", "b.tif"]
    with pytest.raises(ZoominError, match="not a folder"):
        discover_slides(folder / "a.tif")


def test_batch_resumes_and_records_failures(folder, model_path, tmp_path):
    out = tmp_path / "results.csv"
    seen = []
    table = run_batch(
        folder, model_path, out, workers=2, draws=2, progress=lambda f, m: seen.append((f, m))
    )
    assert len(table) == 4
    assert list(table["name"]) == ["a.tif", "b.tif", "broken.tif", "c.tif"]
    failed = table[table["error"] != ""]
    assert list(failed["name"]) == ["broken.tif"]
    message = failed["error"].iloc[0]
    assert message.startswith("SlideError:") and "broken.tif" in message
    ok = table[table["error"] == ""]
    assert set(ok["label"]) <= {"negative", "positive"}
    assert ((ok["p_negative"] + ok["p_positive"] - 1).abs() < 1e-6).all()
    assert (ok["pixels_decoded"] >= ok["pixels_needed"]).all() and (ok["pixels_needed"] > 0).all()
    sha = hashlib.sha256(model_path.read_bytes()).hexdigest()
    assert (table["model_sha256"] == sha).all() and (table["model_kind"] == "zoomin").all()
    assert ok["worker"].str.startswith("tcp://").all()
    # the model has no training profile and no pixel size: every row says so
    assert ok["warnings"].str.contains("does not describe its training slides").all()
    assert ok["warnings"].str.contains("Read in pixels").all()
    assert (ok["places"].astype(int) >= 1).all()
    assert seen[0] == (0.0, "4 of 4 slides to classify") and seen[-1][0] == 1.0

    # the CSV on disk is the table, readable by the csv module and pandas
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == csv_columns(["negative", "positive"])
    assert len(rows) == 4
    first = pd.read_csv(out)
    print("\n" + first[["name", "label", "p_positive", "pixels_decoded", "seconds"]].to_string())

    # a re-run skips the three done and retries the failed one (still failing)
    seen.clear()
    again = run_batch(
        folder, model_path, out, workers=2, draws=2, progress=lambda f, m: seen.append((f, m))
    )
    assert seen[0] == (0.0, "1 of 4 slides to classify")
    assert [m for _, m in seen[1:]] == [m for _, m in seen[1:] if m.startswith("broken.tif")]
    assert len(again) == 4 and list(again["error"] != "") == [False, False, True, False]
    done = again[again["error"] == ""]
    assert list(done["finished"]) == list(ok["finished"])  # untouched rows
    assert list(done["p_positive"]) == list(ok["p_positive"])
    assert len(pd.read_csv(out)) == 4


def test_interrupted_batch_keeps_rows(folder, model_path, tmp_path):
    """Rows written before an interruption count as done (no cluster needed to check)."""
    out = tmp_path / "results.csv"
    sha = hashlib.sha256(model_path.read_bytes()).hexdigest()
    model = {"path": str(model_path), "sha256": sha, "kind": "zoomin"}
    classes = ["negative", "positive"]
    options = {"draws": 1, "seed": 0, "device": "cpu", "mode": "sample", "tissue": "auto"}
    rows = [classify_task(str(folder / n), model, classes, options) for n in ("a.tif", "c.tif")]
    assert [r["error"] for r in rows] == ["", ""]
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=csv_columns(classes))
        writer.writeheader()
        writer.writerows(rows)
    table = run_batch(folder, model_path, out, workers=1, draws=1, pattern="[ac].tif")
    assert list(table["finished"]) == [r["finished"] for r in rows]  # nothing re-run


def test_csv_of_another_model_is_refused(folder, model_path, tmp_path):
    out = tmp_path / "results.csv"
    row = dict.fromkeys(csv_columns(["negative", "positive"]), "")
    row.update(slide=str(folder / "a.tif"), model_sha256="0" * 64)
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(row))
        writer.writeheader()
        writer.writerow(row)
    with pytest.raises(ZoominError, match="another model"):
        run_batch(folder, model_path, out)
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ZoominError, match="other columns"):
        run_batch(folder, model_path, tmp_path / "other.csv")


def test_empty_folder(tmp_path, model_path):
    with pytest.raises(ZoominError, match="holds no slides"):
        run_batch(tmp_path, model_path, tmp_path / "results.csv")


def test_task_resolves_auto_device_and_keys_its_cache_by_it(folder, model_path):
    """``--device auto`` (the CLI's default) reaches the workers as "auto": each resolves it."""
    from napari_zoomin.engine import batch
    from napari_zoomin.engine.runtime import select_device

    sha = hashlib.sha256(model_path.read_bytes()).hexdigest()
    model = {"path": str(model_path), "sha256": sha, "kind": "zoomin"}
    classes = ["negative", "positive"]
    options = {"draws": 1, "seed": 0, "device": "auto", "mode": "sample", "tissue": "auto"}
    batch._MODELS.clear()
    row = classify_task(str(folder / "a.tif"), model, classes, options)
    assert row["error"] == "" and row["label"] in classes
    resolved = str(select_device("auto"))
    assert row["device"] == resolved
    assert list(batch._MODELS) == [(str(model_path), sha, resolved)]
    cached = batch._MODELS[str(model_path), sha, resolved]
    explicit = classify_task(str(folder / "c.tif"), model, classes, {**options, "device": resolved})
    assert explicit["error"] == "" and batch._MODELS[str(model_path), sha, resolved] is cached

    bad = classify_task(str(folder / "a.tif"), model, classes, {**options, "device": "gpu"})
    assert bad["error"].startswith("ClassificationError: cannot use device 'gpu'")
    assert bad["error"].endswith("Use --device cpu or auto.") and bad["label"] == ""
    batch._MODELS.clear()
