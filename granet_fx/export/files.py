"""Writing files so that an existing file is replaced whole or not at all."""

from __future__ import annotations

import os
import tempfile


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary file next to ``path``, then rename it to ``path``.

    A failure leaves ``path`` as it was and no temporary file behind. The new
    file gets the mode an ordinary ``open(path, "wb")`` would give it.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _new_file_mode(path))
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def check_writable(path: str | os.PathLike) -> str | None:
    """None when a file can be written at ``path`` (checked by creating a temporary file beside it), else why not."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return f"{path} is a folder"
    if not os.path.exists(folder):
        return f"the folder {os.path.dirname(path) or '.'} does not exist"
    if not os.path.isdir(folder):
        return f"{os.path.dirname(path)} is not a folder"
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    except OSError as e:
        return f"cannot write to the folder {os.path.dirname(path) or '.'}: {e.strerror}"
    os.close(fd)
    os.unlink(tmp)
    return None


def _new_file_mode(path: str) -> int:
    try:
        return os.stat(path).st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask
