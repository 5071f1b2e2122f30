"""Per-tenant Prometheus series. Labels are tenant names (created by an operator, so bounded by
configuration; requests of no tenant count under ``-``) and fixed outcome and quota words."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter


class TenantMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "ssf_tenant_requests",
            "Requests past authorization, by tenant and outcome",
            ["tenant", "outcome"],
            registry=registry,
        )
        self.refusals = Counter(
            "ssf_tenant_refusals",
            "Requests refused 429, by tenant and quota",
            ["tenant", "quota"],
            registry=registry,
        )
        self.image_count = Counter(
            "ssf_tenant_images", "Images admitted to the scheduler, by tenant", ["tenant"], registry=registry
        )

    def request(self, tenant: str, outcome: str) -> None:
        self.requests.labels(tenant, outcome).inc()

    def refused(self, tenant: str, quota: str) -> None:
        self.refusals.labels(tenant, quota).inc()

    def images(self, tenant: str, n: int) -> None:
        self.image_count.labels(tenant).inc(n)
