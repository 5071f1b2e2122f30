"""A deliberately leaking ssf-serve, the R7 soak's positive control: ``python -m
tests.reliability.long.leaky_serve`` takes the same arguments as ``python -m service.cli``.

Each decoded image keeps a 32 KiB buffer alive forever (the bug it models: a request-scoped buffer stored
on a long-lived object). The soak must fail on this build; if it passes, the soak's RSS check is blind.
Test code only: the product has no leak switch.
"""

from __future__ import annotations

import sys

from PIL import Image

from service import cli
from service.engine.images import Preprocessor

LEAK_BYTES = 32 * 1024
_kept: list[bytearray] = []
_decode = Preprocessor.decode


def _leaky_decode(self: Preprocessor, data: bytes, index: int) -> Image.Image:
    _kept.append(bytearray(b"\x01" * LEAK_BYTES))  # written, so the pages are resident
    return _decode(self, data, index)


Preprocessor.decode = _leaky_decode  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(cli.main())
