"""Files as data: written so that an existing file is replaced whole or not at all, read within a size limit."""

from __future__ import annotations

import os
import re
import stat
import tempfile
from pathlib import Path


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary file next to ``path``, then rename it to ``path``.

    A failure leaves ``path`` as it was and no temporary file behind; the
    temporary file of a writer that was killed is removed by the next write
    to ``path`` (``remove_stale_temporaries``). The new file gets the mode an
    ordinary ``open(path, "wb")`` would give it.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.{os.getpid()}.", suffix=".tmp")
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


def remove_stale_temporaries(path: str | os.PathLike) -> list[str]:
    """Remove the temporary files of ``path`` left by writers that no longer run; returns their names.

    A writer names its temporary file ``.NAME.PID.RANDOM.tmp``; one whose
    process is gone (killed while writing) is removed. Files of a live writer
    are kept.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    pattern = re.compile(re.escape(f".{os.path.basename(path)}.") + r"(\d+)\.[\w-]+\.tmp")
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for entry in names:
        match = pattern.fullmatch(entry)
        if match and not _alive(int(match.group(1))):
            try:
                os.unlink(os.path.join(folder, entry))
                removed.append(entry)
            except OSError:
                pass
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True     # another user's process (or an impossible id): leave its file alone
    return True


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


MAX_FILE_BYTES = int(os.environ.get("GRANET_FX_MAX_FILE_BYTES", 4 << 30))


class FileReadError(ValueError):
    """A file that cannot be read whole as data; the message names it and says why."""


def read_bounded(path: str | os.PathLike, *, limit: int = MAX_FILE_BYTES, what: str = "file") -> bytes:
    """The bytes of the regular file ``path``, refused by its type and size before reading.

    A special file (``/dev/zero``, a pipe), a folder, an empty file or one
    larger than ``limit`` bytes gets a ``FileReadError`` naming the problem,
    so nothing unbounded is ever read into memory.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise FileReadError(f"{path}: no such file") from None
    except OSError as e:
        raise FileReadError(f"cannot read {path}: {e.strerror}") from None
    if stat.S_ISDIR(info.st_mode):
        raise FileReadError(f"{path} is a folder, not a file")
    if not stat.S_ISREG(info.st_mode):
        raise FileReadError(f"{path} is not a regular file (a device, pipe or socket); refusing to read it")
    if info.st_size == 0:
        raise FileReadError(f"{path} is empty")
    if info.st_size > limit:
        raise FileReadError(f"{path} is {info.st_size:,} bytes, more than the {limit:,} a {what} may have "
                            "(set GRANET_FX_MAX_FILE_BYTES to allow more)")
    try:
        with open(path, "rb") as f:
            data = f.read(min(limit, info.st_size) + 1)   # Python allocates what read() is asked for
    except OSError as e:
        raise FileReadError(f"cannot read {path}: {e.strerror}") from None
    if len(data) > min(limit, info.st_size):
        raise FileReadError(f"{path} grew while it was read")
    if not data:
        raise FileReadError(f"{path} is empty")
    return data


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether the paths name one existing file (an output that would overwrite its own input)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def cache_dir() -> Path:
    """Where granet_fx keeps what it measures or builds on this machine: ``$GRANET_FX_CACHE``, else
    ``~/.cache/granet_fx``."""
    return Path(os.environ.get("GRANET_FX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "granet_fx"))
