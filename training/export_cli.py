"""``ssf-export``: a task delta folded into its backbone, as ONNX or as a plain timm state_dict.

- ``--format onnx``: input ``image`` (N,3,H,W float32, normalized as the backbone expects), output
  ``logits`` (N,K), dynamic batch. Checked at export time: ONNX Runtime and PyTorch must agree within
  1e-4 (max |logit difference|, fp32) on a batch of two, or nothing is written.
- ``--format timm``: the merged state_dict as safetensors that ``timm.create_model(NAME, num_classes=K)``
  loads with ``strict=True``. Folding a site whose op has no bias creates one (e.g. ConvNeXt's
  depthwise convs with ``conv_bias=False``, or any ``bias=False`` Linear); those keys are listed in the
  file's metadata under ``created_biases``, and such a model must be given them first
  (``ssf.add_created_biases``). ViT, Swin and ConvNeXt under timm defaults create none.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path
from typing import NoReturn

import numpy as np
import safetensors.torch
import torch
from torch import nn

import ssf
from ssf.layers import CONTAINER, ScaleShift
from training.methods import MethodError

ONNX_TOLERANCE = 1e-4


class ExportError(ValueError):
    """The export cannot be made or does not reproduce PyTorch."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ssf-export", description="Fold a task delta into its backbone.")
    p.add_argument("--model", required=True, help="timm model name")
    p.add_argument("--weights", help="local safetensors state_dict for the backbone")
    p.add_argument("--delta", required=True, type=Path)
    p.add_argument("--format", required=True, choices=("onnx", "timm"))
    p.add_argument("--out", required=True, type=Path)
    return p


def fail(message: str) -> NoReturn:
    print(f"ssf-export: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def task_model(name: str, weights: Path | None, delta_path: Path) -> tuple[nn.Module, ssf.Delta]:
    """The backbone with the delta's sites (unfolded) and head: the reference the export must match."""
    if not delta_path.is_file():
        raise ExportError(f"delta file {str(delta_path)!r} does not exist")
    delta = ssf.parse_delta(delta_path.read_bytes())
    model = ssf.create_backbone(name, weights, delta.num_classes, pretrained=weights is None)
    ssf.check_compatible(delta, ssf.BackboneSpec.from_model(model, name, delta.site_scheme))
    if delta.sites:
        ssf.inject_ssf(model, delta.site_scheme)
        for key, affine in getattr(model, CONTAINER).items():
            assert isinstance(affine, ScaleShift)
            scale, shift = delta.sites[key.replace("/", ".")]
            affine.scale.data.copy_(scale)
            affine.shift.data.copy_(shift)
    missing = model.load_state_dict(delta.head, strict=False)
    if missing.unexpected_keys:
        raise ExportError(f"delta head has keys the model lacks: {missing.unexpected_keys[:3]}")
    return model.eval(), delta


def merged(model: nn.Module) -> nn.Module:
    return ssf.merge_model(model) if hasattr(model, CONTAINER) else model


def export_timm(model: nn.Module, delta: ssf.Delta, out: Path) -> dict:
    plain = merged(model)
    if hasattr(plain, CONTAINER):
        raise ExportError("this delta has a site that cannot fold (paper-scheme ConvNeXt); use --format onnx")
    base = ssf.create_backbone(delta.backbone, None, delta.num_classes, pretrained=False).state_dict()
    state = {k: v.detach().contiguous() for k, v in plain.state_dict().items()}
    created = sorted(set(state) - set(base))
    meta = {"task": delta.task, "model": delta.backbone, "labels": json.dumps(delta.labels)}
    meta["created_biases"] = json.dumps(created)
    safetensors.torch.save_file(state, str(out), metadata=meta)
    return {"format": "timm", "out": str(out), "created_biases": created}


def export_onnx(model: nn.Module, out: Path) -> dict:
    """Export the merged graph, then run it in ONNX Runtime against the unfolded PyTorch model."""
    import onnxruntime as ort

    plain = merged(model)
    size = ssf.sites.input_size(plain)
    x = torch.randn(2, *size, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about constant shapes: checked by ORT below
        path = Path(tmp) / "model.onnx"
        torch.onnx.export(
            plain,
            (x,),
            str(path),
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
        data = path.read_bytes()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"image": x.numpy()})
    with torch.no_grad():
        want = model(x).numpy()
    diff = float(np.abs(got - want).max())
    if not diff <= ONNX_TOLERANCE:
        raise ExportError(f"ONNX Runtime differs from PyTorch by {diff:.2e} > {ONNX_TOLERANCE}; not written")
    out.write_bytes(data)
    return {"format": "onnx", "out": str(out), "max_abs_logit_diff": diff, "input_size": list(size)}


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    try:
        model, delta = task_model(args.model, args.weights, args.delta)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        report = (
            export_onnx(model, args.out) if args.format == "onnx" else export_timm(model, delta, args.out)
        )
    except ssf.DeltaError as e:
        fail(f"{args.delta}: {e.message}")
    except (ExportError, ssf.BackboneError, ssf.SiteError, ssf.NotFoldableError, MethodError) as e:
        fail(str(e).splitlines()[0])
    print(json.dumps(report))


if __name__ == "__main__":
    main()
