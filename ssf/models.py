"""The project's own small architectures, registered with timm so every CLI takes them by name.

``ssf_demo_vit`` is a small, fast ViT (64 px, 2.7M parameters) for tests and benchmarks, with random
weights: it is not a pretrained backbone (the demo serves ImageNet EfficientNet-Lite0, see ssf/importer.py).
It is a plain timm VisionTransformer, so every SSF rule for ViT applies.
"""

from __future__ import annotations

from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "num_classes": 1000,
        "input_size": (3, 64, 64),
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "interpolation": "bicubic",
        "crop_pct": 1.0,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        **kwargs,
    }


# timm's register_model reads this module-level table when the decorator runs.
default_cfgs = generate_default_cfgs({"ssf_demo_vit": _cfg()})


@register_model
def ssf_demo_vit(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT, 64 px input, 8 px patches, width 192, 6 blocks, 3 heads (about 2.7M parameters)."""
    if pretrained:
        raise RuntimeError("ssf_demo_vit has no pretrained weights; it is a test and benchmark architecture")
    args: dict[str, Any] = dict(img_size=64, patch_size=8, embed_dim=192, depth=6, num_heads=3)
    return build_model_with_cfg(
        VisionTransformer,
        "ssf_demo_vit",
        pretrained=False,
        pretrained_filter_fn=checkpoint_filter_fn,
        **dict(args, **kwargs),
    )
