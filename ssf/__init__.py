"""SSF (Scaling & Shifting Your Features) written once, generically, for any timm model.

The public surface: site discovery (``find_sites``), trainable injection (``inject_ssf``), exact folding
(``fold_state_dict``, ``merge_model``), the delta file (``Delta``, ``load_delta``, ``save_delta``) and
backbone loading (``create_backbone``, ``fingerprint``).
"""

from ssf.backbone import (
    BackboneError,
    DeviceError,
    backbone_state,
    create_backbone,
    data_config,
    fingerprint,
    resolve_device,
)
from ssf.delta import (
    BackboneSpec,
    Delta,
    DeltaError,
    PackedSites,
    SiteLayout,
    check_compatible,
    delta_from_model,
    delta_to_bytes,
    load_delta,
    packed,
    parse_delta,
    save_delta,
)
from ssf.fold import NotFoldableError, add_created_biases, fold_state_dict, merge_model
from ssf.layers import ScaleShift, SiteAffine, attach_sites, detach_sites, inject_ssf, mark_trainable
from ssf.sites import Site, SiteError, find_sites, head_prefix, site_params

__all__ = [
    "BackboneError",
    "BackboneSpec",
    "DeviceError",
    "Delta",
    "DeltaError",
    "NotFoldableError",
    "PackedSites",
    "ScaleShift",
    "Site",
    "SiteAffine",
    "SiteError",
    "SiteLayout",
    "add_created_biases",
    "attach_sites",
    "backbone_state",
    "check_compatible",
    "create_backbone",
    "data_config",
    "delta_from_model",
    "delta_to_bytes",
    "detach_sites",
    "find_sites",
    "fingerprint",
    "resolve_device",
    "fold_state_dict",
    "head_prefix",
    "inject_ssf",
    "load_delta",
    "mark_trainable",
    "merge_model",
    "packed",
    "parse_delta",
    "save_delta",
    "site_params",
]
