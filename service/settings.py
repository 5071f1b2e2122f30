"""Every knob of ``ssf-serve`` in one typed object, read from ``SSF_*`` environment variables and CLI flags.

Unsafe combinations are refused here, before anything listens: a non-loopback host needs an admin token
(the TorchServe "ShellTorch" lesson: a management plane open on all interfaces). The token is a
``SecretStr`` so it never appears in a repr, a log line or a validation error.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, ``localhost``)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to anything: treat it as public


class EngineConfig(BaseModel):
    """Every limit and default the engine works to, under the names of their ``SSF_*`` variables.

    ``Settings`` is an ``EngineConfig`` (it inherits these fields), so the object read from the environment
    is the one the engine gets: no field is renamed or copied on the way, and each default lives here only.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    backend: Literal["torch", "onnx"] = "torch"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    max_cache_bytes: int = Field(default=1 << 30, ge=0, description="merged-copy cache size")
    reconcile_interval_s: float = Field(
        default=2.0, gt=0, description="how often a replica checks the store for changes made elsewhere"
    )

    # limits (checked by the engine; the HTTP layer bounds only request bodies)
    max_body_bytes: int = Field(
        default=8 * MiB, ge=1024, description="request body limit except uploads; per image"
    )
    max_delta_bytes: int = Field(default=16 * MiB, ge=1024, description="delta file size limit")
    max_image_pixels: int = Field(default=40_000_000, ge=1, description="width*height limit per image")
    max_images_per_request: int = Field(default=64, ge=1)
    max_labels: int = Field(default=100_000, ge=1)

    # dynamic batching
    max_batch_size: int = Field(default=32, ge=1)
    max_queue_delay_ms: float = Field(default=5.0, ge=0)
    max_queue_size: int = Field(default=1024, ge=1, description="images waiting in the scheduler, then 429")
    request_timeout_s: float = Field(
        default=30.0, gt=0, description="deadline of a request, body read included"
    )
    merged_min_batch: int = Field(
        default=8, ge=1, description="images a one-task queue needs before its merged copy is built"
    )
    merge_amortize_batches: float = Field(
        default=4.0, ge=0, description="how many batches a new merged copy is expected to serve"
    )
    path_policy: Literal["auto", "mixed", "merged"] = "auto"
    max_resident_tasks: int = Field(
        default=0,
        ge=0,
        description="tasks whose rows stay on the device (0 = unbounded); beyond it the least recently used "
        "is evicted and loaded again from the store on its next request",
    )

    # task lifecycle: evaluation, shadow traffic, per-task metrics
    eval_max_images: int = Field(default=10_000, ge=1, description="labelled images in one evaluation")
    eval_sync_max_images: int = Field(
        default=256, ge=0, description="larger evaluations run as a job (202 and a status URL)"
    )
    eval_max_body_bytes: int = Field(
        default=256 * MiB, ge=1024, description="body limit of POST /tasks/{name}/evaluate"
    )
    eval_max_unpacked_bytes: int = Field(
        default=512 * MiB, ge=1024, description="total uncompressed size of an evaluation archive"
    )
    eval_max_compression_ratio: float = Field(
        default=100.0, ge=1, description="uncompressed/compressed size limit per archive entry (zip bombs)"
    )
    keep_versions: int = Field(
        default=5, ge=2, le=1000, description="versions each task keeps (current and staged included)"
    )
    audit_max_records: int = Field(
        default=10_000, ge=10, description="audit records the store keeps (the oldest are dropped)"
    )
    shadow_fraction: float = Field(
        default=0.1, ge=0, le=1, description="share of a task's live requests also run on its staged version"
    )
    metrics_top_tasks: int = Field(
        default=20, ge=0, description="tasks with their own per-task metric series; the rest are 'other'"
    )
    torch_threads: int = Field(
        default=0,
        ge=0,
        description="CPU threads one forward may use (torch's intra-op threads, and ONNX Runtime's); 0 = "
        "torch's default, one per core. On a CPU host, one fewer than the cores leaves a core to decoding "
        "and HTTP, which keeps a light tenant's latency beside a saturating one (bench/fairness.py)",
    )
    gil_switch_interval_ms: float = Field(
        default=0.5,
        gt=0,
        le=100,
        description="the interpreter's thread switch interval while the engine runs (Python's default 5 ms). "
        "The model thread takes the interpreter lock back after every op; while the event loop parses "
        "requests it waited up to this long each time (HTTP at the p99 target on 2 shared cores: +5-11% "
        "against 5 ms in three paired repeats, -4% in a fourth; in process within the host's noise)",
    )
    over_share_nice: int = Field(
        default=19,
        ge=0,
        le=19,
        description="Linux CPU priority (nice) of decoding for a tenant holding more than half of its queue "
        "share while other tenants are active: on a host where decoding shares the cores with the forward, "
        "it keeps that tenant from slowing the others' decoding (bench/fairness.py); 0 = no difference",
    )
    cuda_graphs: bool = Field(
        default=True,
        description="on CUDA, replay the mixed path's trunk as CUDA graphs (one per padded power-of-two "
        "batch size up to max_batch_size; 0.2-0.5x the eager bare backbone's time at batch 1-8 on an H200)",
    )
    torch_compile: bool = Field(
        default=False,
        description="run the mixed path's trunk through torch.compile (dynamic batch size): the SSF sites "
        "fuse into neighbouring kernels (ssf_demo_vit on CPU: mixed 1.02-1.07x the eager bare backbone, "
        "eager mixed 1.08-1.16x); compiles at startup (10-30 s per model on 2 cores); takes precedence "
        "over cuda_graphs",
    )

    @model_validator(mode="after")
    def _consistent(self) -> EngineConfig:
        if self.backend == "onnx" and (self.dtype != "float32" or self.device == "cuda"):
            raise ValueError("the onnx backend runs float32 on the CPU: drop --device cuda and SSF_DTYPE")
        if self.max_images_per_request > self.max_queue_size:
            raise ValueError("max_queue_size must hold at least one request of max_images_per_request images")
        return self


