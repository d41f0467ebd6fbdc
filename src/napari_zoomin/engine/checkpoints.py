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
from .runtime import resolve_device

#: model kind -> (class, config class); the names users type
MODEL_KINDS: dict[str, tuple[type[AttentionSamplingModel], type]] = {
    "zoomin": (ZoomIn, ZoomInConfig),
    "ats": (ATS, ATSConfig),
    "uniform": (Uniform, ATSConfig),
    "reinforce-ats": (ReinforceATS, ReinforceConfig),
}
FORMAT = "napari-zoomin-checkpoint"
FORMAT_VERSION = 1
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
    data = save(tensors, metadata={METADATA_KEY: json.dumps(document)})
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_bytes_atomic(path, data)


def read_checkpoint_info(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON document of a checkpoint, without building the model."""
    return _read(Path(path))[1]


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], bytes]:
    if not path.is_file():
        raise CheckpointError(path, "no such checkpoint file.", "Check the path, or use 'demo'.")
    data = path.read_bytes()
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(data)
        header = _header_metadata(data)
    except (SafetensorError, ValueError, json.JSONDecodeError, OverflowError) as exc:
        raise CheckpointError(
            path,
            f"is not a valid safetensors file ({exc}).",
            "It may be damaged or not a checkpoint; train or download it again.",
        ) from exc
    raw = header.get(METADATA_KEY)
    if raw is None:
        raise CheckpointError(
            path,
            "is a safetensors file but not a napari-zoomin checkpoint (no model description).",
            "Use a checkpoint written by 'zoomin train' or the Train classifier widget.",
        )
    try:
        document = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CheckpointError(path, f"its model description is not valid JSON ({exc}).") from exc
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise CheckpointError(path, "its model description is not a napari-zoomin checkpoint's.")
    if document.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            path,
            f"was written by a newer napari-zoomin (format {document.get('format_version')}).",
            "Upgrade napari-zoomin.",
        )
    if _tensors_sha256(tensors) != document.get("tensors_sha256"):
        raise CheckpointError(
            path,
            "its weights do not match the checksum in its description: the file was modified "
            "or damaged.",
            "Use an untouched copy of the checkpoint.",
        )
    return tensors, document, data


def _header_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors buffer (a length-prefixed JSON header)."""
    if len(data) < 8:
        raise ValueError("file too short")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise ValueError("header length exceeds the file")
    header = json.loads(data[8 : 8 + n])
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ValueError("bad metadata")
    return meta


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> Checkpoint:
    """Load and verify a checkpoint; raise :class:`CheckpointError` for anything wrong.

    ``device`` is resolved as everywhere (:func:`~napari_zoomin.engine.runtime.resolve_device`):
    ``"auto"`` is CUDA when available, else the CPU; a device that cannot be used raises
    :class:`~napari_zoomin.errors.ClassificationError`.
    """
    path = Path(path)
    tensors, document, data = _read(path)
    kind = document.get("kind")
    try:
        model = build_model(kind, document.get("config", {}))
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
    model.to(resolve_device(device)).eval()
    optimizer_state = None
    if "optimizer" in document:
        optimizer_state = _unflatten_optimizer(document["optimizer"], tensors)
    rng = {k[len("rng.") :]: v for k, v in tensors.items() if k.startswith("rng.")}
    return Checkpoint(
        model=model,
        kind=kind,
        classes=list(document.get("classes", [])),
        config=todays_names(document.get("config", {})),
        info=document,
        sha256=hashlib.sha256(data).hexdigest(),
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
