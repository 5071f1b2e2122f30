"""The task name inside an uploaded delta, read without the ssf core (no torch): what the upload guard
checks when the form names no task. The guard then passes this name on explicitly, so the name checked is
the name stored, whatever else the file says."""

from __future__ import annotations

import json
import struct

MAX_HEADER_BYTES = 1 << 20


def delta_task_name(data: bytes) -> str | None:
    """``__metadata__["task"]`` of a safetensors file; None when unreadable (the engine will say why)."""
    if len(data) < 8:
        return None
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(MAX_HEADER_BYTES, len(data) - 8):
        return None
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    task = meta.get("task") if isinstance(meta, dict) else None
    return task if isinstance(task, str) and task else None