class Settings(EngineConfig, BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SSF_", extra="forbid", frozen=True)

    # what to serve (backend, device, dtype and every limit: EngineConfig)
    model: str = Field(min_length=1, description="timm model name of the frozen backbone")
    weights: Path | None = Field(None, description="local safetensors state_dict for the backbone")
    store: str = Field("ssf-store", description="a directory, or redis://HOST:PORT/DB")

    # where to listen and who may change things
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    admin_token: SecretStr | None = None
    client_tokens: SecretStr | None = Field(
        None, description="comma-separated tokens; when set, predict needs one of them (or the admin token)"
    )
    token_secret: SecretStr | None = Field(
        None,
        description="key of the HMAC that stores tenant tokens (docs/multi-team.md); unset: no stored tokens",
    )
    tenant_refresh_s: float = Field(
        1.0, gt=0, description="how often a replica reloads tenants and tokens from the store"
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    # shutdown: readiness turns 503 for drain_delay_s before the listener closes, then in-flight
    # requests get graceful_timeout_s to finish
    drain_delay_s: float = Field(2.0, ge=0)
    graceful_timeout_s: float = Field(30.0, ge=0)
    # idle keep-alive connections stay open this long: longer than nginx's upstream keepalive_timeout (60 s)
    # and httpx's pool expiry (5 s), so the server never closes a connection a proxy or client is reusing
    # (uvicorn's 5 s default races them: the reuse gets a reset instead of a response)
    keep_alive_s: float = Field(75.0, gt=0)

    @field_validator("admin_token", "client_tokens", "token_secret", mode="before")
    @classmethod
    def _empty_token_is_none(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():
            return None
        if isinstance(value, SecretStr) and not value.get_secret_value().strip():
            return None
        return value

    @model_validator(mode="after")
    def _refuse_open_admin_plane(self) -> Settings:
        if self.admin_token is None and not is_loopback(self.host):
            raise ValueError(
                f"refusing to listen on {self.host} without an admin token: set SSF_ADMIN_TOKEN "
                "or listen on 127.0.0.1"
            )
        return self

    @property
    def admin_enabled(self) -> bool:
        return self.admin_token is not None

    @property
    def client_token_list(self) -> list[str]:
        if self.client_tokens is None:
            return []
        return [t.strip() for t in self.client_tokens.get_secret_value().split(",") if t.strip()]

    @property
    def max_upload_body_bytes(self) -> int:
        """The body limit of ``POST /tasks``: the delta plus room for the multipart envelope."""
        return self.max_delta_bytes + 64 * 1024
