"""Model checkpoints: one safetensors file holding the weights and a JSON description.

A checkpoint is a single ``.safetensors`` file.  Its tensors are the model's
``state_dict`` (``model.*``) and, for training checkpoints, the optimizer state
and RNG states (``optimizer.*``, ``rng.*``); its header metadata holds one JSON
document (key ``napari_zoomin``) with the model kind, class names, hyper-parameters,
training-data summary, metrics, history and the package version, plus the
SHA-256 of the tensors.  Nothing is ever unpickled: safetensors parses a JSON
header and raw buffers, so a hostile file can fail to load but cannot run code.

Writes are atomic (:func:`napari_zoomin.atomic.write_bytes_atomic`), so an
interrupted save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._version import __version__
from ..atomic import write_bytes_atomic
from ..errors import CheckpointError
from ..fields import MAX_LABEL_CHARS
from ..models import (
    ATS,
    ATSConfig,
    AttentionSamplingModel,
    ReinforceATS,
    ReinforceConfig,
    Uniform,
    ZoomIn,
    ZoomInConfig,
)
from ..models.magnet import MagNet, MagNetConfig
from .runtime import resolve_device

#: model kind -> (class, config class); the names users type
MODEL_KINDS: dict[str, tuple[type[AttentionSamplingModel], type]] = {
    "zoomin": (ZoomIn, ZoomInConfig),
    "ats": (ATS, ATSConfig),
    "uniform": (Uniform, ATSConfig),
    "reinforce-ats": (ReinforceATS, ReinforceConfig),
    "magnet": (MagNet, MagNetConfig),  # matches AttentionSamplingModel's interface
}
FORMAT = "napari-zoomin-checkpoint"
#: 2: the description carries ``description_sha256`` (its own checksum, covering
#: ``tensors_sha256``); format 1 files (without it) still load, validated as strictly
FORMAT_VERSION = 2
METADATA_KEY = "napari_zoomin"
#: the model shipped with the package, selectable as ``--model demo``
DEMO_MODEL = Path(__file__).resolve().parent.parent / "weights" / "demo.safetensors"


def kind_of(model: AttentionSamplingModel) -> str:
    """The registry name of a model's class (exact class, so Uniform is not ATS)."""
    for kind, (cls, _) in MODEL_KINDS.items():
        if type(model) is cls:
            return kind
    raise ValueError(f"{type(model).__name__} is not a registered model kind")


def todays_names(config: dict[str, Any]) -> dict[str, Any]:
    """A saved model config in today's names.

    ATS, Uniform and REINFORCE-ATS checkpoints written before the sub-tile had one name
    call their ``subtile_size`` ``patch_size``.
    """
    if "patch_size" in config and "subtile_size" not in config:
        return {("subtile_size" if k == "patch_size" else k): v for k, v in config.items()}
    return config


def complete_config(kind: str, config: dict[str, Any]) -> dict[str, Any]:
    """A saved model config in today's names, with every field its config class has
    gained since at that field's default (in JSON form), so two configs compare equal
    when they build the same model.  A new field's default is what older code did
    (``feature_standardise``: a plain ``f``)."""
    config = todays_names(config)
    if kind not in MODEL_KINDS:
        return dict(config)
    defaults = {}
    for f in dataclasses.fields(MODEL_KINDS[kind][1]):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()
    return {**json.loads(json.dumps(defaults)), **config}


