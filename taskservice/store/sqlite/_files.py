"""Whether a path can hold the SQLite database: `unusable_reason` tells,
before a server starts, why not (a directory, a read-only file system, a
place where no file can be created), so that the entry point stops at once
saying so."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path

_VIRTUAL_FILE_SYSTEMS = ("proc", "sysfs", "devtmpfs", "cgroup", "cgroup2", "debugfs", "securityfs")


def _file_system_of(path: Path) -> tuple[str, bool]:
    """The type of the file system that holds path, and whether it is
    mounted read-only (from /proc/self/mounts; ("", False) where unknown)."""
    best, found = "", ("", False)
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return found
    target = str(path.resolve())
    for line in mounts:
        fields = line.split()
        if len(fields) < 4:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, found = point, (fields[2], "ro" in fields[3].split(","))
    return found


def _existing_ancestor(path: Path) -> Path:
    current = path
    while not current.exists() and current != current.parent:
        current = current.parent
    return current


def unusable_reason(path: str | Path) -> str | None:
    """Why the SQLite database cannot live at path, in a few words; None when
    it can (the file, and its directory, are created when missing; a write
    transaction is begun and rolled back to prove the file writable)."""
    file = Path(path)
    if file.is_dir():
        return "is a directory, not a file"
    ancestor = _existing_ancestor(file.parent)
    if not ancestor.is_dir():
        return f"cannot be created: {ancestor} is a file, not a directory"
    fs_type, read_only = _file_system_of(ancestor)
    if read_only:
        return f"is on a read-only file system ({fs_type})"
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        existed = file.exists()
        os.close(os.open(file, os.O_RDWR | os.O_CREAT, 0o644))
    except OSError as err:
        where = f" on a {fs_type} file system" if fs_type in _VIRTUAL_FILE_SYSTEMS else ""
        return f"cannot be created{where} ({err.strerror or err})"
    try:
        conn = sqlite3.connect(file, isolation_level=None, timeout=10)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
        finally:
            conn.close()
    except sqlite3.Error as err:
        if not existed:
            with contextlib.suppress(OSError):
                if file.stat().st_size == 0:
                    file.unlink()
        return f"cannot be used as a SQLite database ({err})"
    return None
