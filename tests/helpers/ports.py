"""Loopback ports: the topology script's helpers (``deploy/topology.py``), the one implementation."""

from __future__ import annotations

from deploy.topology import free_port, wait_for_port

__all__ = ["free_port", "wait_for_port"]
