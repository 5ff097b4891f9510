"""Disks a test can fill or make read-only: a small tmpfs of its own (needs root; CI runs as root)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def cannot_mount() -> str | None:
    """None when this process may mount a tmpfs, else why not."""
    if os.geteuid() != 0:
        return "mounting a small tmpfs needs root (CI runs as root)"
    if shutil.which("mount") is None:
        return "no mount command"
    return None


needs_mount = pytest.mark.skipif(cannot_mount() is not None, reason=str(cannot_mount()))


@contextmanager
def tmpfs_at(mount_point: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` ("32m") mounted at `mount_point` (made if missing) for the block; skips the test when
    it cannot be mounted; unmounted (lazily) after."""
    mount_point.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def fill(folder: Path) -> Path:
    """Write a filler file until the file system is full (ENOSPC), down to the last byte; returns it."""
    filler = folder / "filler.bin"
    with filler.open("wb", buffering=0) as f:  # unbuffered: nothing left to flush (and fail) at close
        for size in (65536, 4096, 512, 1):
            try:
                while f.write(b"\0" * size):
                    pass
            except OSError:
                pass
    return filler
