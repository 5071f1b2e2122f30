"""Labelled images from a zip archive in the ImageFolder layout (``<class>/<image>``), unpacked safely.

Nothing is written to disk: entries are read into memory, each bounded. Refused, with a 4xx that names
the entry: names that are absolute, hold ``..``, backslashes or drive letters (path traversal), symlinks,
encrypted entries, more files than an evaluation takes, and zip bombs: a total uncompressed size over
the limit or an entry whose compression ratio is over the limit, checked from the headers first and
again while reading (a header can lie about the size it announces).

One top-level folder around the class folders (``dataset/<class>/<image>``, what zipping a folder
gives) is accepted; ``__MACOSX/`` and hidden files (``.DS_Store``) are skipped.
"""

from __future__ import annotations

import io
import stat
import zipfile
from dataclasses import dataclass

from service.api.errors import ApiError

_CHUNK = 64 * 1024


@dataclass(frozen=True)
class ArchiveLimits:
    max_files: int
    max_file_bytes: int
    max_unpacked_bytes: int
    max_ratio: float


@dataclass(frozen=True)
class LabelledImages:
    images: list[bytes]
    labels: list[str]
    names: list[str]  # where each image came from (an archive path, or "image <i>")


def _unsafe(message: str) -> ApiError:
    return ApiError(422, "unsafe_archive", message)


def _bomb(message: str) -> ApiError:
    return ApiError(413, "archive_too_large", message)


def _check_name(name: str) -> list[str]:
    """The entry's path parts, or a refusal naming it."""
    shown = repr(name[:120])
    if "\\" in name or "\x00" in name:
        raise _unsafe(f"archive entry {shown} has a backslash or NUL in its name")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise _unsafe(f"archive entry {shown} has an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise _unsafe(f"archive entry {shown} climbs out of the archive with '..'")
    return parts


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    return info.create_system == 3 and stat.S_ISLNK(info.external_attr >> 16)


def _skipped(parts: list[str]) -> bool:
    return parts[0] == "__MACOSX" or parts[-1].startswith(".")


def _files(zf: zipfile.ZipFile, limits: ArchiveLimits) -> list[tuple[zipfile.ZipInfo, list[str]]]:
    """Every file entry to read, checked from the central directory's headers alone."""
    infos = zf.infolist()
    if len(infos) > 2 * limits.max_files + 64:
        raise _bomb(f"the archive has {len(infos)} entries; an evaluation takes at most {limits.max_files}")
    out: list[tuple[zipfile.ZipInfo, list[str]]] = []
    total = 0
    for info in infos:
        parts = _check_name(info.filename)
        if _is_symlink(info):
            raise _unsafe(f"archive entry {info.filename[:120]!r} is a symbolic link")
        if info.flag_bits & 0x1:
            raise _unsafe(f"archive entry {info.filename[:120]!r} is encrypted")
        if info.is_dir() or not parts or _skipped(parts):
            continue
        if info.file_size > limits.max_file_bytes:
            raise _bomb(
                f"archive entry {info.filename[:120]!r} is {info.file_size} bytes; "
                f"the limit per image is {limits.max_file_bytes}"
            )
        ratio = info.file_size / max(info.compress_size, 1)
        if ratio > limits.max_ratio:
            raise _bomb(
                f"archive entry {info.filename[:120]!r} expands {ratio:.0f} times; "
                f"the limit is {limits.max_ratio:g} (a zip bomb?)"
            )
        total += info.file_size
        if total > limits.max_unpacked_bytes:
            raise _bomb(f"the archive unpacks to more than {limits.max_unpacked_bytes} bytes")
        out.append((info, parts))
    if len(out) > limits.max_files:
        raise _bomb(f"the archive holds {len(out)} images; an evaluation takes at most {limits.max_files}")
    if not out:
        raise ApiError(422, "bad_archive", "the archive holds no images: put them in <class>/<image> folders")
    return out


def _layout(files: list[tuple[zipfile.ZipInfo, list[str]]]) -> list[list[str]]:
    """Strip one folder around the class folders; then every file must be exactly ``<class>/<image>``."""
    paths = [parts for _, parts in files]
    tops = {p[0] for p in paths}
    if len(tops) == 1 and all(len(p) == 3 for p in paths):
        paths = [p[1:] for p in paths]
    for (info, _), p in zip(files, paths, strict=True):
        if len(p) != 2:
            raise ApiError(
                422,
                "bad_archive",
                f"archive entry {info.filename[:120]!r} is not in the ImageFolder layout <class>/<image>",
            )
    return paths


def _read(zf: zipfile.ZipFile, info: zipfile.ZipInfo, unpacked: int, limits: ArchiveLimits) -> bytes:
    """The entry's bytes, never more than its header announced (nor over the limits) while reading."""
    allowed = min(info.file_size, limits.max_file_bytes, limits.max_unpacked_bytes - unpacked)
    buf = bytearray()
    try:
        with zf.open(info) as f:
            while True:
                chunk = f.read(_CHUNK)
                if not chunk:
                    break
                buf += chunk
                if len(buf) > allowed:
                    raise _bomb(
                        f"archive entry {info.filename[:120]!r} unpacks to more than the "
                        f"{info.file_size} bytes its header announces"
                    )
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, OSError) as e:
        raise ApiError(
            422, "bad_archive", f"archive entry {info.filename[:120]!r} cannot be read: {str(e)[:200]}"
        ) from None
    return bytes(buf)


def unpack(data: bytes, limits: ArchiveLimits) -> LabelledImages:
    """The images of an ImageFolder zip and their labels (the class folder names), in archive order."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as e:
        raise ApiError(422, "bad_archive", f"the 'archive' field is not a zip file: {str(e)[:200]}") from None
    with zf:
        files = _files(zf, limits)
        paths = _layout(files)
        images: list[bytes] = []
        unpacked = 0
        for info, _ in files:
            images.append(_read(zf, info, unpacked, limits))
            unpacked += len(images[-1])
    return LabelledImages(images, [p[0] for p in paths], ["/".join(p) for p in paths])
