"""The ``Train classifier`` widget's Qt-free controller, driven without a viewer."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from napari_zoomin.cli import build_parser
from napari_zoomin.engine.dataset import read_labels
from napari_zoomin.errors import LabelsError, TrainingError
from napari_zoomin.napari import train_controller as tc
from napari_zoomin.napari.train_controller import (
    FROM_FOLDER,
    FROM_VIEWER,
    PROGRESS_STEPS,
    Failure,
    Form,
    PlotPoint,
    Shown,
    Split,
    TrainController,
    config_from_form,
    form_value,
)
from napari_zoomin.train_settings import TRAIN_SETTINGS
from napari_zoomin.training import (
    EpochStep,
    Pretrained,
    Pretraining,
    PretrainProgress,
    Resolution,
    ResumePlan,
    TrainConfig,
    TrainEvent,
    TrainResult,
    Validated,
    Validating,
)

#: what a user types into the form (text where the form asks for text)
TYPED = {
    "kind": "ats",
    "epochs": 3,
    "n_samples": 12,
    "device": "cpu",
    "batch_size": 2,
    "lr": "1e-3",
    "view_scale": "1/64",
    "stage2_scale": "0.25",
    "tile_size": 128,
    "subtile_size": 16,
    "entropy_weight": "0",
    "contrastive": False,
    "contrastive_warmup_epochs": 1,
    "pixel_weight": "2.5",
    "roi_labels": " Tumor, Stroma ,, ",
}


def test_the_form_gives_its_train_config():
    config = config_from_form(TYPED, '{"val_draws": 2, "seed": 7}')
    assert config == TrainConfig(
        kind="ats",
        epochs=3,
        n_samples=12,
        device="cpu",
        batch_size=2,
        lr=0.001,
        view_scale=1 / 64,
        stage2_scale=0.25,
        tile_size=128,
        subtile_size=16,
        entropy_weight=0.0,
        contrastive=False,
        contrastive_warmup_epochs=1,
        pixel_weight=2.5,
        roi_labels=("Tumor", "Stroma"),
        val_draws=2,
        seed=7,
    )
    # the form's starting values are TrainConfig's defaults, as the form shows them
    assert form_value("view_scale") == "1/16" and form_value("stage2_scale") == "1/8"
    assert form_value("lr") == "0.0001" and form_value("roi_labels") == "Tumor"
    assert config_from_form({name: form_value(name) for name in TRAIN_SETTINGS}) == TrainConfig()
    # the form shows every setting of the table, each a TrainConfig field, once
    assert list(tc.MAIN_SETTINGS + tc.ADVANCED_SETTINGS) == list(TRAIN_SETTINGS)
    assert set(TRAIN_SETTINGS) <= set(TrainConfig.__dataclass_fields__)
    assert len(tc.ADVANCED_SETTINGS) + 1 == 13  # folded: these and "Other settings (JSON)"


@pytest.mark.parametrize(
    ("typed", "other", "error", "message"),
    [
        ({"lr": "fast"}, "", ValueError, "Learning rate: 'fast' is not a number (e.g. 1e-4"),
        ({"lr": "0"}, "", ValueError, "Learning rate must be above 0, got 0."),
        ({"lr": "inf"}, "", ValueError, "Learning rate: 'inf' is not a finite number."),
        ({"epochs": 0}, "", ValueError, "Epochs must be at least 1, got 0."),
        ({"view_scale": "2"}, "", ValueError, "Stage-1 scale (s1) must be at most 1, got 2."),
        ({"stage2_scale": "1/0"}, "", ValueError, "Stage-2 scale (s2): '1/0' is not a number"),
        ({"n_samples": 10_001}, "", ValueError, "Tiles per slide must be at most 10000, got"),
        (
            {"tile_size": 64, "subtile_size": 128},
            "",
            TrainingError,
            "subtile_size (128, 128) must not exceed tile_size (64, 64)",
        ),
        ({}, '{"epochs": 0}', TrainingError, "Epochs (epochs) must be in [1, 100000], got 0"),
        ({}, '{"val_draws": "x"}', TrainingError, "val_draws must be a whole number, got 'x'"),
        ({}, '{"speed": 2}', ValueError, "Other settings: unknown setting(s) speed; known:"),
        ({}, "{epochs: 1}", ValueError, "Other settings are not valid JSON"),
        ({}, "[1]", ValueError, "Other settings must be a JSON object"),
    ],
)
def test_refused_values_name_the_setting(typed, other, error, message):
    values = {name: form_value(name) for name in TRAIN_SETTINGS} | typed
    with pytest.raises(error) as info:
        config_from_form(values, other)
    assert message in str(info.value)


@pytest.mark.parametrize(
    "name", [n for n, s in TRAIN_SETTINGS.items() if s.high is not None and s.low is not None]
)
def test_the_table_the_config_and_the_flags_agree_on_each_range(name):
    """The form's range of a setting is exactly what TrainConfig and ``zoomin train`` take."""
    setting = TRAIN_SETTINGS[name]
    whole = setting.entry == "spin"
    base = {"subtile_size": {"tile_size": 65_536}, "tile_size": {"subtile_size": 1}}.get(name, {})
    inside = [setting.high] + ([] if setting.low_open else [setting.low])
    step = 1 if whole else setting.high * 1e-3
    outside = [setting.high + step, setting.low - (1 if whole else setting.low or 1e-3)]
    if setting.low_open:
        outside.append(setting.low)
    for value in inside:
        value = int(value) if whole else float(value)
        assert getattr(TrainConfig(**base, **{name: value}), name) == value
    parser = build_parser()
    required = ["train", "--slides", ".", "--labels", "x.csv", "--out", "m.safetensors"]
    for value in outside:
        value = int(value) if whole else float(value)
        with pytest.raises(TrainingError, match=rf"\b{name}\b"):
            TrainConfig(**base, **{name: value})
        with pytest.raises(ValueError, match=re.escape(f"{setting.label} must be")):
            config_from_form({name: value if whole else str(value)})
        with pytest.raises(SystemExit):
            parser.parse_args([*required, setting.flag, str(value)])
    for value in inside:
        text = str(int(value) if whole else float(value))
        assert parser.parse_args([*required, setting.flag, text]) is not None