def build_model(kind: str, config: dict[str, Any]) -> AttentionSamplingModel:
    """A fresh model of ``kind`` from a config dict (unknown keys are an error)."""
    config = todays_names(config)  # older one-stage checkpoints say patch_size
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; choose one of {sorted(MODEL_KINDS)}")
    cls, config_cls = MODEL_KINDS[kind]
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(config) - names)
    if unknown:
        raise ValueError(f"unknown {kind} settings: {', '.join(unknown)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    return cls(config_cls(**values))


@dataclass
class Checkpoint:
    """A loaded checkpoint.

    Attributes:
        model: the network, in eval mode, on the requested device.
        kind: registry name ("zoomin", "ats", "uniform", "reinforce-ats").
        classes: class names, index = class id (class 0 is the negative class).
        config: the model's hyper-parameters as saved, in today's names
            (:func:`todays_names`).
        info: everything else in the JSON document (training summary, metrics, history,
            versions, ...).
        sha256: SHA-256 of the checkpoint file (provenance in results).
        path: where it was loaded from.
        optimizer_state: an optimizer ``state_dict`` when the file was a training
            checkpoint, else ``None``.
        rng_state: saved RNG states (``"torch"``, ...) when present.
    """

    model: AttentionSamplingModel
    kind: str
    classes: list[str]
    config: dict[str, Any]
    info: dict[str, Any]
    sha256: str
    path: Path | None = None
    optimizer_state: dict | None = None
    rng_state: dict[str, torch.Tensor] = field(default_factory=dict)


def _tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into tensors and a JSON-able skeleton."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for pid, pstate in state["state"].items():
        entry = {}
        for name, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{pid}.{name}"] = value
                entry[name] = {"tensor": f"optimizer.{pid}.{name}"}
            else:
                entry[name] = value
        skeleton["state"][str(pid)] = entry
    return tensors, skeleton


def _unflatten_optimizer(skeleton: dict, tensors: dict[str, torch.Tensor]) -> dict:
    state = {}
    for pid, entry in skeleton["state"].items():
        state[int(pid)] = {
            k: tensors[v["tensor"]] if isinstance(v, dict) and "tensor" in v else v
            for k, v in entry.items()
        }
    return {"state": state, "param_groups": skeleton["param_groups"]}


def save_checkpoint(
    path: str | os.PathLike,
    model: AttentionSamplingModel,
    classes: list[str],
    *,
    info: dict[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    rng_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``model`` (and optionally the optimizer and RNG states) atomically to ``path``.

    ``info`` is free-form JSON-able provenance: training-data summary, metrics,
    history, hyper-parameters of the trainer.
    """
    from safetensors.torch import save

    path = Path(path)
    kind = kind_of(model)
    if len(classes) != max(model.config.num_classes, 2):
        raise ValueError(f"{len(classes)} class names for a {model.config.num_classes}-class model")
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    document: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "classes": list(classes),
        "config": model.config.to_dict(),
        "info": info or {},
        "versions": {"napari_zoomin": __version__, "torch": torch.__version__},
    }
    if optimizer is not None:
        opt_tensors, skeleton = _flatten_optimizer(optimizer.state_dict())
        tensors.update({k: v.detach().cpu().contiguous() for k, v in opt_tensors.items()})
        document["optimizer"] = skeleton
    for name, value in (rng_state or {}).items():
        tensors[f"rng.{name}"] = value.detach().cpu().contiguous()
    document["tensors_sha256"] = _tensors_sha256(tensors)
    document["description_sha256"] = description_sha256(document)
    data = save(tensors, metadata={METADATA_KEY: json.dumps(document)})
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_bytes_atomic(path, data)


def description_sha256(document: dict[str, Any]) -> str:
    """SHA-256 of a description's canonical JSON (sorted keys, no spaces), without the
    ``description_sha256`` entry itself.  The description holds ``tensors_sha256``, so
    this one digest covers the settings, the classes and the weights (format 2)."""
    body = {k: v for k, v in document.items() if k != "description_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_checkpoint_info(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON document of a checkpoint, verified as by :func:`load_checkpoint` (header,
    description, checksums, finite weights), without building the model."""
    return _read(Path(path)).document


#: safetensors' element sizes (bytes) and torch types, by the header's dtype names
_DTYPES: dict[str, tuple[int, torch.dtype]] = {
    "F64": (8, torch.float64),
    "F32": (4, torch.float32),
    "F16": (2, torch.float16),
    "BF16": (2, torch.bfloat16),
    "I64": (8, torch.int64),
    "I32": (4, torch.int32),
    "I16": (2, torch.int16),
    "I8": (1, torch.int8),
    "U8": (1, torch.uint8),
    "BOOL": (1, torch.bool),
}
#: the largest header (JSON) and the largest tensor data a checkpoint may declare: a
#: default Zoom-In model with its Adam state is about 40 MB
MAX_HEADER_BYTES = 32 * 2**20
MAX_DATA_BYTES = 2**30
#: the largest weight magnitude accepted: trained weights are of order 1; 10³⁸ overflows
#: to inf in the first layer
MAX_WEIGHT = 1e6
#: the largest RNG state tensor (torch's CPU generator state is 5 kB)
MAX_RNG_BYTES = 2**20
_DAMAGED = "It was damaged or edited; use an untouched copy, or train it again."


@dataclass
class _Verified:
    """What :func:`_read` returns: checked tensors and description, the file's SHA-256."""

    tensors: dict[str, torch.Tensor]
    document: dict[str, Any]
    config: dict[str, Any]
    sha256: str


def _refuse(path: Path, problem: str, fix: str | None = _DAMAGED) -> CheckpointError:
    return CheckpointError(path, problem, fix)


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The safetensors header (checked) and where the data starts; no tensor is read.

    Declared sizes are checked against the file before anything is allocated: the
    header length against the file size, every tensor's bytes against its dtype and
    shape, the data regions for gaps and overlaps, and their end against the file's.
    """
    if not path.is_file():
        raise CheckpointError(path, "no such checkpoint file.", "Check the path, or use 'demo'.")
    size = path.stat().st_size
    not_safetensors = "It may be damaged or not a checkpoint; train or download it again."
    if size < 8:
        raise _refuse(path, f"is not a safetensors file ({size} bytes).", not_safetensors)
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise _refuse(
                path,
                f"is not a valid safetensors file (its header claims {n:,} bytes; the file "
                f"has {size:,}).",
                not_safetensors,
            )
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise _refuse(
            path, f"is not a valid safetensors file (header: {exc}).", not_safetensors
        ) from None
    if not isinstance(header, dict):
        raise _refuse(path, "is not a valid safetensors file (header).", not_safetensors)
    data_start = 8 + n
    regions = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        ok = (
            isinstance(entry, dict)
            and entry.get("dtype") in _DTYPES
            and isinstance(entry.get("shape"), list)
            and len(entry["shape"]) <= 8
            and all(type(d) is int and 0 <= d <= MAX_DATA_BYTES for d in entry["shape"])
            and isinstance(entry.get("data_offsets"), list)
            and len(entry["data_offsets"]) == 2
            and all(type(o) is int for o in entry["data_offsets"])
        )
        if not ok:
            raise _refuse(path, f"is not a valid safetensors file (tensor {name[:80]!r}).")
        begin, end = entry["data_offsets"]
        nbytes = math.prod(entry["shape"]) * _DTYPES[entry["dtype"]][0]
        if not 0 <= begin <= end or end - begin != nbytes:
            raise _refuse(path, f"tensor {name[:80]!r} does not hold the bytes its shape needs.")
        regions.append((begin, end))
    regions.sort()
    position = 0
    for begin, end in regions:
        if begin != position:
            raise _refuse(path, "its tensors overlap or leave gaps: not a safetensors file.")
        position = end
    if position > MAX_DATA_BYTES:
        raise _refuse(
            path,
            f"declares {position:,} bytes of weights, more than any napari-zoomin model "
            f"({MAX_DATA_BYTES:,}).",
        )
    if data_start + position != size:
        raise _refuse(
            path,
            f"declares {position:,} bytes of weights but holds {size - data_start:,}: the file "
            "is truncated or has trailing data.",
        )
    return header, data_start


def _description(path: Path, header: dict[str, Any]) -> dict[str, Any]:
    """The JSON description in the header's metadata, its format and its checksum checked."""
    meta = header.get("__metadata__")
    raw = meta.get(METADATA_KEY) if isinstance(meta, dict) else None
    if not isinstance(raw, str):
        raise CheckpointError(
            path,
            "is a safetensors file but not a napari-zoomin checkpoint (no model description).",
            "Use a checkpoint written by 'zoomin train' or the Train classifier widget.",
        )
    try:
        document = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise _refuse(path, f"its model description is not valid JSON ({exc}).") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise _refuse(path, "its model description is not a napari-zoomin checkpoint's.", None)
    version = document.get("format_version")
    if type(version) is not int or version < 1:
        raise _refuse(path, f"its format_version must be a whole number from 1, got {version!r}.")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            path,
            f"was written by a newer napari-zoomin (format {version}).",
            "Upgrade napari-zoomin.",
        )
    if version >= 2 and document.get("description_sha256") != description_sha256(document):
        raise _refuse(
            path,
            "its description does not match its checksum: the file was modified or damaged.",
            "Use an untouched copy of the checkpoint.",
        )
    return document


def _classes_problem(classes: Any, num_classes: int) -> str | None:
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        return f"classes must be a list of names, got {str(classes)[:40]!r}"
    if len(classes) != max(num_classes, 2):
        return f"{len(classes)} class names for a {num_classes}-class model"
    if len(set(classes)) != len(classes):
        return f"class names must differ, got {classes}"
    for name in classes:
        if not 1 <= len(name) <= MAX_LABEL_CHARS or not name.isprintable():
            return f"class name {name[:40]!r} must be 1 to {MAX_LABEL_CHARS} printable characters"
    return None


def _settings(path: Path, document: dict[str, Any]) -> tuple[str, type, Any, dict[str, Any]]:
    """Kind, config class, config (checked by its dataclass) and config dict of a description."""
    kind = document.get("kind")
    if not isinstance(kind, str) or kind not in MODEL_KINDS:
        raise _refuse(
            path,
            f"describes an unknown model kind {str(kind)[:40]!r} (known: "
            f"{', '.join(MODEL_KINDS)}).",
            "It may need a newer napari-zoomin.",
        )
    config = document.get("config")
    if not isinstance(config, dict):
        raise _refuse(path, "its model settings ('config') are not a JSON object.")
    config = todays_names(config)
    cls, config_cls = MODEL_KINDS[kind]
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(config) - names)
    if unknown:
        raise _refuse(
            path,
            f"describes {kind} settings this napari-zoomin does not know: "
            f"{', '.join(u[:40] for u in unknown[:5])}.",
            "It may need a newer napari-zoomin.",
        )
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    try:
        model_config = config_cls(**values)
    except (ValueError, TypeError, OverflowError) as exc:
        raise _refuse(path, f"its model settings are refused: {exc}.") from None
    problem = _classes_problem(document.get("classes"), model_config.num_classes)
    if problem:
        raise _refuse(path, f"its {problem}.")
    for key in ("info", "versions"):
        if key in document and not isinstance(document[key], dict):
            raise _refuse(path, f"its '{key}' is not a JSON object.")
    return kind, cls, model_config, config


def _expected_tensors(kind: str, cls: type, config: Any) -> tuple[dict, list[tuple[int, ...]]]:
    """``{name: (shape, dtype)}`` of the model's state and its parameters' shapes, from a
    model built on the ``meta`` device: nothing is allocated, whatever the sizes say."""
    try:
        with torch.device("meta"):
            model = cls(config)
    except (NotImplementedError, RuntimeError):  # a kind that computes while building
        model = cls(config)
    state = {f"model.{k}": (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    return state, [tuple(p.shape) for p in model.parameters()]


def _optimizer_problem(skeleton: Any, header: dict, shapes: list[tuple[int, ...]]) -> str | None:
    """What is wrong with a saved optimizer state (structure, references, shapes)."""
    if not isinstance(skeleton, dict) or set(skeleton) != {"param_groups", "state"}:
        return "is not an optimizer state"
    groups, state = skeleton["param_groups"], skeleton["state"]
    if not isinstance(groups, list) or not isinstance(state, dict):
        return "has no list of parameter groups"
    seen: list[int] = []
    for group in groups:
        if not isinstance(group, dict) or not isinstance(group.get("params"), list):
            return "has a parameter group without parameters"
        for key, value in group.items():
            if key == "params":
                continue
            numbers_ = value if isinstance(value, list) else [value]
            for v in numbers_:
                if not (
                    v is None
                    or (isinstance(v, bool | str) and key not in ("lr", "weight_decay", "eps"))
                    or (type(v) in (int, float) and math.isfinite(v))
                ):
                    return f"has a parameter group whose {key[:40]!r} is {str(v)[:40]!r}"
        seen += group["params"]
    if not all(type(i) is int and 0 <= i < len(shapes) for i in seen) or len(set(seen)) != len(
        seen
    ):
        return f"names parameters that the model (of {len(shapes)}) does not have"
    known = set(shapes)
    for pid, entry in state.items():
        if not (isinstance(pid, str) and pid.isdigit() and int(pid) in seen):
            return f"has a state for an unknown parameter {pid[:20]!r}"
        if not isinstance(entry, dict):
            return "has a parameter state that is not a JSON object"
        for name, value in entry.items():
            if isinstance(value, dict):
                ref = value.get("tensor")
                info = header.get(ref) if isinstance(ref, str) else None
                if not (set(value) == {"tensor"} and ref.startswith("optimizer.") and info):
                    return f"refers to a tensor {str(ref)[:60]!r} that the file does not hold"
                shape = tuple(info["shape"])
                # ids number the parameters group by group (the trainer's groups put the
                # attention networks last), not in the model's order: the shape must be
                # one of the model's; torch matches each to its parameter on loading
                if shape != () and shape not in known:
                    return f"holds {ref!r} of shape {shape}, which no parameter has"
            elif not ((type(value) in (int, float) and math.isfinite(value)) or value is None):
                return f"holds {name[:40]!r} = {str(value)[:40]!r}"
    return None


def _read(path: Path) -> _Verified:
    """Read and verify a checkpoint: header, description and schema, then the tensors.

    Everything the header and the description declare is checked before any tensor is
    read: the model of the described settings is built on the ``meta`` device (no
    memory) and its tensor names, shapes and dtypes must be those in the file, so every
    size in the description is bounded by the tensors actually present.  The tensors
    are then read one at a time from a memory map (never the whole file at once), the
    checksums compared, and non-finite or absurd weights refused.
    """
    header, _ = _read_header(path)
    document = _description(path, header)
    kind, cls, model_config, config = _settings(path, document)
    expected, param_shapes = _expected_tensors(kind, cls, model_config)
    present = {k: v for k, v in header.items() if k != "__metadata__"}
    for name, (shape, dtype) in expected.items():
        entry = present.get(name)
        if entry is None:
            raise _refuse(
                path,
                f"its weights do not fit a {kind} model with its settings (no {name}).",
                "The file was written for another architecture, or damaged.",
            )
        if tuple(entry["shape"]) != shape or _DTYPES[entry["dtype"]][1] != dtype:
            raise _refuse(
                path,
                f"its weights do not fit a {kind} model with its settings ({name} is "
                f"{entry['dtype']} {tuple(entry['shape'])}, the model needs {shape}).",
                "The file was written for another architecture, or damaged.",
            )
    for name, entry in present.items():
        if name in expected:
            continue
        if name.startswith("rng."):
            size = math.prod(entry["shape"]) * _DTYPES[entry["dtype"]][0]
            if entry["dtype"] != "U8" or size > MAX_RNG_BYTES:
                raise _refuse(path, f"its generator state {name[:60]!r} is not one.")
        elif not name.startswith("optimizer."):
            raise _refuse(path, f"holds a tensor no {kind} model has ({name[:60]!r}).")
    if "optimizer" in document:
        problem = _optimizer_problem(document["optimizer"], present, param_shapes)
        if problem:
            raise _refuse(path, f"its optimizer state {problem}.")
    elif any(k.startswith("optimizer.") for k in present):
        raise _refuse(path, "holds optimizer tensors without an optimizer state.")
    if not isinstance(document.get("tensors_sha256"), str):
        raise _refuse(path, "its description has no checksum of its weights.")

    from safetensors import SafetensorError, safe_open

    tensors: dict[str, torch.Tensor] = {}
    digest = hashlib.sha256()
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            for name in sorted(present):
                t = fh.get_tensor(name)
                digest.update(name.encode())
                digest.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
                digest.update(
                    t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
                )
                if t.is_floating_point() and t.numel():
                    if not bool(torch.isfinite(t).all()):
                        raise _refuse(
                            path, f"its weights are not finite ({name} holds NaN or inf)."
                        )
                    if name.startswith("model.") and float(t.abs().max()) > MAX_WEIGHT:
                        raise _refuse(
                            path,
                            f"its weights are absurd ({name} reaches {float(t.abs().max()):.3g}; "
                            f"a trained model's stay far below {MAX_WEIGHT:g}).",
                        )
                tensors[name] = t
    except SafetensorError as exc:
        raise _refuse(path, f"is not a valid safetensors file ({exc}).") from None
    if digest.hexdigest() != document["tensors_sha256"]:
        raise _refuse(
            path,
            "its weights do not match the checksum in its description: the file was modified "
            "or damaged.",
            "Use an untouched copy of the checkpoint.",
        )
    file_digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            file_digest.update(block)
    return _Verified(tensors, document, config, file_digest.hexdigest())


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> Checkpoint:
    """Load and verify a checkpoint; raise :class:`CheckpointError` for anything wrong.

    The checks are :func:`_read`'s: every size and setting is validated before a tensor
    is allocated.  Files of format 1 (without a description checksum) still load,
    checked just as strictly.

    ``device`` is resolved as everywhere (:func:`~napari_zoomin.engine.runtime.resolve_device`):
    ``"auto"`` is CUDA when available, else the CPU; a device that cannot be used raises
    :class:`~napari_zoomin.errors.ClassificationError`.
    """
    path = Path(path)
    target = resolve_device(device)
    checked = _read(path)
    document, tensors = checked.document, checked.tensors
    kind = document["kind"]
    try:
        model = build_model(kind, checked.config)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(
            path, f"describes a model this napari-zoomin cannot build ({exc})."
        ) from exc
    state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise CheckpointError(
            path,
            f"its weights do not fit a {kind} model with its settings ({first}).",
            "The file was written for another architecture.",
        ) from exc
    model.to(target).eval()
    optimizer_state = None
    if "optimizer" in document:
        optimizer_state = _unflatten_optimizer(document["optimizer"], tensors)
    rng = {k[len("rng.") :]: v for k, v in tensors.items() if k.startswith("rng.")}
    return Checkpoint(
        model=model,
        kind=kind,
        classes=list(document["classes"]),
        config=checked.config,
        info=document,
        sha256=checked.sha256,
        path=path,
        optimizer_state=optimizer_state,
        rng_state=rng,
    )


def training_mpp(ckpt: Checkpoint) -> float | None:
    """The pixel size (µm) the model was trained at: ``info["data"]["mpp"]``.

    ``None`` when the checkpoint does not record one (older checkpoints, or training
    slides without a pixel size): the model then works in slide pixels.
    """
    doc = ckpt.info if isinstance(ckpt.info, dict) else {}
    info = doc.get("info") if isinstance(doc.get("info"), dict) else doc
    data = info.get("data")
    value = data.get("mpp") if isinstance(data, dict) else None
    if isinstance(value, bool):
        return None
    try:
        mpp = float(value)
    except (TypeError, ValueError):
        return None
    return mpp if math.isfinite(mpp) and mpp > 0 else None


def load_model(name_or_path: str | os.PathLike, device: str | torch.device = "cpu") -> Checkpoint:
    """``"demo"`` (the packaged model) or a checkpoint path, on ``device`` (``"auto"`` too)."""
    if str(name_or_path) == "demo":
        if not DEMO_MODEL.is_file():
            raise CheckpointError(
                DEMO_MODEL, "the packaged demo model is missing.", "Reinstall napari-zoomin."
            )
        return load_checkpoint(DEMO_MODEL, device)
    path = Path(name_or_path)
    if not path.exists() and path.suffix == "" and os.sep not in str(name_or_path):
        raise CheckpointError(
            None,
            f"unknown model name {str(name_or_path)!r}.",
            "Use 'demo' or the path of a .safetensors checkpoint.",
        )
    return load_checkpoint(path, device)
