"""What running Linear/Conv2d sites without their bias buys the mixed path (``fused.bias_free_ops``).

A site's ``y*scale + shift`` after ``x W^T + b`` is ``(x W^T)*scale + (scale*b + shift)``: the mixed path runs
the op without its bias and the site tables hold ``scale*b + shift``, so the site's multiply-add replaces
the bare op's bias add instead of adding a pass over the activation. This compares, in one process and in
interleaved rounds, the bare backbone, the mixed path as served and the same mixed path with every op keeping
its bias (the tables' plain rows), for the torch mixed path and the ONNX backend's mixed graph. All-distinct
batches (every sample its own task). Not part of ``make bench`` (its result does not change between runs of
the same code); run ``python -m bench.bias_free_bench``.

Writes ``bench/results/12-bias-free.md``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any
from unittest import mock

import torch

import ssf
from bench import engine_bench as eb
from bench.report import machine_line, write_section
from service.engine import mixed, onnx_mixed

MODELS = (("test_vit", (1, 2, 4, 8, 16, 32, 64), 200), ("ssf_demo_vit", (1, 4, 8, 16, 64), 100))
ONNX_BATCHES = (1, 8, 64)
SECONDS = 40.0  # at most per cell


def without_bias_folding(build: Callable[[], Any], module: Any) -> Any:
    """``build()`` with no site folding its bias: every op keeps its bias, the shift rows are plain."""
    with mock.patch.object(module, "bias_free_ops", lambda model, sites: {}):
        return build()


def rounds(variants: dict[str, Callable[[], Any]], most: int, base: str = "bare") -> dict[str, Any]:
    """``eb.paired`` against ``base``: as many rounds as fit in ``SECONDS`` (``most`` at most, 5 at least)."""
    for fn in variants.values():
        fn()
    start = time.perf_counter()
    for fn in variants.values():
        fn()
    one = time.perf_counter() - start
    return eb.paired(variants, max(5, min(most, int(SECONDS / max(one, 1e-6)))), base, warm=True)


def torch_rows(model_name: str, batches: tuple[int, ...], most: int) -> list[dict[str, Any]]:
    new, _, entries, size = eb.setup(model_name, max(batches))
    old, _, old_entries, _ = without_bias_folding(partial(eb.setup, model_name, max(batches)), mixed)
    out = []
    for b in batches:
        x = torch.randn(b, *size)
        t = rounds(
            {
                "bare": partial(new.run_bare, x),
                "folded": partial(new.run_mixed, x, [(entries[i], 1) for i in range(b)]),
                "kept": partial(old.run_mixed, x, [(old_entries[i], 1) for i in range(b)]),
            },
            most,
        )
        out.append({"model": model_name, "batch": b, **t})
        print(f"[bias_free] {model_name} b={b}: folded {t['folded']:.3f}, kept {t['kept']:.3f}", flush=True)
    return out


def forward(session: onnx_mixed.MixedSession, x: torch.Tensor, rows: torch.Tensor) -> Any:
    return onnx_mixed.run(session.session, *session._inputs(x, rows))


def onnx_rows(model_name: str, batches: tuple[int, ...], most: int) -> list[dict[str, Any]]:
    model = ssf.create_backbone(model_name, pretrained=False, num_classes=10).eval()
    sites = list(ssf.BackboneSpec.from_model(model, model_name).sites)
    new = onnx_mixed.MixedSession(model, sites)
    old = without_bias_folding(partial(onnx_mixed.MixedSession, model, sites), onnx_mixed)
    size = tuple(int(d) for d in ssf.sites.input_size(model))
    out = []
    for b in batches:
        x, rows = torch.randn(b, *size), torch.zeros(b, dtype=torch.long)
        t = rounds(
            {
                "kept": partial(forward, old, x, rows),
                "folded": partial(forward, new, x, rows),
            },
            most,
            base="kept",
        )
        out.append({"model": model_name, "batch": b, **t})
        print(f"[bias_free] onnx {model_name} b={b}: folded/kept {t['folded']:.3f}", flush=True)
    return out


def report(torch_table: list[dict[str, Any]], onnx_table: list[dict[str, Any]]) -> str:
    def spread(r: dict[str, Any], k: str) -> str:
        return f"{r[k + '_lo']:.3f}-{r[k + '_hi']:.3f}"

    lines = [
        "## Linear and Conv2d sites without their bias (the mixed path's per-site cost)",
        "",
        machine_line(),
        "In one process, interleaved rounds (fresh random order each), all-distinct batches: the bare "
        "backbone, the mixed path as served (each plain Linear/Conv2d site runs without its bias, which its "
        "shift rows hold: `service/engine/fused.py`, `bias_free_ops`) and the same mixed path with every op "
        "keeping its bias. Ratios: median of the per-round ratios, 25th-75th percentile as the spread. "
        "`python -m bench.bias_free_bench` (not part of `make bench`).",
        "",
        "| model | batch | rounds | bare ms | mixed / bare, bias folded | spread | mixed / bare, bias kept "
        "| spread |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in torch_table:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['reps']} | {r['bare_s'] * 1e3:.2f} | **{r['folded']:.3f}** "
            f"| {spread(r, 'folded')} | {r['kept']:.3f} | {spread(r, 'kept')} |"
        )
    lines += [
        "",
        "The ONNX backend's mixed graph (ONNX Runtime, CPU EP), exported both ways, on the same inputs:",
        "",
        "| model | batch | rounds | bias kept ms | bias folded / bias kept | spread |",
        "|---|---|---|---|---|---|",
    ]
    for r in onnx_table:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['reps']} | {r['kept_s'] * 1e3:.2f} | **{r['folded']:.3f}** "
            f"| {spread(r, 'folded')} |"
        )
    return "\n".join(lines) + "\n"


def main(quick: bool = False) -> str:
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    models = (("test_vit", (1, 8), 5),) if quick else MODELS
    torch_table = [row for name, batches, most in models for row in torch_rows(name, batches, most)]
    onnx_table = [
        row for name, _, most in models for row in onnx_rows(name, (1, 8) if quick else ONNX_BATCHES, most)
    ]
    text = report(torch_table, onnx_table)
    if not quick:
        print(write_section("12-bias-free", text))
    return text


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
