"""S2: hypothesis fuzz of the decode wrapper (service.engine.images.Preprocessor), seeded with the S1 corpus.

Pass criterion: only our typed errors (BadImage, ImageTooLarge, UnsupportedMediaType) escape; no call takes
longer than 2 s.
"""

from __future__ import annotations

import time

import pytest
import timm
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from service.engine.images import Preprocessor
from service.engine.protocol import BadImage, ImageTooLarge, UnsupportedMediaType
from service.settings import EngineConfig
from tests.reliability import corpus

TYPED = (BadImage, ImageTooLarge, UnsupportedMediaType)
SEEDS = [c.data for c in corpus.image_cases(flips_per_format=0, cuts_per_format=3)]

_pre: Preprocessor | None = None


def preprocessor() -> Preprocessor:
    global _pre
    if _pre is None:
        _pre = Preprocessor(timm.create_model("test_vit", pretrained=False), EngineConfig())
    return _pre


def _mutate(seed: bytes, flips: list[tuple[int, int]], cut: int | None) -> bytes:
    data = bytearray(seed)
    for pos, bit in flips:
        if data:
            data[pos % len(data)] ^= 1 << (bit % 8)
    if cut is not None and data:
        data = data[: cut % (len(data) + 1)]
    return bytes(data)


inputs = st.one_of(
    st.binary(max_size=4096),
    st.builds(
        _mutate,
        st.sampled_from(SEEDS),
        st.lists(st.tuples(st.integers(0, 2**20), st.integers(0, 7)), max_size=12),
        st.none() | st.integers(0, 2**20),
    ),
)


def check(data: bytes) -> None:
    start = time.monotonic()
    try:
        preprocessor()([data])
    except TYPED:
        pass
    elapsed = time.monotonic() - start
    assert elapsed < 2.0, f"decode took {elapsed:.2f} s"


@pytest.mark.timeout(600)
@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(inputs)
@example(b"")
def test_decode_only_typed_errors(data: bytes) -> None:
    check(data)


def test_seed_corpus_only_typed_errors() -> None:
    for case in corpus.image_cases(flips_per_format=20, cuts_per_format=20):
        check(case.data)
