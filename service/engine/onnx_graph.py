"""ONNX graphs: one exported graph of the plain backbone, and per task a merged graph made by replacing
initializers.

The base is exported once with every bias that folding can create already present (biases of ops that
have none, e.g. ``qkv_bias=False``) and with distinct placeholder values (so the exporter cannot merge
equal tensors), so every state-dict key has an initializer of its own name; the real base values then
replace the placeholders, and a task's graph is that base graph with the folded initializers swapped.
The mapping is verified when built: the graph holding the base weights must reproduce the base model's
outputs. Both backends export with this (``GET /tasks/{name}/model.onnx``); the ONNX backend also runs it.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from torch import nn

import ssf
from service.engine.merged import build_plain
from service.engine.protocol import StartupError

OPSET = 17


class OnnxExportError(StartupError):
    """The exported graph's initializers cannot be mapped to the model's state dict."""


def export_plain(model: nn.Module, example: torch.Tensor) -> bytes:
    """``image`` (N,3,H,W) -> ``logits`` (N,K); batch and classes dynamic; initializers keep their names."""
    buf = io.BytesIO()
    kwargs = dict(
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch", 1: "classes"}},
        do_constant_folding=False,  # folding would rename (and pre-transpose) the weights
        opset_version=OPSET,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (example,), buf, dynamo=False, **kwargs)  # type: ignore[arg-type]
        except Exception:  # models the TorchScript exporter cannot trace: the dynamo exporter
            buf = io.BytesIO()
            torch.onnx.export(model, (example,), buf, dynamo=True, **kwargs)  # type: ignore[arg-type]
    return buf.getvalue()


def new_session(data: bytes, device: str = "cpu") -> ort.InferenceSession:
    """A session on the CPU, or on ONNX Runtime's CUDA provider (onnxruntime-gpu, the ``gpu`` extra) with
    TF32 off so float32 stays float32."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = torch.get_num_threads()  # SSF_TORCH_THREADS, when set, holds for both
    # no busy-waiting between runs: the idle pool would steal the cores the PyTorch path is using
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if device == "cuda":
        providers: list[Any] = [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
        return ort.InferenceSession(data, options, providers=providers)
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


class OnnxGraphs:
    """The base graph and each task's merged graph, from a meta skeleton and the base state dict."""

    def __init__(self, skeleton: nn.Module, base: Mapping[str, torch.Tensor], sites: list[ssf.Site]) -> None:
        self.sites = sites
        self.base = {
            k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype)
            for k, v in base.items()
        }
        identity = {s.path: (torch.ones(s.channels), torch.zeros(s.channels)) for s in sites}
        # the base with zero biases wherever folding would create one
        self.state = {**ssf.fold_state_dict(self.base, sites, identity), **self.base}
        self.created = sorted(set(self.state) - set(self.base))
        g = torch.Generator().manual_seed(0)
        # Export with distinct random values: the exporter merges initializers of equal value (e.g. two
        # all-zero biases), which would tie tensors that tasks fold differently. The real values go in after.
        export_state = {
            k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v
            for k, v in self.state.items()
        }
        model = build_plain(skeleton, export_state).to("cpu").float()
        size = tuple(int(d) for d in ssf.sites.input_size(model))
        example = torch.randn(2, *size, generator=g)
        self.proto = onnx.load_from_string(export_plain(model, example))
        self.index = {init.name: i for i, init in enumerate(self.proto.graph.initializer)}
        # integer buffers (BatchNorm's num_batches_tracked) take no part in an eval graph
        missing = [
            k
            for k, v in self.state.items()
            if k not in self.index and v.numel() > 0 and v.is_floating_point()
        ]
        if missing:
            raise OnnxExportError(
                f"{len(missing)} weights have no initializer of their name, e.g. {missing[:3]}"
            )
        self.proto = onnx.load_from_string(self.graph_bytes(self.state))
        self.base_session = self._verify(example, build_plain(skeleton, self.state).to("cpu").float())

    def _verify(self, example: torch.Tensor, plain: nn.Module) -> ort.InferenceSession:
        """Replacing every mapped initializer with the base weights must reproduce the base outputs."""
        session = new_session(self.graph_bytes({}))
        got = session.run(["logits"], {"image": example.numpy()})[0]
        with torch.inference_mode():
            want = plain(example).numpy()
        err = float(np.abs(got - want).max())
        if not err <= 1e-4 * max(1.0, float(np.abs(want).max())):
            raise OnnxExportError(
                f"the initializer mapping does not reproduce the base model (max error {err})"
            )
        return session

    def graph_bytes(self, replace: Mapping[str, torch.Tensor]) -> bytes:
        graph = onnx.ModelProto()
        graph.CopyFrom(self.proto)
        inits = graph.graph.initializer
        for key, tensor in replace.items():
            if key in self.index:
                inits[self.index[key]].CopyFrom(numpy_helper.from_array(tensor.detach().numpy(), key))
        del graph.graph.value_info[:]  # shapes inferred for the base's class count no longer hold
        return graph.SerializeToString()

    def merged_state(self, delta: ssf.Delta) -> dict[str, torch.Tensor]:
        """The tensors of the task's graph that differ from the base graph."""
        folded = [s for s in self.sites if s.path in delta.sites]
        merged = ssf.fold_state_dict(self.base, folded, delta.sites, delta.head)
        return {k: v for k, v in merged.items() if v is not self.base.get(k)}

    def merged_bytes(self, delta: ssf.Delta) -> bytes:
        return self.graph_bytes(self.merged_state(delta))
