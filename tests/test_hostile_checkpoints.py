"""Hostile and damaged checkpoints (issue 21): each is refused with a CheckpointError that
names the file, without a traceback, a hang or a change to the file.

Every file is built at test time from one small saved checkpoint: its safetensors header
is edited as raw bytes (lengths, offsets, dtypes, a sparse file that claims more data
than it has), or its JSON description / tensors are changed and the checksums forged as
an attacker would (so that the schema, not the checksum, has to refuse them).
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from pathlib import Path

import pytest
import torch

from fixtures_data import TINY_ZOOMIN

TIME_LIMIT = 20.0  # seconds per case: a hang fails instead of freezing the suite


# ------------------------------------------------------------------------ the base checkpoint


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny trained-shape Zoom-In checkpoint with an Adam state (a training checkpoint)."""
    from napari_zoomin.engine.checkpoints import build_model, save_checkpoint

    torch.manual_seed(0)
    model = build_model("zoomin", TINY_ZOOMIN)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    sum(p.float().sum() for p in model.parameters()).backward()
    optimizer.step()
    path = tmp_path_factory.mktemp("base") / "base.safetensors"
    return save_checkpoint(path, model, ["negative", "positive"], optimizer=optimizer)


def split(path: Path) -> tuple[dict, bytes]:
    """(safetensors header dict, data bytes) of a file."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def join(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


def _description_sha256(document: dict) -> str | None:
    from napari_zoomin.engine import checkpoints

    digest = getattr(checkpoints, "description_sha256", None)
    return None if digest is None else digest(document)


def forge(base: Path, out: Path, doc_change=None, tensor_change=None) -> Path:
    """A copy of ``base`` with its description / tensors changed and checksums recomputed."""
    from safetensors.torch import load_file, save_file

    from napari_zoomin.engine.checkpoints import _tensors_sha256

    header, _ = split(base)
    document = json.loads(header["__metadata__"]["napari_zoomin"])
    tensors = load_file(base)
    if tensor_change is not None:
        tensor_change(tensors)
    document["tensors_sha256"] = _tensors_sha256(tensors)
    if doc_change is not None:
        doc_change(document)
    if "description_sha256" in document:
        digest = _description_sha256(document)
        if digest is not None:
            document["description_sha256"] = digest
    save_file(tensors, out, metadata={"napari_zoomin": json.dumps(document)})
    return out


def raw_edit(base: Path, out: Path, change) -> Path:
    """``change(header, data) -> bytes``: raw bytes of a new file from ``base``'s parts."""
    header, data = split(base)
    out.write_bytes(change(header, data))
    return out


# ------------------------------------------------------------------------ the corpus


def _set(path, value):
    """A description edit: set ``document[path...] = value`` (a dotted key path)."""

    def change(doc):
        *parents, last = path.split(".")
        target = doc
        for key in parents:
            target = target[key]
        target[last] = value

    return change


def _drop(key):
    return lambda doc: doc.pop(key)


def _first_model_tensor(tensors, fn):
    name = sorted(k for k in tensors if k.startswith("model.") and tensors[k].is_floating_point())[
        0
    ]
    tensors[name] = fn(tensors[name])


def _sparse(claim: int):
    def change(header, data):
        header = {"__metadata__": header["__metadata__"]}
        header["model.huge"] = {"dtype": "U8", "shape": [claim], "data_offsets": [0, claim]}
        return join(header, b"")

    return change


