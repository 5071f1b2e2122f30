"""The atheris target behind ``tests.reliability.long.fuzz_decode`` (run by it in a child process).

``python -m tests.reliability.long.decode_target CORPUS_DIR [libFuzzer flags]``: coverage-guided fuzzing of
``service.engine.images.Preprocessor`` (decode, orient, convert, transform). Pillow's Python modules and the
wrapper are instrumented (Pillow's C decoders are not: their edges do not count as coverage). Property: only
the typed errors the wrapper declares escape (BadImage, ImageTooLarge, UnsupportedMediaType), and no input
takes more than ``SSF_FUZZ_MAX_S`` seconds (default 2). A first timing over the limit is retried twice and
counts only when every timing is over it (the machine is shared: a scheduling stall is not a slow input); the
retries are reported as ``RETIMED`` lines. An offending input is written to ``SSF_FUZZ_ARTIFACTS`` (if set) as
``slow-<sha1>`` or ``crash-<sha1>`` before the exception reaches libFuzzer. Torch runs on one thread here.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["PIL", "service.engine.images"]):
    import PIL.Image
    from PIL import ImageOps, TiffImagePlugin  # noqa: F401  (EXIF orientation)

    PIL.Image.init()  # the format plugins load lazily: import them here, instrumented
    from service.engine.images import Preprocessor
    from service.settings import EngineConfig

import timm  # noqa: E402  (after the instrumented imports on purpose)
import torch  # noqa: E402

from service.engine.protocol import BadImage, ImageTooLarge, UnsupportedMediaType  # noqa: E402

TYPED = (BadImage, ImageTooLarge, UnsupportedMediaType)
MAX_S = float(os.environ.get("SSF_FUZZ_MAX_S", "2"))
ARTIFACTS = os.environ.get("SSF_FUZZ_ARTIFACTS")
torch.set_num_threads(1)
PRE = Preprocessor(timm.create_model("test_vit", pretrained=False), EngineConfig())
SLOWEST = [0.0]


class TooSlow(Exception):
    """An input the decode wrapper spent more than MAX_S seconds on (a hang, for this property)."""


def save(kind: str, data: bytes) -> None:
    if ARTIFACTS:
        (Path(ARTIFACTS) / f"{kind}-{hashlib.sha1(data).hexdigest()}").write_bytes(data)


def timed(data: bytes) -> float:
    start = time.perf_counter()
    try:
        PRE([data])
    except TYPED:
        pass
    except BaseException:
        save("crash", data)
        raise
    return time.perf_counter() - start


def one_input(data: bytes) -> None:
    elapsed = timed(data)
    if elapsed > MAX_S:
        retries = [timed(data) for _ in range(2)]
        print(f"RETIMED {elapsed:.3f}s -> {max(retries):.3f}s len={len(data)}", file=sys.stderr, flush=True)
        elapsed = min(elapsed, *retries)
    if elapsed > SLOWEST[0]:
        SLOWEST[0] = elapsed
        print(f"SLOWEST {elapsed:.4f}s len={len(data)}", file=sys.stderr, flush=True)
    if elapsed > MAX_S:
        save("slow", data)
        raise TooSlow(f"decode took {elapsed:.2f} s (limit {MAX_S} s) on {len(data)} bytes")


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
