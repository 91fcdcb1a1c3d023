"""Reading a zip file as plain data: every entry checked on the bytes before anything else parses it.

``torch.export.load`` and ``torch.load`` read zip files with their own C++
reader, which may see different bytes than Python's ``zipfile`` in a crafted
file (two entries of one name, entries that overlap). ``read_entries`` accepts
only the kind of zip that ``torch.save`` and ``gf.save`` write (stored
entries, unique safe names, laid out one after the other) and returns the
entries' bytes; callers that hand a zip to torch rebuild it from those bytes
with ``write_entries``, so torch parses exactly what was checked.
"""

from __future__ import annotations

import io
import stat
import struct
import zipfile


class ZipProblem(ValueError):
    """The zip file breaks a rule of ``read_entries``; the message says which (without the file's name)."""


_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")   # signature ... file name length, extra field length


def read_entries(data: bytes, *, max_entries: int = 100_000) -> dict[str, bytes]:
    """The entries of the zip file ``data`` by name, in file order; ``ZipProblem`` for anything unusual.

    Refused: not a zip, duplicate names, absolute or ``..`` names, folders,
    links, encrypted or compressed entries, entries that overlap or reach past
    the end of the file, a local header that disagrees with the directory, and
    a wrong CRC.
    """
    try:
        z = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        raise ZipProblem("not a complete zip file (truncated, or another kind of file)") from None
    with z:
        infos = z.infolist()
        if len(infos) > max_entries:
            raise ZipProblem(f"holds {len(infos):,} entries (at most {max_entries:,} expected)")
        names = [i.filename for i in infos]
        if len(set(names)) != len(names):
            twice = next(n for n in names if names.count(n) > 1)
            raise ZipProblem(f"holds two entries named {twice!r}")
        spans = []
        for info in infos:
            _check_info(info)
            spans.append((_span(data, info), info.filename))
        spans.sort()
        for (a, name_a), (b, name_b) in zip(spans, spans[1:]):
            if b[0] < a[1]:
                raise ZipProblem(f"entries {name_a!r} and {name_b!r} overlap")
        entries = {}
        for info in infos:
            try:
                entries[info.filename] = z.read(info)
            except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as e:
                raise ZipProblem(f"entry {info.filename!r} is damaged ({e})") from None
            if len(entries[info.filename]) != info.file_size:
                raise ZipProblem(f"entry {info.filename!r} is not the size its directory says")
    return entries


def write_entries(entries: dict[str, bytes]) -> bytes:
    """A zip file of ``entries`` (stored, in order), the kind ``read_entries`` accepts."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for name, value in entries.items():
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            z.writestr(info, value)
    return out.getvalue()


def _check_info(info: zipfile.ZipInfo) -> None:
    name = info.filename
    parts = name.split("/")
    if (not name or name.startswith("/") or "\\" in name or "\x00" in name or ":" in parts[0]
            or any(p in ("", ".", "..") for p in parts)):
        raise ZipProblem(f"holds an entry with an unsafe name {name!r}")
    mode = info.external_attr >> 16
    if info.is_dir() or stat.S_IFMT(mode) not in (0, stat.S_IFREG):
        raise ZipProblem(f"entry {name!r} is not a plain file (a folder or a link)")
    if info.flag_bits & 0x1:
        raise ZipProblem(f"entry {name!r} is encrypted")
    if info.compress_type != zipfile.ZIP_STORED:
        raise ZipProblem(f"entry {name!r} is compressed (method {info.compress_type}); only stored entries are read")
    if info.compress_size != info.file_size:
        raise ZipProblem(f"entry {name!r} is stored but its sizes differ")


def _span(data: bytes, info: zipfile.ZipInfo) -> tuple[int, int]:
    """The bytes ``info``'s local header and data occupy in ``data``."""
    start = info.header_offset
    if start < 0 or start + _LOCAL_HEADER.size > len(data):
        raise ZipProblem(f"entry {info.filename!r} starts outside the file")
    header = _LOCAL_HEADER.unpack_from(data, start)
    if header[0] != b"PK\x03\x04":
        raise ZipProblem(f"entry {info.filename!r} has no local header where its directory points")
    name_length, extra_length = header[9], header[10]
    name = data[start + _LOCAL_HEADER.size: start + _LOCAL_HEADER.size + name_length]
    if name.decode("utf-8", "replace") != info.filename and name.decode("cp437", "replace") != info.filename:
        raise ZipProblem(f"entry {info.filename!r} has another name in its local header")
    end = start + _LOCAL_HEADER.size + name_length + extra_length + info.compress_size
    if info.flag_bits & 0x8:   # a data descriptor follows: CRC and sizes, with or without its signature
        wide = info.file_size >= 0xFFFFFFFF or info.compress_size >= 0xFFFFFFFF
        end += (8 if data[end:end + 4] == b"PK\x07\x08" else 4) + (16 if wide else 8)
    if end > len(data):
        raise ZipProblem(f"entry {info.filename!r} reaches past the end of the file")
    return start, end