RAW = {  # header / bytes damage; no checksum can be forged
    "empty-file": lambda h, d: b"",
    "seven-bytes": lambda h, d: b"\x01" * 7,
    "header-longer-than-file": lambda h, d: (10**6).to_bytes(8, "little") + b"{}",
    "header-length-2**63": lambda h, d: (2**63).to_bytes(8, "little") + b"{}" + d,
    "header-not-json": lambda h, d: (5).to_bytes(8, "little") + b"{{{{{" + d,
    "header-a-list": lambda h, d: (2).to_bytes(8, "little") + b"[]",
    "truncated-data": lambda h, d: join(h, d[:-100]),
    "trailing-garbage": lambda h, d: join(h, d + b"\0" * 4096),
    "claims-16GB": lambda h, d: join(
        {
            **h,
            "model.huge": {
                "dtype": "F32",
                "shape": [4 * 2**30],
                "data_offsets": [len(d), len(d) + 16 * 2**30],
            },
        },
        d,
    ),
    "unknown-dtype": lambda h, d: join(
        {**h, **{k: {**v, "dtype": "F128"} for k, v in list(h.items())[1:2]}}, d
    ),
    "negative-shape": lambda h, d: join(
        {**h, **{k: {**v, "shape": [-1]} for k, v in h.items() if k.startswith("model.")}}, d
    ),
    "offsets-reversed": lambda h, d: join(
        {
            **h,
            **{
                k: {**v, "data_offsets": v["data_offsets"][::-1]}
                for k, v in h.items()
                if k.startswith("model.") and v["data_offsets"][0] != v["data_offsets"][1]
            },
        },
        d,
    ),
    "no-metadata": lambda h, d: join({k: v for k, v in h.items() if k != "__metadata__"}, d),
    "description-not-json": lambda h, d: join(
        {**h, "__metadata__": {"napari_zoomin": "{not json"}}, d
    ),
    "description-a-list": lambda h, d: join({**h, "__metadata__": {"napari_zoomin": "[1]"}}, d),
    "description-deeply-nested": lambda h, d: join(
        {**h, "__metadata__": {"napari_zoomin": "[" * 100_000 + "]" * 100_000}}, d
    ),
    "foreign-format": lambda h, d: join(
        {**h, "__metadata__": {"napari_zoomin": json.dumps({"format": "other"})}}, d
    ),
    # the description edited without the checksums forged: covered by the checksum now
    "description-edited-unforged": lambda h, d: join(
        {
            **h,
            "__metadata__": {
                "napari_zoomin": json.dumps(
                    {**json.loads(h["__metadata__"]["napari_zoomin"]), "info": {"edited": 1}}
                )
            },
        },
        d,
    ),
    # one weight byte flipped
    "weights-edited-unforged": lambda h, d: join(h, d[:-5] + bytes([d[-5] ^ 0xFF]) + d[-4:]),
}

DOC = {  # forged descriptions: the schema must refuse them
    "format_version-string": _set("format_version", "2"),
    "format_version-null": _set("format_version", None),
    "format_version-bool": _set("format_version", True),
    "format_version-float": _set("format_version", 1.5),
    "format_version-newer": _set("format_version", 999),
    "format_version-missing": _drop("format_version"),
    "kind-unknown": _set("kind", "resnet"),
    "kind-null": _set("kind", None),
    "classes-one": _set("classes", ["positive"]),
    "classes-a-string": _set("classes", "negative,positive"),
    "classes-not-strings": _set("classes", [0, 1]),
    "classes-duplicate": _set("classes", ["tumour", "tumour"]),
    "classes-nul-byte": _set("classes", ["nega\0tive", "positive"]),
    "classes-too-many": _set("classes", ["a", "b", "c"]),
    "classes-empty-name": _set("classes", ["", "positive"]),
    "config-a-list": _set("config", [1, 2]),
    "config-unknown-key": _set("config.bogus", 1),
    "feature_dim-1e9": _set("config.feature_dim", 10**9),
    "feature_dim-0": _set("config.feature_dim", 0),
    "feature_hidden-1e9": _set("config.feature_hidden", 10**9),
    "n_samples-1e9": _set("config.n_samples", 10**9),
    "n_samples-0": _set("config.n_samples", 0),
    "n_samples-10**400": _set("config.n_samples", 10**400),
    "n_samples-string": _set("config.n_samples", "4"),
    "attention_layers-1e6": _set("config.attention_layers", 10**6),
    "feature_channels-1e6-entries": _set("config.feature_channels", [36] * 10**6),
    "feature_channels-strings": _set("config.feature_channels", ["a", "b"]),
    "tile-0": _set("config.tile_size", [0, 0]),
    "tile-huge": _set("config.tile_size", [10**9, 10**9]),
    "subtile-larger-than-tile": _set("config.subtile_size", [256, 256]),
    "subtile-negative": _set("config.subtile_size", [-32, -32]),
    "view_scale-1e-9": _set("config.view_scale", 1e-9),
    "view_scale-NaN": _set("config.view_scale", math.nan),
    "view_scale-string": _set("config.view_scale", "0.0625"),
    "stage2_scale-0": _set("config.stage2_scale", 0),
    "num_classes-1": _set("config.num_classes", 1),
    "attention_padding-bogus": _set("config.attention_padding", "bogus"),
    "feature_dropout-2": _set("config.feature_dropout", 2.0),
    "optimizer-a-string": _set("optimizer", "garbage"),
    "optimizer-groups-not-a-list": _set("optimizer.param_groups", {"lr": 1}),
    "optimizer-missing-tensor": _set("optimizer.state.0.exp_avg", {"tensor": "optimizer.99.x"}),
    "optimizer-lr-string": lambda doc: doc["optimizer"]["param_groups"][0].update(lr="fast"),
    "optimizer-params-out-of-range": lambda doc: doc["optimizer"]["param_groups"][0].update(
        params=[10**9]
    ),
}

