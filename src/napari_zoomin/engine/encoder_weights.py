"""A user's own starting weights for a MagNet's patch encoders (002 §4: pretrained CNNs).

002 starts its encoders from ImageNet weights; none ship offline, so a MagNet's
encoders start from scratch unless the user gives a local file
(``TrainConfig.init_encoder``, ``zoomin train --init-encoder``).  The file is a plain
state dict in safetensors form, as ``safetensors.torch.save_file(net.state_dict(),
path)`` writes it for a torchvision (or any) network: tensor names and shapes must be
those of the MagNet's encoder (:class:`~napari_zoomin.models.magnet.PatchEncoder`:
``convs.<k>.weight``, ``convs.<k>.bias``, ``fc.weight``, ``fc.bias``), optionally
prefixed ``encoder.``.  The same weights start the classification encoder and every
auxiliary encoder.

Untrusted input: the file is opened with safetensors (never unpickled, so a ``.pt``
pickle is refused, not executed); every name, shape and dtype is checked against the
encoder from the header alone, before any tensor is read; the tensors must be finite.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import CheckpointError

__all__ = ["load_encoder_weights"]

#: dtypes a weight may be stored in (converted to the encoder's)
_FLOATS = ("F16", "BF16", "F32", "F64")
_FORMAT = (
    "Save the encoder's weights with safetensors.torch.save_file(state_dict, path); "
    "napari-zoomin never unpickles .pt/.pth files."
)


def load_encoder_weights(model: torch.nn.Module, path: str | os.PathLike) -> list[str]:
    """Copy the weights in ``path`` into every patch encoder of a MagNet ``model``.

    Returns the encoders set (``"encoder"``, ``"aux_encoders.1"``, ...).  Raises
    :class:`~napari_zoomin.errors.CheckpointError` naming the file for a missing file,
    one that is not safetensors, names or shapes that do not fit the encoder, a
    non-float or non-finite tensor; the model is unchanged then.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    encoders = {"encoder": model.encoder}
    encoders.update({f"aux_encoders.{k}": v for k, v in model.aux_encoders.items()})
    wanted = {k: tuple(v.shape) for k, v in model.encoder.state_dict().items()}
    if not path.is_file():
        raise CheckpointError(
            path, "no such file of encoder weights (init_encoder).", "Check the path."
        )
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            names = list(fh.keys())
            prefix = "encoder." if names and all(n.startswith("encoder.") for n in names) else ""
            found = {n[len(prefix) :]: n for n in names}
            missing = sorted(set(wanted) - set(found))
            extra = sorted(set(found) - set(wanted))
            if missing or extra:
                what = []
                if missing:
                    what.append(f"lacks {', '.join(missing[:4])}")
                if extra:
                    what.append(f"holds {', '.join(e[:60] for e in extra[:4])}, which it has not")
                raise CheckpointError(
                    path,
                    "its tensors are not the MagNet encoder's (it "
                    + "; it ".join(what)
                    + f"; the encoder has {len(wanted)}: {', '.join(list(wanted)[:4])}, ...).",
                    "Give weights of the same architecture (names as in its state_dict).",
                )
            for name in wanted:  # the encoder's order: the first misfit is named
                stored = found[name]
                piece = fh.get_slice(stored)
                shape, dtype = tuple(piece.get_shape()), piece.get_dtype()
                if shape != wanted[name]:
                    raise CheckpointError(
                        path,
                        f"its {stored} has shape {shape}; the MagNet encoder's {name} is "
                        f"{wanted[name]}.",
                        "Give weights of an encoder with the same channels and feature_dim.",
                    )
                if dtype not in _FLOATS:
                    raise CheckpointError(
                        path, f"its {stored} holds {dtype}, not floating-point weights."
                    )
            state = {}
            for name, stored in found.items():
                tensor = fh.get_tensor(stored)
                if not bool(torch.isfinite(tensor).all()):
                    raise CheckpointError(path, f"its {stored} holds NaN or infinite values.")
                state[name] = tensor
    except SafetensorError as exc:
        raise CheckpointError(path, f"is not a safetensors file ({exc}).", _FORMAT) from None
    except OSError as exc:
        raise CheckpointError(path, f"cannot be read ({exc.strerror or exc}).") from None
    for encoder in encoders.values():
        with torch.no_grad():
            for name, value in encoder.state_dict().items():
                value.copy_(state[name].to(value.dtype))
    return list(encoders)
