"""Extracting an uploaded archive without trusting it: paths, member kinds, counts and sizes checked.

Only regular files and folders are written, each under the destination and never over an existing
file; sizes are counted as bytes arrive, since archive headers can lie.
"""

from __future__ import annotations

import re
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path, PurePosixPath
from typing import IO

from rcekd.checkpoint import MANIFEST, CheckpointError


def is_zip(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) in (b"PK\x03\x04", b"PK\x05\x06")


# ------------------------------------------------------------------------------------ weights
def _artifact_root(dest: Path) -> Path:
    if (dest / MANIFEST).is_file():  # files at the archive's root, or in one top folder
        return dest
    entries = [p for p in dest.iterdir() if p.name != "__MACOSX"]
    if len(entries) == 1 and entries[0].is_dir() and (entries[0] / MANIFEST).is_file():
        return entries[0]
    raise CheckpointError(f"the archive has no {MANIFEST} at its root or in its one top folder")


def check_zip_limits(path: Path, max_bytes: int, max_members: int) -> None:
    """Refuse zip bombs from the central directory, before anything is read or expanded."""
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
    if len(infos) > max_members:
        raise CheckpointError(f"{path.name} has {len(infos)} members, more than the {max_members} allowed")
    if (total := sum(info.file_size for info in infos)) > max_bytes:
        raise CheckpointError(f"{path.name} expands to {total} bytes, more than the {max_bytes} allowed")


def _entries(path: Path, zipped: bool) -> Iterator[tuple[str, str, int, Callable[[], IO[bytes] | None]]]:
    """(name, 'dir' | 'file' | 'other', declared size, opener) per member, zip and tar alike, streamed."""
    if zipped:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                plain = stat.S_IFMT(info.external_attr >> 16) in (0, stat.S_IFREG, stat.S_IFDIR)
                what = "other" if not plain or info.flag_bits & 0x1 else "dir" if info.is_dir() else "file"
                yield info.filename, what, info.file_size, partial(archive.open, info)
    else:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                what = "dir" if member.isdir() else "file" if member.isfile() else "other"
                yield member.name, what, member.size, partial(archive.extractfile, member)


def extract_archive(path: Path, dest: Path, max_bytes: int, max_members: int) -> Path:
    """The artifact folder, after writing regular files and folders only, under ``dest`` only, within limits."""
    if zipped := is_zip(path):
        check_zip_limits(path, max_bytes, max_members)
    written = 0
    try:
        for count, (name, what, size, opener) in enumerate(_entries(path, zipped), 1):
            if count > max_members:
                raise CheckpointError(f"{path.name} has more than the {max_members} members allowed")
            target = _member_path(dest, name)
            if what == "other":
                raise CheckpointError(f"archive member {name!r}: links, special files and encryption are refused")
            if what == "dir" or target is None:
                (target or dest).mkdir(parents=True, exist_ok=True)
                continue
            if written + size > max_bytes:  # the declared size; _copy also counts the real bytes
                raise CheckpointError(f"{path.name} expands beyond the {max_bytes} bytes allowed")
            with opener() as source:  # type: ignore[union-attr]  # regular members always have data
                written += _copy(source, target, max_bytes - written, name)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, zlib.error) as exc:
        raise CheckpointError(f"{path.name}: a damaged archive ({exc})") from exc
    return _artifact_root(dest)


def _member_path(dest: Path, name: str) -> Path | None:
    """Where a member goes under ``dest``; None for the root itself. Refuses absolute paths and '..'."""
    if "\x00" in name or "\\" in name or name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise CheckpointError(f"archive member {name!r}: absolute or non-POSIX path refused")
    parts = [part for part in PurePosixPath(name).parts if part != "."]
    if ".." in parts:
        raise CheckpointError(f"archive member {name!r}: '..' in its path refused")
    return dest.joinpath(*parts) if parts else None


def _copy(source: IO[bytes], target: Path, budget: int, name: str) -> int:
    """Copy into a new file (never over one), counting bytes: sizes in headers can lie."""
    written = 0
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "xb") as out:
            while block := source.read(1 << 20):
                written += len(block)
                if written > budget:
                    raise CheckpointError(f"archive expands beyond the size allowed (at member {name!r})")
                out.write(block)
    except FileExistsError as exc:
        raise CheckpointError(f"archive member {name!r} appears twice") from exc
    except OSError as exc:  # e.g. a file and a folder of the same name
        raise CheckpointError(f"archive member {name!r} cannot be written: {exc}") from exc
    return written
