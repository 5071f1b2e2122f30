"""Generated hostile inputs (S1 images, S6 deltas). Deterministic: every case comes from a fixed seed.

Each image case says what a correct server must do with it:
- "ok": a valid image (must be accepted: 200);
- "reject": must be refused with a 4xx (400/413/415/422);
- "no5xx": may decode or not (bit flips), but never a 5xx.
"""

from __future__ import annotations

import io
import random
import struct
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from PIL import Image

SERVED_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "BMP": "image/bmp"}
OTHER_FORMATS = {"GIF": "image/gif", "TIFF": "image/tiff", "ICO": "image/x-icon"}


@dataclass(frozen=True)
class ImageCase:
    name: str
    data: bytes
    content_type: str
    expect: str  # "ok" | "reject" | "no5xx"


def encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def sample_image(seed: int = 0, size: tuple[int, int] = (48, 40)) -> Image.Image:
    rng = random.Random(seed)
    img = Image.new("RGB", size)
    img.putdata(
        [(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(size[0] * size[1])]
    )
    return img


def png_header_bomb(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (the data stream is a few bytes)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body))
            + kind
            + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def with_orientation(img: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", exif=exif.tobytes(), quality=95)


def image_cases(flips_per_format: int = 460, cuts_per_format: int = 20) -> Iterator[ImageCase]:
    base = sample_image()
    rng = random.Random(1234)
    valid = {fmt: encode(base, fmt) for fmt in SERVED_FORMATS}
    for fmt, ctype in SERVED_FORMATS.items():
        yield ImageCase(f"valid-{fmt}", valid[fmt], ctype, "ok")
        data = valid[fmt]
        for i in range(cuts_per_format):
            cut = max(1, int(len(data) * (i + 0.5) / (cuts_per_format + 1)))
            yield ImageCase(f"truncated-{fmt}-{cut}", data[:cut], ctype, "no5xx")
        for i in range(flips_per_format):
            flipped = bytearray(data)
            for _ in range(rng.randint(1, 8)):
                pos = rng.randrange(len(flipped))
                flipped[pos] ^= 1 << rng.randrange(8)
            yield ImageCase(f"bitflip-{fmt}-{i}", bytes(flipped), ctype, "no5xx")
    for fmt, ctype in OTHER_FORMATS.items():  # decodable by Pillow, but not formats we serve
        data = encode(base, fmt)
        yield ImageCase(f"unsupported-{fmt}", data, ctype, "reject")
        yield ImageCase(f"unsupported-as-png-{fmt}", data, "image/png", "reject")
        for i in range(cuts_per_format):
            yield ImageCase(
                f"truncated-{fmt}-{i}", data[: max(1, len(data) * i // cuts_per_format)], ctype, "reject"
            )
    for w, h in [(10_000, 10_000), (30_000, 30_000), (65_535, 1), (1, 65_535), (20_000, 20_000)]:
        yield ImageCase(f"bomb-{w}x{h}", png_header_bomb(w, h), "image/png", "reject")
    yield ImageCase("empty", b"", "image/png", "reject")
    yield ImageCase("one-pixel", encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), "image/png", "ok")
    for mode in ("CMYK", "P", "LA", "L", "I;16", "RGBA", "1", "I", "F"):
        img = (
            base.convert("RGB").convert(mode) if mode not in ("I;16",) else base.convert("L").convert("I;16")
        )
        fmt = "JPEG" if mode == "CMYK" else "TIFF" if mode in ("I", "F") else "PNG"
        expect = "reject" if fmt == "TIFF" else "ok"
        yield ImageCase(f"mode-{mode}", encode(img, fmt), SERVED_FORMATS.get(fmt, "image/tiff"), expect)
    frames = [sample_image(i, (16, 16)) for i in range(100)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    yield ImageCase("gif-100-frames", buf.getvalue(), "image/gif", "reject")
    for orientation in range(1, 9):
        yield ImageCase(
            f"exif-orientation-{orientation}", with_orientation(base, orientation), "image/jpeg", "ok"
        )
    for name, data in [
        ("text", b"hello, this is not an image"),
        ("html", b"<html><script>alert(1)</script></html>"),
        ("json", b'{"image": "http://169.254.169.254/latest/meta-data"}'),
        ("pickle", b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94."),
        ("elf", b"\x7fELF" + bytes(60)),
        ("zeros", bytes(4096)),
        ("random", random.Random(7).randbytes(4096)),
        ("svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'),
    ]:
        yield ImageCase(f"nonimage-{name}", data, "image/png", "reject")
    yield ImageCase("png-bytes-as-text", valid["PNG"], "text/plain", "reject")
    yield ImageCase("png-bytes-as-octet-stream", valid["PNG"], "application/octet-stream", "reject")
    yield ImageCase("png-bytes-as-jpeg", valid["PNG"], "image/jpeg", "no5xx")
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as z:
        z.writestr("payload.py", "print('owned')")
    yield ImageCase("polyglot-jpeg-zip", valid["JPEG"] + zbuf.getvalue(), "image/jpeg", "no5xx")
    yield ImageCase("zip-only", zbuf.getvalue(), "image/jpeg", "reject")


def orientation_reference(orientation: int) -> Image.Image:
    """What an EXIF-oriented JPEG must look like after the server applies the orientation."""
    from PIL import ImageOps

    return ImageOps.exif_transpose(Image.open(io.BytesIO(with_orientation(sample_image(), orientation))))


# ------------------------------------------------------------------------------------------------ S6


@dataclass(frozen=True)
class DeltaCase:
    name: str
    data: bytes
    task_name: str | None  # the form field `name`, when the case is about the name


def _split(data: bytes) -> tuple[dict, bytes]:
    import json

    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join(header: dict, body: bytes, pad: bool = True) -> bytes:
    import json

    raw = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def _edit_meta(data: bytes, **changes: str | None) -> bytes:
    header, body = _split(data)
    for k, v in changes.items():
        if v is None:
            header["__metadata__"].pop(k, None)
        else:
            header["__metadata__"][k] = v
    return _join(header, body)


def _tensor_names(header: dict) -> list[str]:
    return [k for k in header if k != "__metadata__"]


def hostile_deltas(valid: bytes) -> Iterator[DeltaCase]:  # noqa: C901  (a flat list of cases)
    header, body = _split(valid)
    names = _tensor_names(header)
    site = next(k for k in names if k.endswith(".scale"))
    head_w = next(k for k in names if k.startswith("head.") and k.endswith("weight"))

    def edited(name: str, fn) -> DeltaCase:  # type: ignore[no-untyped-def]
        h, b = _split(valid)
        out = fn(h, b)
        return DeltaCase(name, out if isinstance(out, bytes) else _join(h, b), None)

    yield DeltaCase("empty", b"", None)
    yield DeltaCase("seven-bytes", b"\x00" * 7, None)
    yield DeltaCase("header-longer-than-file", struct.pack("<Q", len(valid)) + valid[8:], None)
    yield DeltaCase("header-claims-100MB", struct.pack("<Q", 100 * 2**20) + valid[8:], None)
    yield DeltaCase("header-claims-2^63", struct.pack("<Q", 2**63) + valid[8:], None)
    yield DeltaCase("header-64KiB+1-junk", struct.pack("<Q", 65537) + b"{" * 65537 + body, None)
    yield DeltaCase("header-not-json", struct.pack("<Q", 8) + b"notjson!" + body, None)
    yield DeltaCase("header-json-list", struct.pack("<Q", 8) + b"[1,2,3] " + body, None)
    yield DeltaCase("header-non-utf8", struct.pack("<Q", 8) + b"\xff\xfe\xfd\xfc{}  " + body, None)
    yield DeltaCase("truncated-body", valid[: len(valid) - 64], None)
    yield DeltaCase("truncated-header", valid[:20], None)
    yield DeltaCase("trailing-garbage", valid + b"\x00" * 1000, None)

    def offsets(delta_start: int, delta_end: int):  # type: ignore[no-untyped-def]
        def fn(h: dict, b: bytes) -> None:
            start, end = h[site]["data_offsets"]
            h[site]["data_offsets"] = [start + delta_start, end + delta_end]

        return fn

    yield edited("offsets-out-of-range", offsets(0, 10**9))
    yield edited("offsets-negative-length", offsets(8, -8))
    yield edited("offsets-shifted-overlap", offsets(4, 4))

    def overlap(h: dict, b: bytes) -> None:
        h[site]["data_offsets"] = h[head_w]["data_offsets"]

    yield edited("offsets-alias-another-tensor", overlap)
    for dtype in ("I64", "F64", "I32", "U8", "BOOL", "I8", "F8_E4M3", "XX"):

        def set_dtype(h: dict, b: bytes, dtype: str = dtype) -> None:
            h[site]["dtype"] = dtype

        yield edited(f"dtype-{dtype}", set_dtype)

    def shape(new: list[int]):  # type: ignore[no-untyped-def]
        def fn(h: dict, b: bytes) -> None:
            h[site]["shape"] = new

        return fn

    n = header[site]["shape"][0]
    for label, new in [
        ("2d", [n, 1]),
        ("scalar", []),
        ("half", [n // 2]),
        ("double", [2 * n]),
        ("neg", [-n]),
        ("huge", [2**40]),
    ]:
        yield edited(f"shape-{label}", shape(new))

    def drop(key: str):  # type: ignore[no-untyped-def]
        def fn(h: dict, b: bytes) -> None:
            del h[key]

        return fn

    yield edited("missing-scale", drop(site))
    yield edited("missing-head-weight", drop(head_w))

    def extra(key: str):  # type: ignore[no-untyped-def]
        def fn(h: dict, b: bytes) -> None:
            h[key] = dict(h[site])

        return fn

    yield edited("extra-site", extra("sites.blocks.99.attn.qkv.scale"))
    yield edited("extra-stray-tensor", extra("backbone.weight"))
    yield edited("extra-traversal-name", extra("sites.../../etc/passwd.scale"))
    yield edited(
        "extra-non-utf8-ish-name",
        extra("sites.\udcff.scale".encode("utf-8", "surrogateescape").decode("latin-1")),
    )

    def duplicate(h: dict, b: bytes) -> bytes:
        import json

        raw = json.dumps(h, separators=(",", ":"))
        entry = json.dumps({site: h[site]}, separators=(",", ":"))[1:-1]
        raw = raw[:-1] + "," + entry + "}"
        enc = raw.encode() + b" " * (-len(raw) % 8)
        return struct.pack("<Q", len(enc)) + enc + b

    yield edited("duplicate-tensor-key", duplicate)
    nan = struct.pack("<f", float("nan"))
    inf = struct.pack("<f", float("inf"))

    def poke(value: bytes, key: str):  # type: ignore[no-untyped-def]
        def fn(h: dict, b: bytes) -> bytes:
            start = h[key]["data_offsets"][0]
            return _join(h, b[:start] + value + b[start + 4 :])

        return fn

    yield edited("nan-in-site", poke(nan, site))
    yield edited("inf-in-head", poke(inf, head_w))
    yield edited("neg-inf-in-site", poke(struct.pack("<f", float("-inf")), site))
    for key, value in [
        ("format_version", "2"),
        ("format_version", "1.0"),
        ("format", "lora"),
        ("format", None),
        ("backbone_fingerprint", "sha256:" + "0" * 64),
        ("backbone_fingerprint", None),
        ("labels", "not json"),
        ("labels", "[]"),
        ("labels", '["a"]'),
        ("labels", "[1, 2, 3]"),
        ("labels", '{"a": 1}'),
        ("labels", '["' + "x" * 300 + '"]'),
        ("method", "adapter"),
        ("method", "full"),
        ("task", None),
        ("preprocess", "[1"),
        ("metrics", "NaN]"),
        ("site_scheme", None),
    ]:
        yield DeltaCase(f"meta-{key}-{str(value)[:12]}", _edit_meta(valid, **{key: value}), None)
    yield DeltaCase("meta-10MB", _edit_meta(valid, metrics='{"x": "' + "y" * (10 * 2**20) + '"}'), None)
    yield DeltaCase("meta-not-strings", _join({**header, "__metadata__": {"format": 1}}, body), None)
    yield DeltaCase(
        "meta-missing", _join({k: v for k, v in header.items() if k != "__metadata__"}, body), None
    )
    yield DeltaCase("pickle-renamed", b"\x80\x04\x95" + b"\x00" * 200 + b".", None)
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as z:  # the layout torch.save writes
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        z.writestr("archive/version", b"3\n")
    yield DeltaCase("torch-zip-renamed", zbuf.getvalue(), None)
    yield DeltaCase("onnx-file", b"\x08\x07\x12\x07pytorch\x1a\x032.0:" + bytes(200), None)
    yield DeltaCase("png-file", encode(sample_image(), "PNG"), None)
    for name in [
        "../x",
        "a/b",
        "%2e%2e",
        "..\\x",
        "x" * 300,
        "ｔask",
        "tаsk",
        "Task",
        "-lead",
        ".hidden",
        "a b",
        "",
        "a\x00b",
        "/abs",
        "con",
        "x" * 64,
    ]:
        expect_valid = name in ("con",)
        if expect_valid:
            continue
        yield DeltaCase(f"name-{name[:20]!r}", valid, name)


# --------------------------------------------------------------------------- evaluation archives
@dataclass(frozen=True)
class ArchiveCase:
    """A hostile ``archive`` for ``POST /tasks/{name}/evaluate``: the status and code a correct server answers
    (a server whose ``SSF_EVAL_MAX_UNPACKED_BYTES`` is ``ARCHIVE_UNPACKED_LIMIT``)."""

    name: str
    data: bytes
    status: int
    code: str


ARCHIVE_UNPACKED_LIMIT = 2 * 1024 * 1024


def _zip(
    entries: Sequence[tuple[zipfile.ZipInfo | str, bytes]], compression: int = zipfile.ZIP_DEFLATED
) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=compression) as z:
        for info, data in entries:
            z.writestr(info, data)
    return out.getvalue()


def _symlink(name: str, target: bytes) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # unix
    info.external_attr = (0o120777 << 16) | 0  # S_IFLNK | rwx
    return info, target


def _lying_size(label: str, image: bytes) -> bytes:
    """An entry whose headers announce fewer bytes than its data holds (the central directory and the local
    header both patched): read to its end, it would be more than announced."""
    data = _zip([(f"{label}/big.png", image + b"\x00" * 50_000)])
    real = len(image) + 50_000
    small = struct.pack("<I", 100)
    # local header: uncompressed size at offset 22; central directory entry: at offset 24 from its signature
    patched = bytearray(data)
    patched[22:26] = small
    central = data.rindex(b"PK\x01\x02")
    patched[central + 24 : central + 28] = small
    assert struct.unpack("<I", data[22:26])[0] == real
    return bytes(patched)


def _encrypted(label: str, image: bytes) -> bytes:
    data = bytearray(_zip([(f"{label}/x.png", image)], zipfile.ZIP_STORED))
    data[6] |= 0x1  # general purpose flag bit 0, local header
    central = bytes(data).rindex(b"PK\x01\x02")
    data[central + 8] |= 0x1  # and in the central directory
    return bytes(data)


def hostile_archives(image: bytes, label: str) -> Iterator[ArchiveCase]:
    """Archives a server must refuse with a 4xx naming the problem; ``image`` is a valid image and ``label``
    one of the task's labels (so each case fails for its own reason only)."""
    ok = f"{label}/ok.png"
    for name in ["../evil.png", f"{label}/../../evil.png", "/etc/evil.png", f"/{label}/x.png", "C:/x.png"]:
        yield ArchiveCase(f"traversal-{name!r}", _zip([(ok, image), (name, image)]), 422, "unsafe_archive")
    yield ArchiveCase("backslash", _zip([(ok, image), (f"..\\{label}\\x.png", image)]), 422, "unsafe_archive")
    yield ArchiveCase(
        "symlink", _zip([(ok, image), _symlink(f"{label}/passwd.png", b"/etc/passwd")]), 422, "unsafe_archive"
    )
    yield ArchiveCase("encrypted", _encrypted(label, image), 422, "unsafe_archive")
    bomb = b"\x00" * (8 * 1024 * 1024)
    yield ArchiveCase(
        "bomb-ratio", _zip([(ok, image), (f"{label}/bomb.png", bomb)]), 413, "archive_too_large"
    )
    noise = random.Random(7).randbytes(256 * 1024)
    many = [(f"{label}/n{i}.png", noise[i:] + noise[:i]) for i in range(10)]  # 2.5 MiB that do not compress
    yield ArchiveCase("bomb-total", _zip(many), 413, "archive_too_large")
    yield ArchiveCase("lying-size", _lying_size(label, image), 422, "bad_archive")
    yield ArchiveCase("not-a-zip", image, 422, "bad_archive")
    yield ArchiveCase("empty-zip", _zip([]), 422, "bad_archive")
    yield ArchiveCase("flat", _zip([("x.png", image)]), 422, "bad_archive")
    yield ArchiveCase(
        "too-deep", _zip([(f"a/b/{label}/x.png", image), (f"c/{label}/y.png", image)]), 422, "bad_archive"
    )
    yield ArchiveCase("truncated", _zip([(ok, image)])[:-30], 422, "bad_archive")
    yield ArchiveCase("unknown-label", _zip([(ok, image), ("zebra/x.png", image)]), 422, "unknown_label")
    yield ArchiveCase(
        "undecodable-image", _zip([(ok, image), (f"{label}/bad.png", b"not an image")]), 400, "bad_image"
    )


# ------------------------------------------------------------------------- version lifecycle requests
@dataclass(frozen=True)
class LifecycleCase:
    """A hostile request on the version routes of an existing task ``task`` that keeps versions 1 and 2
    only (2 current) and the admin ``token``: the status and code a correct server answers, changing
    nothing. ``{task}`` and ``{gone}`` (a deleted task) are filled in by the test."""

    name: str
    method: str
    path: str
    params: dict[str, str]
    admin: bool
    status: int
    code: str
    headers: tuple[tuple[str, str], ...] = ()


def hostile_lifecycle() -> Iterator[LifecycleCase]:
    promote = "/tasks/{task}/versions/{v}/promote"
    for v in ("3", "99", str(2**53)):
        yield LifecycleCase(
            f"promote-missing-{v}", "POST", promote.replace("{v}", v), {}, True, 404, "version_not_found"
        )
        yield LifecycleCase(
            f"get-missing-{v}", "GET", f"/tasks/{{task}}/versions/{v}", {}, False, 404, "version_not_found"
        )
    for v in ("0", "-1", "x", "1.5", str(2**53 + 1), "1e3"):
        yield LifecycleCase(
            f"promote-bad-version-{v}", "POST", promote.replace("{v}", v), {}, True, 422, "invalid_parameter"
        )
        yield LifecycleCase(
            f"get-bad-version-{v}",
            "GET",
            f"/tasks/{{task}}/versions/{v}",
            {},
            False,
            422,
            "invalid_parameter",
        )
    gates = [
        {"min_accuracy": "1.01"},
        {"min_accuracy": "-0.5"},
        {"min_accuracy": "nan"},
        {"min_accuracy": "inf"},
        {"min_agreement": "2"},
        {"min_agreement": "yes"},
        {"min_images": "0"},
        {"min_images": "-3"},
        {"min_images": "2.5"},
        {"min_images": str(10**12)},
    ]
    for gate in gates:
        key, value = next(iter(gate.items()))
        yield LifecycleCase(
            f"gate-{key}-{value}", "POST", promote.replace("{v}", "1"), gate, True, 422, "invalid_parameter"
        )
    yield LifecycleCase(
        "gate-missing-accuracy",
        "POST",
        promote.replace("{v}", "1"),
        {"min_accuracy": "0.5"},
        True,
        409,
        "gate_metric_missing",
    )
    yield LifecycleCase(
        "gate-missing-agreement",
        "POST",
        promote.replace("{v}", "1"),
        {"min_agreement": "0.1"},
        True,
        409,
        "gate_metric_missing",
    )
    yield LifecycleCase(
        "promote-deleted-task", "POST", "/tasks/{gone}/versions/1/promote", {}, True, 404, "task_not_found"
    )
    yield LifecycleCase(
        "versions-deleted-task", "GET", "/tasks/{gone}/versions", {}, False, 404, "task_not_found"
    )
    yield LifecycleCase(
        "promote-bad-name", "POST", "/tasks/..%2Fx/versions/1/promote", {}, True, 404, "not_found"
    )
    yield LifecycleCase(
        "promote-upper-name", "POST", "/tasks/ABC/versions/1/promote", {}, True, 422, "invalid_task_name"
    )
    yield LifecycleCase(
        "promote-no-token", "POST", promote.replace("{v}", "1"), {}, False, 401, "missing_token"
    )
    predict = "/tasks/{task}/predict"
    yield LifecycleCase(
        "predict-version-no-token", "POST", predict, {"version": "1"}, False, 401, "missing_token"
    )
    yield LifecycleCase(
        "predict-version-header-no-token",
        "POST",
        predict,
        {},
        False,
        401,
        "missing_token",
        (("X-SSF-Version", "1"),),
    )
    yield LifecycleCase(
        "predict-version-kept-not-resident", "POST", predict, {"version": "1"}, True, 404, "version_not_found"
    )
    yield LifecycleCase(
        "predict-version-0", "POST", predict, {"version": "0"}, True, 422, "invalid_parameter"
    )
    for bad in ("x", "-1", "", "1 2", "0"):
        yield LifecycleCase(
            f"predict-header-{bad!r}",
            "POST",
            predict,
            {},
            True,
            422,
            "invalid_parameter",
            (("X-SSF-Version", bad),),
        )
    yield LifecycleCase(
        "predict-header-disagrees",
        "POST",
        predict,
        {"version": "2"},
        True,
        422,
        "invalid_parameter",
        (("X-SSF-Version", "1"),),
    )
    yield LifecycleCase("audit-no-token", "GET", "/audit", {}, False, 401, "missing_token")
    for params in ({"limit": "0"}, {"limit": "10001"}, {"limit": "x"}, {"task": "../etc"}, {"task": "A"}):
        yield LifecycleCase(f"audit-{params}", "GET", "/audit", params, True, 422, "invalid_parameter")