TENSORS = {  # forged weights
    "nan-weights": lambda t: _first_model_tensor(t, lambda w: torch.full_like(w, math.nan)),
    "inf-weight": lambda t: _first_model_tensor(
        t, lambda w: w.flatten().index_fill(0, torch.tensor([0]), math.inf).reshape(w.shape)
    ),
    "weights-x1e38": lambda t: _first_model_tensor(t, lambda w: (w + 1) * 1e38),
    "nan-optimizer-state": lambda t: t.update(
        {k: torch.full_like(v, math.nan) for k, v in t.items() if k.endswith("exp_avg")}
    ),
    "missing-tensor": lambda t: t.pop(sorted(k for k in t if k.startswith("model."))[0]),
    "extra-tensor": lambda t: t.update({"model.extra.weight": torch.zeros(3)}),
    "wrong-shape": lambda t: _first_model_tensor(t, lambda w: torch.zeros(w.numel() + 1)),
    "float64-weights": lambda t: _first_model_tensor(t, lambda w: w.double()),
}


def _build(name: str, base: Path, tmp_path: Path) -> Path:
    out = tmp_path / f"{name}.safetensors"
    if name in RAW:
        return raw_edit(base, out, RAW[name])
    if name in DOC:
        return forge(base, out, doc_change=DOC[name])
    if name == "sparse-1.5GB":
        path = raw_edit(base, out, _sparse(3 * 2**29))
        with open(path, "r+b") as fh:  # a hole: the file is as long as it claims
            fh.truncate(path.stat().st_size + 3 * 2**29)
        return path
    return forge(base, out, tensor_change=TENSORS[name])


CASES = [*RAW, *DOC, *TENSORS, "sparse-1.5GB"]