def test_progress_events_become_bar_values_and_messages():
    controller = TrainController()
    # the split comes first: no validation slide is said, and warned about
    shown = controller.progress(Split(train=2, val=0, test=1))
    assert shown.split_note.startswith(
        "Split: 2 slides for training, 0 for validation (1 test slide(s) not used). "
        "No validation slide: validation accuracy will not be measured"
    )
    assert shown.warning.startswith("Train classifier: No validation slide:")
    assert (shown.status, shown.bar) == (None, None)
    assert controller.progress(Split(3, 1, 0)) == Shown(
        split_note="Split: 3 slides for training, 1 for validation."
    )
    assert controller.train_share == 0.75
    assert controller.progress(Resolution(0, 4, None, "training in pixels")) == Shown(
        warning="Train classifier: training in pixels"
    )
    assert controller.progress(Pretraining(0, 4, 0, 5, 2)) == Shown(
        status="pre-training on ROI patches before epoch 1 (5 epochs, 2 annotated slide(s))…",
        busy=True,
        bar_text="pre-training…",
    )
    assert controller.progress(PretrainProgress(0, 4, 4, 10, "feature", 2, 5, 0.75)) == Shown(
        status="pre-training the feature network on ROI patches: epoch 2/5 (step 4/10), loss 0.75",
        busy=False,
        bar_text="pre-training: %p%",
        bar=400,
    )
    shown = controller.progress(PretrainProgress(0, 4, 1, 10, "stage1_attention", 1, 5, 0.5))
    assert shown.status.startswith("pre-training the stage-1 attention network on ROI")
    assert shown.bar == 100  # pre-training's own bar
    assert controller.progress(Pretrained(0, 4, 5, 5, 0.5, {"feature": 0.5})) == Shown(
        status="pre-training done (loss 0.5); training epoch 1…", busy=False, bar_text="%p%", bar=0
    )
    # training: a quarter of each epoch is validation (3 training, 1 validation slide)
    assert controller.progress(EpochStep(2, 4, 1, 2, 0.25, 1.0)) == Shown(
        status="epoch 2/4, step 1/2, loss 0.25",
        busy=False,
        bar_text="epoch 2/4: %p%",
        bar=round(PROGRESS_STEPS * (1 + 0.75 / 2) / 4),
    )
    shown = controller.progress(Validating(2, 4, 1, 2))
    assert shown.status == "epoch 2/4: validating (1/2)…"
    assert shown.bar == round(PROGRESS_STEPS * (1 + 0.75 + 0.25 / 2) / 4)
    shown = controller.progress(Validated(2, 4, 2, 2, 0.5, 0.75, 0.625, 0.6, True, 2, False))
    assert shown.status == "epoch 2/4: loss 0.5, validation accuracy 0.625 (best so far)"
    assert (shown.bar, shown.plot) == (PROGRESS_STEPS // 2, PlotPoint(0.5, 0.625))
    assert (controller.losses, controller.accuracies) == ([0.5], [0.625])
    shown = controller.progress(Validated(3, 4, 2, 2, 0.4, 0.75, None, None, False, 2, False))
    assert shown.status == "epoch 3/4: loss 0.4, validation accuracy n/a (no validation slides)"
    # never backwards (a resumed epoch's first event), and resumed runs say so
    controller.resumed_from = 2
    shown = controller.progress(EpochStep(1, 4, 1, 2, 0.3, 1.0))
    assert shown.bar == 3 * PROGRESS_STEPS // 4
    assert shown.status == "Resumed; epoch 1/4, step 1/2, loss 0.3"
    # an event of a kind the widget does not know changes nothing
    assert controller.progress(TrainEvent(1, 4)) is None


def test_the_viewer_slides_become_a_labels_csv_read_back_as_training(tmp_path):
    """Slides in two folders: named relative to their common folder, the run's slides
    folder; "auto" is a seeded validation share per class; unlabelled slides stay out."""
    for sub, name in [("a", "pos1"), ("a", "neg1"), ("b/c", "pos2"), ("b", "neg2"), ("b", "x")]:
        (tmp_path / "slides" / sub).mkdir(parents=True, exist_ok=True)
        (tmp_path / "slides" / sub / f"{name}.tif").write_bytes(b"")
    s = tmp_path / "slides"
    rows = [
        (s / "a/pos1.tif", "positive", "auto"),
        (s / "b/c/pos2.tif", "positive", "auto"),
        (s / "a/neg1.tif", "negative", "train"),
        (s / "b/neg2.tif", "negative", "val"),
        (s / "b/x.tif", "", "auto"),  # no label: not used
    ]
    out = tmp_path / "models" / "run.safetensors"
    csv_path, root = tc.write_labels_csv(rows, out, seed=0)
    assert csv_path == tmp_path / "models" / "run.labels.csv" and root == s.resolve()
    with open(csv_path, newline="") as f:
        written = list(csv.reader(f))
    assert written[0] == ["slide", "label", "split"]
    assert [r[:2] for r in written[1:]] == [
        ["a/pos1.tif", "positive"],
        ["b/c/pos2.tif", "positive"],
        ["a/neg1.tif", "negative"],
        ["b/neg2.tif", "negative"],
    ]
    assert sorted(r[2] for r in written[1:3]) == ["train", "val"]
    assert [r[2] for r in written[3:]] == ["train", "val"]
    # read back as training reads it: the same slides, labels and splits
    records, classes = read_labels(csv_path, root)
    assert classes == ["negative", "positive"]
    assert [(r.path, r.label, r.split) for r in records] == [
        (p.resolve(), lab, split)
        for (p, lab, _), (*_, split) in zip(rows, written[1:], strict=False)
    ]
    with pytest.raises(ValueError, match="no slide has a label"):
        tc.write_labels_csv([(s / "b/x.tif", "", "auto")], out, seed=0)


def test_prepare_checks_the_data_and_plans_a_fresh_run(tmp_path):
    (tmp_path / "slides").mkdir()
    (tmp_path / "slides" / "a.tif").write_bytes(b"")
    (tmp_path / "slides" / "b.tif").write_bytes(b"")
    labels = tmp_path / "labels.csv"
    labels.write_text("slide,label\na,positive\nb,negative\n")
    controller = TrainController()
    form = Form(
        settings=dict(TYPED),
        out_path=str(tmp_path / "out" / "model"),
        source=FROM_FOLDER,
        slides_dir=str(tmp_path / "slides"),
        labels_csv=str(labels),
    )
    job, note = controller.prepare(form)
    assert note == "Reading the slides…" and controller.resumed_from is None
    assert job.out_path == tmp_path / "out" / "model.safetensors"  # the suffix added
    s = tmp_path / "slides"
    assert (job.slides_dir, job.labels_csv, job.annotations_dir) == (s, labels, None)
    assert job.config == config_from_form(TYPED) and job.resume is False
    assert controller.bar == 0 and controller.losses == []

    for change, message in [
        ({"slides_dir": ""}, "choose the slides folder"),
        ({"slides_dir": str(s / "nope")}, "nope does not exist. Choose the folder"),
        ({"labels_csv": str(s / "none.csv")}, "none.csv does not exist"),
        ({"annotations_dir": str(s / "rois")}, "the ROI folder"),
        ({"out_path": "  "}, "choose where to save the checkpoint"),
        ({"out_path": str(s / "m.last.safetensors")}, "is the training state's"),
        ({"source": FROM_VIEWER}, "no slide has a label"),
    ]:
        with pytest.raises(ValueError, match=message):
            controller.prepare(Form(**{**form.__dict__, **change}))
    # the viewer's slides: their CSV is written beside the checkpoint
    viewer = Form(
        **{**form.__dict__, "source": FROM_VIEWER},
    )
    viewer.viewer_slides = [(s / "a.tif", "positive", "train"), (s / "b.tif", "negative", "train")]
    job, _ = controller.prepare(viewer)
    assert job.labels_csv == tmp_path / "out" / "model.labels.csv"
    assert job.slides_dir == s.resolve()


def test_resume_texts_and_the_end_of_a_run(tmp_path):
    out = tmp_path / "model.safetensors"
    last = tmp_path / "model.last.safetensors"
    assert tc.saved_run_note(out) == ""  # nothing saved yet
    assert tc.resume_text(ResumePlan("fresh", last), out) == ""
    restarted = ResumePlan("fresh", last, restarted=True)
    assert tc.resume_text(restarted, out) == (
        "The run in model.safetensors had finished; training from the start."
    )
    run = SimpleNamespace(state=SimpleNamespace(epoch=2, step=3, history=[]))
    assert tc.resume_text(ResumePlan("resume", last, run), out) == (
        "Resumed the interrupted run at epoch 3, step 4."
    )

    controller = TrainController()
    out.write_bytes(b"")  # the best model's file exists
    result = TrainResult([{"epoch": 1}], 1, 0.75, out, last)
    done = controller.finish(result)
    assert done.status == (
        f"Done: best epoch 1, validation accuracy 0.750. Model: {out}; training state: {last}."
    )
    assert done.model == out and done.full and controller.bar == PROGRESS_STEPS
    assert done.info.startswith(f"napari-zoomin: trained model saved to {out} (best epoch 1")
    cancelled = controller.finish(TrainResult([], None, None, tmp_path / "none", last, True))
    assert cancelled.status.startswith("Cancelled after 0 epoch(s)")
    assert cancelled.info.endswith("No epoch had finished, so there is no model yet.")
    assert cancelled.model is None and not cancelled.full
    state = controller.finish(Failure(TrainingError(last, "is damaged.")))
    assert (
        state.status == f"Stopped: {last}: is damaged. In the widget: untick 'Resume an "
        "interrupted run' to start over."
    )
    assert state.error == "napari-zoomin: " + state.status.removeprefix("Stopped: ")
    bug = controller.finish(Failure(RuntimeError("boom")))
    assert bug.error == "napari-zoomin: training failed: RuntimeError: boom"


def test_the_worker_says_the_split_then_trains_or_fails(tmp_path, monkeypatch):
    s = tmp_path / "slides"
    s.mkdir()
    for name in ("a", "b", "c"):
        (s / f"{name}.tif").write_bytes(b"")
    (s / "labels.csv").write_text("slide,label,split\na,p,train\nb,n,train\nc,p,val\n")
    monkeypatch.setattr(tc, "train", lambda dataset, config, out, **kw: ("trained", config))
    config = TrainConfig(num_workers=1)
    job = tc.Job(s / "labels.csv", s, None, config, tmp_path / "m.safetensors", False)
    seen = []
    assert tc.run_job(job, seen.append, lambda: False) == ("trained", config)
    assert seen == [Split(train=2, val=1, test=0)]
    (s / "empty.csv").write_text("")
    job.labels_csv = s / "empty.csv"
    failure = tc.run_job(job, seen.append, lambda: False)
    assert isinstance(failure, Failure) and isinstance(failure.error, LabelsError)
    assert "the labels CSV is empty" in str(failure.error)


def test_the_controller_needs_neither_qt_nor_napari():
    probe = (
        "import sys, napari_zoomin.napari.train_controller as c; "
        "gui = ('napari', 'qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'magicgui'); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in gui))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert Path(tc.__file__).name == "train_controller.py"