def _in_thread(fn, *args):
    """Run ``fn(*args)`` in a thread; (returned, raised) or a failure after TIME_LIMIT."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn(*args)
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(TIME_LIMIT)
    if thread.is_alive():
        pytest.fail(f"did not finish within {TIME_LIMIT} s (a hang)")
    return box.get("value"), box.get("error")


def _sha(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@pytest.mark.parametrize("name", CASES)
def test_hostile_checkpoint_is_refused(name, base, tmp_path):
    from napari_zoomin.engine.checkpoints import load_checkpoint, read_checkpoint_info
    from napari_zoomin.errors import CheckpointError

    path = _build(name, base, tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    size = path.stat().st_size
    digest = _sha(path) if size < 2**24 else None
    for load in (read_checkpoint_info, load_checkpoint):
        _, error = _in_thread(load, path)
        assert error is not None, f"{load.__name__} accepted it"
        assert isinstance(error, CheckpointError), f"{type(error).__name__}: {error}"
        assert path.name in str(error), str(error)
        assert len(str(error).splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing left behind
    assert path.stat().st_size == size and (digest is None or _sha(path) == digest)


def test_corpus_size():
    assert len(CASES) >= 60


# ------------------------------------------------------------------------ what still loads


def test_untouched_checkpoint_loads(base):
    from safetensors.torch import load_file

    from napari_zoomin.engine.checkpoints import load_checkpoint

    ckpt = load_checkpoint(base)
    saved = load_file(base)
    for key, value in ckpt.model.state_dict().items():
        assert torch.equal(value, saved[f"model.{key}"])
    assert ckpt.optimizer_state is not None and ckpt.classes == ["negative", "positive"]


def test_a_standardised_feature_network_round_trips(tmp_path):
    """``feature_standardise`` is saved with the model: the loaded ``f`` standardises its
    weights and gives the saved model's features; a config without the setting (that of
    every checkpoint before it) builds the plain LeNet."""
    from napari_zoomin.engine.checkpoints import build_model, load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    model = build_model("zoomin", {**TINY_ZOOMIN, "feature_standardise": True})
    path = save_checkpoint(tmp_path / "ws.safetensors", model, ["negative", "positive"])
    loaded = load_checkpoint(path)
    assert loaded.config["feature_standardise"] is True
    x = torch.rand(5, 3, *model.subtile_size)
    assert torch.equal(loaded.model.feature(x), model.eval().feature(x))
    assert type(loaded.model.feature.fc[1]).__name__ == "StandardisedLinear"
    plain = build_model("zoomin", TINY_ZOOMIN)
    assert type(plain.feature.fc[1]).__name__ == "Linear"


def test_format_1_checkpoint_still_loads(base, tmp_path):
    """A file of format 1 (no description checksum) loads, with the same weights."""
    from napari_zoomin.engine.checkpoints import load_checkpoint

    def older(doc):
        doc.pop("description_sha256", None)
        doc["format_version"] = 1

    path = forge(base, tmp_path / "v1.safetensors", doc_change=older)
    ckpt = load_checkpoint(path)
    reference = load_checkpoint(base)
    for (k, a), (_, b) in zip(
        ckpt.model.state_dict().items(), reference.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("field", ["feature_dim", "n_samples", "view_scale"])
def test_format_1_checkpoint_is_validated_as_strictly(field, base, tmp_path):
    from napari_zoomin.engine.checkpoints import load_checkpoint
    from napari_zoomin.errors import CheckpointError

    bad = {"feature_dim": 10**9, "n_samples": 0, "view_scale": 1e-9}[field]

    def older(doc):
        doc.pop("description_sha256", None)
        doc["format_version"] = 1
        doc["config"][field] = bad

    path = forge(base, tmp_path / "v1.safetensors", doc_change=older)
    with pytest.raises(CheckpointError, match=field):
        load_checkpoint(path)


def test_description_is_covered_by_the_checksum(base):
    from napari_zoomin.engine.checkpoints import FORMAT_VERSION, read_checkpoint_info

    document = read_checkpoint_info(base)
    assert FORMAT_VERSION >= 2 and document["format_version"] == FORMAT_VERSION
    assert document["description_sha256"] == _description_sha256(document)


def test_demo_checkpoint_is_of_todays_format():
    from napari_zoomin.engine.checkpoints import DEMO_MODEL, FORMAT_VERSION, read_checkpoint_info

    assert read_checkpoint_info(DEMO_MODEL)["format_version"] == FORMAT_VERSION
    assert DEMO_MODEL.stat().st_size < 2 * 2**20


def test_a_training_checkpoint_with_two_learning_rates_loads_and_resumes(tmp_path):
    """The trainer's Adam groups put the attention networks last (``attention_lr``), so
    the saved state numbers the parameters in another order than the model's: it loads,
    and torch puts every moment back on its own parameter; a moment of a shape that no
    parameter has is still refused."""
    from napari_zoomin.engine.checkpoints import build_model, load_checkpoint, save_checkpoint
    from napari_zoomin.errors import CheckpointError
    from napari_zoomin.training.config import TrainConfig
    from napari_zoomin.training.trainer import _parameter_groups

    torch.manual_seed(0)
    model = build_model("zoomin", TINY_ZOOMIN)
    config = TrainConfig(lr=1e-3, attention_lr=1e-2)
    optimizer = torch.optim.Adam(_parameter_groups(model, config), lr=1e-3)
    sum(p.float().sum() for p in model.parameters()).backward()
    optimizer.step()
    path = save_checkpoint(tmp_path / "two.safetensors", model, ["a", "b"], optimizer=optimizer)
    ckpt = load_checkpoint(path)
    again = torch.optim.Adam(_parameter_groups(ckpt.model, config), lr=1e-3)
    again.load_state_dict(ckpt.optimizer_state)
    for p, q in zip(
        (p for g in optimizer.param_groups for p in g["params"]),
        (q for g in again.param_groups for q in g["params"]),
        strict=True,
    ):
        assert torch.equal(optimizer.state[p]["exp_avg"], again.state[q]["exp_avg"])

    doc = json.loads(split(path)[0]["__metadata__"]["napari_zoomin"])
    name = doc["optimizer"]["state"]["0"]["exp_avg"]["tensor"]
    forged = forge(
        path,
        tmp_path / "forged.safetensors",
        tensor_change=lambda t: t.update({name: torch.zeros(7, 7, 7)}),
    )
    with pytest.raises(CheckpointError, match="which no parameter has"):
        load_checkpoint(forged)
