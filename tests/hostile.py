"""Hostile variants of every file granet_fx reads, and a runner that feeds them to the five readers.

Readers: ``gf.load`` (archives), ``granet-export`` (archives and torch.save
state dicts), ``granet-bench`` (ONNX files), ``gf.load_checkpoint``
(checkpoints) and ``granet-report`` (run and sweep JSON). The variants are
built from real files made here (a small model saved with ``gf.save`` and
exported with ``granet-export``, a checkpoint from ``gf.save_checkpoint``, a
run from ``gf.RunRecorder``): duplicate and overlapping zip entries, deflate
bombs, pickles under every entry name, ``sympy`` payloads, schema violations,
byte flips and truncations at many offsets, special and huge files, outputs
that are the input.

Each variant runs through the library in a worker process (an error of the
reader's own ``ValueError`` subclass naming the file, or for the commands'
``main`` exit code 2 with one stderr line; never any other exception) and
through its command: ``main()`` as the console script calls it, in a child
forked from a process that imported the tools once (1,000 runs would spend
an hour importing torch), and for a sample as the installed console script in
a real subprocess. Expected: exit code 2, one error line, no traceback; all
within a time limit and a 3 GiB address-space limit; afterwards no marker
file exists (no code from the file ran), every file in the case's folder is
as before and no temporary file is left. Kind "either": the variant may also
be accepted (a flipped byte in padding), but then what was loaded must equal
the original exactly; kind "any": a changed file that may be valid (another
model, another run), accepted or refused.

    python tests/hostile.py worker WORKDIR      (the library side; used by run_cases)
    python tests/hostile.py zygote WORKDIR      (the command side; used by run_cases)
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import pickle
import queue
import random
import resource
import stat
import struct
import subprocess
import sys
import threading
import time
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable

TESTS = Path(__file__).resolve().parent
MEMORY_LIMIT = 3 << 30          # address space of every process that reads a hostile file
CASE_SECONDS = 120              # wall time of one case (one reader, one file), whatever happens
FILE_LIMIT = str(1 << 30)       # GRANET_FX_MAX_FILE_BYTES for the readers (see ENV)
# The readers run with a 1 GiB file limit so that the 3 GiB memory limit leaves room for torch itself.
ENV = {"GRANET_FX_MAX_FILE_BYTES": FILE_LIMIT, "PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1",
       "PYTHONWARNINGS": "ignore"}
BOMB_BYTES = 1536 << 20         # what a deflate bomb inflates to (1.5 GiB)
COMMANDS = {"archive": "granet-export", "export": "granet-export", "bench": "granet-bench", "report": "granet-report"}
ERROR_PREFIX = {"granet-export": "granet-export: error: ", "granet-bench": "granet-bench: error: ",
                "granet-report": "granet-report: error: "}


@dataclasses.dataclass
class Case:
    """One hostile file (with its folder) and the reader it is fed to."""

    id: str                      # unique; also the folder's name
    reader: str                  # archive (gf.load and granet-export) | export | bench | checkpoint | report
    what: str                    # how the file was made (the recipe, for the report)
    files: dict                  # name -> bytes, or ("sparse", size) / ("link", target) / ("folder",)
    input: str                   # the file given to the reader: a name in ``files`` or an absolute path
    kind: str = "refuse"         # refuse: must be refused; either: refused, or read exactly as the original;
                                 # any: refused, or read (a changed file that may be valid: another model)
    args: list = dataclasses.field(default_factory=list)   # more command-line arguments
    output: str | None = None    # the output the command is given (None: the reader's default below)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["files"] = {k: v if isinstance(v, tuple) else None for k, v in self.files.items()}
        return d


# Payloads -------------------------------------------------------------------------


class Touch:
    """Unpickling this runs ``touch MARKER``: the proof that code from a file ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (self.marker,)


# The shell command every payload runs: it creates the file that $HOSTILE_MARKER names (set per case and side).
MARKER_COMMAND = 'touch "${HOSTILE_MARKER:-HOSTILE_MARKER}"'


def pickled(marker: str = MARKER_COMMAND, protocol: int = 2) -> bytes:
    return pickle.dumps(Touch(marker), protocol=protocol)


def sympy_payloads(marker: str = MARKER_COMMAND) -> list[str]:
    """``expr_str`` values that run the marker command if anything evaluates them."""
    cmd = marker
    return [
        f"(__import__('os').system('{cmd}')*0 + Symbol('s77', positive=True, integer=True))",
        f"Symbol('s77', positive=True, integer=True) + __import__('os').system('{cmd}')*0",
        f"Symbol('s77', positive=True, integer=True) + eval(\"__import__('os').system('{cmd}')\")*0",
        f"Symbol('s77', positive=True, integer=True) + exec(\"import os; os.system('{cmd}')\")",
        f"(lambda: __import__('os').system('{cmd}'))() * 0 + Symbol('s77', positive=True, integer=True)",
        f"Symbol('s77', positive=True, integer=True) * getattr(__builtins__, 'eval')"
        f"(\"__import__('os').system('{cmd}')\")",
        f"Symbol('s77', positive=True, integer=True).__class__.__init__.__globals__['__builtins__']"
        f"['__import__']('os').system('{cmd}')",
        f"Symbol(__import__('os').system('{cmd}') or 's77', positive=True, integer=True)",
    ]


# Zip files, built byte by byte so that they can be wrong in any way ----------------


@dataclasses.dataclass
class Entry:
    name: str
    data: bytes                        # the bytes in the file (compressed when method is 8)
    method: int = 0
    size: int | None = None            # uncompressed size claimed (default: len(data) when stored)
    crc: int | None = None             # default: the CRC of data (stored) or given
    mode: int = stat.S_IFREG | 0o644
    flags: int = 0


def raw_zip(entries: list[Entry], central: list[tuple[int, str | None]] | None = None,
            prefix: bytes = b"", suffix: bytes = b"") -> bytes:
    """A zip of ``entries`` laid out one after the other; ``central`` lists (entry index, name) of the
    directory (default: each entry once, by its own name), so that several can point at one entry."""
    out = bytearray(prefix)
    offsets = []
    for e in entries:
        name = e.name.encode()
        size = len(e.data) if e.size is None else e.size
        crc = zlib.crc32(e.data) if e.crc is None else e.crc
        offsets.append(len(out))
        out += struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, e.flags, e.method, 0, 0x21, crc, len(e.data),
                           size, len(name), 0) + name + e.data
    start = len(out)
    central = [(i, None) for i in range(len(entries))] if central is None else central
    for i, name in central:
        e = entries[i]
        name = (e.name if name is None else name).encode()
        size = len(e.data) if e.size is None else e.size
        crc = zlib.crc32(e.data) if e.crc is None else e.crc
        out += struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 0x031E, 20, e.flags, e.method, 0, 0x21, crc,
                           len(e.data), size, len(name), 0, 0, 0, 0, e.mode << 16, offsets[i]) + name
    out += struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, len(central), len(central), len(out) - start, start, 0)
    return bytes(out + suffix)


def zip_items(data: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return [(i.filename, z.read(i)) for i in z.infolist()]


def stored(items: Iterable[tuple[str, bytes]]) -> bytes:
    return raw_zip([Entry(n, d) for n, d in items])


_BOMB: dict[int, tuple[bytes, int]] = {}


def bomb_stream(size: int = BOMB_BYTES) -> tuple[bytes, int]:
    """A raw deflate stream of ``size`` zero bytes (about 1.5 MB for 1.5 GiB) and its CRC (cached).

    Made from one compressed 16 MiB block repeated: a full flush makes each
    block independent of the data before it.
    """
    if size not in _BOMB:
        chunk = bytes(1 << 24)
        c = zlib.compressobj(9, zlib.DEFLATED, -15)
        first = c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH)
        again = c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH)
        n = size // len(chunk)
        crc = 0
        for _ in range(n):
            crc = zlib.crc32(chunk, crc)
        _BOMB[size] = (first + again * (n - 1) + c.flush(), crc)
    return _BOMB[size]


def deflated(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


def zip_attacks(tag: str, base: bytes, marker: str, names: list[str] | None = None,
                bomb_targets: list[str] = (), unsafe_root: str = "archive",
                strict: bool = True) -> list[tuple[str, str, bytes]]:
    """Structural attacks on the zip ``base``: (kind, description, file bytes).

    ``strict``: the reader promises to refuse every entry it does not write (an
    archive); otherwise harmless extra entries and garbage around the zip may
    be accepted, as long as what is read is the original (kind "either").
    """
    junk = "refuse" if strict else "either"
    items = zip_items(base)
    all_names = [n for n, _ in items]
    names = all_names if names is None else names
    payload = pickled(marker)
    out = []
    for n in names:
        i = all_names.index(n)
        clean = items[i]
        out.append((f"{tag}: duplicate entry {n}, pickled payload first, clean copy last",
                    stored(items[:i] + [(n, payload)] + items[i:])))
        out.append((f"{tag}: duplicate entry {n}, clean copy first, pickled payload last",
                    stored(items + [(n, payload)])))
        out.append((f"{tag}: entry {n} replaced by a pickle that runs code",
                    stored(items[:i] + [(n, payload)] + items[i + 1:])))
        out.append((f"{tag}: entry {n} deflated",
                    raw_zip([Entry(m, deflated(d), 8, len(d), zlib.crc32(d)) if m == n else Entry(m, d)
                             for m, d in items])))
    for n in bomb_targets:
        stream, crc = bomb_stream()
        out.append((f"{tag}: entry {n} is a deflate bomb ({BOMB_BYTES:,} bytes of zeros in {len(stream):,})",
                    raw_zip([Entry(m, stream, 8, BOMB_BYTES, crc) if m == n else Entry(m, d) for m, d in items])))
        small = deflated(b"\x00" * 1000)
        out.append((f"{tag}: entry {n} is a small deflated stream claiming {BOMB_BYTES:,} bytes",
                    raw_zip([Entry(m, small, 8, BOMB_BYTES, 0) if m == n else Entry(m, d) for m, d in items])))
    # Many directory entries pointing at one deflated stream (a 1.6 MB file that inflates to 150 GiB).
    stream, crc = bomb_stream()
    bomb_entries = [Entry(n, d) for n, d in items] + [Entry(names[0] + "_bomb", stream, 8, BOMB_BYTES, crc)]
    last = len(bomb_entries) - 1
    out.append((f"{tag}: 100 directory entries (named like real entries) overlap on one deflate bomb",
                raw_zip(bomb_entries, [(i, None) for i in range(last)] + [(last, f"{all_names[0]}_{k}")
                                                                           for k in range(100)])))
    out.append((f"{tag}: every directory entry points at the first entry's data (overlapping entries)",
                raw_zip([Entry(n, d) for n, d in items], [(0, n) for n in all_names])))
    out.append((f"{tag}: the directory lists the first entry twice under two names",
                raw_zip([Entry(n, d) for n, d in items], [(i, None) for i in range(len(items))]
                        + [(0, all_names[0] + "2")])))
    out.append((f"{tag}: every entry deflated",
                raw_zip([Entry(m, deflated(d), 8, len(d), zlib.crc32(d)) for m, d in items])))
    out.append((f"{tag}: an entry with a wrong CRC",
                raw_zip([Entry(m, d, crc=(zlib.crc32(d) ^ 1) if k == 0 else None) for k, (m, d) in enumerate(items)])))
    out.append((f"{tag}: an encrypted entry",
                raw_zip([Entry(m, d, flags=1 if k == 0 else 0) for k, (m, d) in enumerate(items)])))
    for bad in ("../evil.pkl", "/abs/evil.pkl", f"{unsafe_root}/../../evil.pkl", f"{unsafe_root}/data.pkl",
                f"{unsafe_root}/aotinductor/model/model.so", f"{unsafe_root}\\evil", f"{unsafe_root}/x\x00y",
                f"{unsafe_root}/data/weights/weight_99"):
        out.append((f"{tag}: an extra entry named {bad!r} holding a pickle",
                    stored(items + [(bad, payload)])))
    out.append((f"{tag}: an extra entry that is a symbolic link",
                raw_zip([Entry(n, d) for n, d in items] + [Entry(f"{unsafe_root}/link", b"/etc/passwd",
                                                                   mode=stat.S_IFLNK | 0o777)])))
    out.append((f"{tag}: an extra folder entry", stored(items + [(f"{unsafe_root}/folder/", b"")])))
    out.append((f"{tag}: 65,000 empty entries", stored(items + [(f"{unsafe_root}/e{k}", b"") for k in range(65_000)])))
    out.append((f"{tag}: garbage before the zip", random.Random(2).randbytes(1000) + base))
    out.append((f"{tag}: garbage after the zip", base + random.Random(3).randbytes(1000)))
    # Without the archive's allowlist, torch.load ignores entries it does not read: a pickle there, or an
    # extra entry with a safe name, may be accepted, as long as what is read is the original.
    harmless = ("65,000 empty entries", "weight_99", "aotinductor")
    read = ("data.pkl", "/data/", "byteorder")
    def kind(d: str) -> str:
        if "garbage" in d:
            return "either"
        if any(h in d for h in harmless) or ("replaced by a pickle" in d and not any(r in d for r in read)):
            return junk
        return "refuse"

    return [(kind(d), d, b) for d, b in out]


def flips(tag: str, base: bytes, count: int, seed: int) -> list[tuple[str, bytes]]:
    """``base`` with one byte flipped (xor 0xFF, or a random bit), at offsets spread over the whole file."""
    rng = random.Random(seed)
    offsets = sorted(set(list(range(0, min(64, len(base)))) + [rng.randrange(len(base)) for _ in range(count)]
                         + [len(base) - 1 - k for k in range(22)]))[:count]
    step = max(1, len(offsets) // count)
    out = []
    for k, at in enumerate(offsets[::step]):
        mask = 0xFF if k % 2 == 0 else 1 << rng.randrange(8)
        out.append((f"{tag}: byte {at} of {len(base)} flipped (xor {mask:#04x})",
                    base[:at] + bytes([base[at] ^ mask]) + base[at + 1:]))
    return out


def truncations(tag: str, base: bytes, count: int, seed: int) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)
    cuts = sorted({1, 2, 4, 10, 30, len(base) - 1, len(base) - 22, len(base) // 2}
                  | {rng.randrange(1, len(base)) for _ in range(count)})[:count]
    return [(f"{tag}: truncated to {c} of {len(base)} bytes", base[:c]) for c in cuts]


def deep_json(levels: int = 100_000) -> bytes:
    return b"[" * levels + b"]" * levels


# Special files, shared by all readers ------------------------------------------------


def special_cases(reader: str, name: str, extra_args: list[str]) -> list[Case]:
    specs = [
        ("/dev/zero as the input", {}, "/dev/zero"),
        ("a 10 GiB sparse file", {name: ("sparse", 10 << 30)}, name),
        ("a link to /dev/zero", {name: ("link", "/dev/zero")}, name),
        ("a folder", {name: ("folder",)}, name),
        ("an empty file", {name: b""}, name),
        ("a missing file", {}, name),
        ("random bytes", {name: random.Random(1).randbytes(5000)}, name),
        ("a JSON file", {name: b'{"format": "granet_fx.archive", "version": 2}'}, name),
        ("100,000-deep nested JSON", {name: deep_json()}, name),
        ("a plain pickle that runs code", {name: None}, name),     # filled in by the caller (needs the marker)
    ]
    return [Case("", reader, f"{reader}: {what}", files, path, args=list(extra_args)) for what, files, path in specs]


# The base files ---------------------------------------------------------------------


def small_mlp():
    """The model behind the state-dict base file (``granet-export --model hostile:small_mlp``)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


SD_ARGS = ["--model", "hostile:small_mlp", "--input-shape", "1,6"]


def build_bases(folder: Path) -> dict[str, Path]:
    """The genuine files every variant starts from, written into ``folder``."""
    import torch
    import granet_fx as gf
    from granet_fx import runs
    from granet_fx.export import cli
    from helpers import MLP, SmallCNN, batches, train
    from test_fold import trained

    folder.mkdir(parents=True, exist_ok=True)
    paths = {k: folder / v for k, v in {
        "archive": "model.pt2", "state_dict": "state.pt", "onnx": "model.onnx", "onnx_sparse": "sparse.onnx",
        "onnx_external": "external.onnx", "checkpoint": "ckpt.pt", "run": "run.json", "sweep": "sweep.json"}.items()}
    if all(p.exists() for p in paths.values()):
        return paths
    torch.manual_seed(0)
    model, _ = trained(SmallCNN())
    model.eval()
    gf.save(model, paths["archive"], example_inputs=(torch.randn(1, 1, 12),))
    torch.save(small_mlp().state_dict(), paths["state_dict"])
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert cli.main([str(paths["archive"]), "-o", str(paths["onnx"])]) == 0
        assert cli.main([str(paths["archive"]), "-o", str(paths["onnx_sparse"]), "--sparse-layout", "initializer"]) == 0
    import onnx
    onnx.save(onnx.load(str(paths["onnx"])), str(paths["onnx_external"]), save_as_external_data=True,
              location="external.onnx.data", size_threshold=0)
    config = gf.GraNetConfig(method="granet", final_sparsity=0.7, total_steps=12, update_every=2)
    net = gf.sparsify(MLP(), config)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    granet = gf.GraNet(net, opt)
    recorder = gf.RunRecorder()
    recorder(granet)
    train(net, opt, granet, batches(12, (8, 20), 10), forward=None)
    for _ in range(1):
        recorder(granet)
    gf.save_checkpoint(paths["checkpoint"], net, opt, granet, step=12, note="hostile base")
    run = recorder.run("GraNet", accuracy=0.5)
    runs.save_json(run, paths["run"])
    rows = [{"label": lab, "method": m, "sparsity": s, "seed": seed, "accuracy": 0.8 + 0.01 * seed,
             "training_flops": 0.5, "inference_flops": 1 - s}
            for lab, m, s in (("Dense", "dense", 0.0), ("GraNet", "granet", 0.7)) for seed in range(2)]
    runs.save_json({"format": runs.SWEEP_FORMAT, "version": 1, "title": "hostile base",
                    "results": rows, "summary": runs.summarize(rows), "runs": [run]}, paths["sweep"])
    return paths


def checkpoint_objects():
    """Fresh objects built like the base checkpoint's (for ``load_checkpoint``)."""
    import torch
    import granet_fx as gf
    from helpers import MLP

    torch.manual_seed(1)
    config = gf.GraNetConfig(method="granet", final_sparsity=0.7, total_steps=12, update_every=2)
    net = gf.sparsify(MLP(), config)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    return net, opt, gf.GraNet(net, opt)


# The variants -------------------------------------------------------------------------


def _archive_parts(data: bytes):
    items = zip_items(data)
    root = items[0][0].split("/", 1)[0]
    return items, root


def _rebuild(items, changes: dict[str, Any], root: str, refresh: bool = True) -> bytes:
    """``items`` with entries changed (relative name -> bytes, or None to drop); digests refreshed."""
    out = []
    for n, d in items:
        rel = n[len(root) + 1:]
        if rel in changes:
            if changes[rel] is not None:
                out.append((n, changes[rel]))
        else:
            out.append((n, d))
    for rel, d in changes.items():
        if d is not None and f"{root}/{rel}" not in dict(items):
            out.append((f"{root}/{rel}", d))
    if refresh:
        meta_name = f"{root}/extra/granet_fx.json"
        entries = dict(out)
        try:
            meta = json.loads(entries[meta_name])
        except Exception:
            meta = None
        if isinstance(meta, dict) and isinstance(meta.get("entries"), dict):
            meta["entries"] = {n[len(root) + 1:]: hashlib.sha256(d).hexdigest() for n, d in out if n != meta_name}
            entries[meta_name] = json.dumps(meta).encode()
            out = list(entries.items())
    return stored(out)


def _metadata_mutations(meta: dict) -> list[tuple[str, Any]]:
    """(description, new metadata) pairs: wrong types, missing keys, bad ranges, bad tensors."""
    out = []

    def put(desc, change):
        m = json.loads(json.dumps(meta))
        change(m)
        out.append((desc, m))

    for key in list(meta):
        put(f"metadata key {key!r} missing", lambda m, k=key: m.pop(k))
        for bad in (None, "x", 7, 1.5, [], {}, True):
            if type(bad) is not type(meta[key]):
                put(f"metadata {key!r} is {json.dumps(bad)}", lambda m, k=key, b=bad: m.__setitem__(k, b))
    layer = meta["layers"][0]
    for key in layer:
        put(f"layers[0] key {key!r} missing", lambda m, k=key: m["layers"][0].pop(k))
        for bad in (None, "40", 7, -1, 1e300, [], True):
            if type(bad) is not type(layer[key]):
                put(f"layers[0].{key} is {json.dumps(bad)}", lambda m, k=key, b=bad: m["layers"][0].__setitem__(k, b))
    put("layers[0].active > numel", lambda m: m["layers"][0].__setitem__("active", m["layers"][0]["numel"] + 1))
    put("layers[0].shape disagrees with numel", lambda m: m["layers"][0].__setitem__("shape", [2, 2]))
    put("layers[0].name 1,000,000 characters", lambda m: m["layers"][0].__setitem__("name", "x" * 1_000_000))
    put("layers 100,000 copies", lambda m: m.__setitem__("layers", m["layers"] * 33_334))
    for key in ("final_sparsity", "total_steps", "method"):
        for bad in ("x", -1, 1.5, None, 10 ** 30):
            put(f"config.{key} is {json.dumps(bad)}", lambda m, k=key, b=bad: m["config"].__setitem__(k, b))
    put("config has an unknown key", lambda m: m["config"].__setitem__("evil", 1))
    tensor = meta["example_inputs"][0]
    for where in ("example_inputs", "reference_outputs"):
        for key, bad in (("dtype", "object"), ("dtype", "float128"), ("dtype", 7), ("shape", [-1, 12]),
                         ("shape", [10 ** 12, 10 ** 12]), ("shape", "1x12"), ("shape", [1, 1, 13]),
                         ("data", "!!!not base64"), ("data", tensor["data"][:-4]), ("data", 12)):
            put(f"{where}[0].{key} is {json.dumps(bad)[:40]}",
                lambda m, w=where, k=key, b=bad: m[w][0].__setitem__(k, b))
        put(f"{where}[0] has an extra key", lambda m, w=where: m[w][0].__setitem__("pickle", "x"))
        put(f"{where} empty", lambda m, w=where: m.__setitem__(w, []))
    nan = base64.b64encode(struct.pack("<4f", *[float("nan")] * 4)).decode()
    put("reference_outputs are NaN", lambda m: m["reference_outputs"][0].__setitem__("data", nan))
    put("output_names longer than the outputs", lambda m: m.__setitem__("output_names", m["output_names"] * 2))
    put("output_names holds a number", lambda m: m.__setitem__("output_names", [7]))
    for bad in (1, 3, "2", True, 2.0):
        put(f"version is {json.dumps(bad)}", lambda m, b=bad: m.__setitem__("version", b))
    put("format is another tool's", lambda m: m.__setitem__("format", "other.archive"))
    put("kind is 'evil'", lambda m: m.__setitem__("kind", "evil"))
    put("entries lists an extra entry", lambda m: m["entries"].__setitem__("data/evil.pkl", "0" * 64))
    put("entries misses one entry", lambda m: m["entries"].pop(next(iter(m["entries"]))))
    put("entries holds a digest that is not hex", lambda m: m["entries"].__setitem__(
        next(iter(m["entries"])), "zz"))
    return out


def archive_variants(base: bytes, marker: str) -> list[tuple[str, str, bytes]]:
    """(kind, description, bytes) for gf.load and granet-export on an archive."""
    items, root = _archive_parts(base)
    rel = {n[len(root) + 1:]: d for n, d in items}
    out = list(zip_attacks(
        "archive", base, marker,
        bomb_targets=[f"{root}/extra/granet_fx.json", f"{root}/data/weights/weight_4",
                      f"{root}/data/sample_inputs/model.pt", f"{root}/models/model.json"]))
    payload = pickled(marker)
    for n, d in items:   # the pickle under every entry name, digests made to match
        r = n[len(root) + 1:]
        if r != "extra/granet_fx.json":
            # torch may never read some entries (byteorder, serialization id): then what loads must be the original
            unread = r in ("byteorder", ".data/serialization_id", ".data/version")
            out.append(("either" if unread else "refuse", f"archive: entry {r} replaced by a pickle, digests updated",
                        _rebuild(items, {r: payload}, root)))
    out.append(("refuse", "archive: sample inputs pickled (digest updated)",
                _rebuild(items, {"data/sample_inputs/model.pt": pickle.dumps({"x": Touch(marker)})}, root)))
    # symbolic sizes that run code when evaluated
    graph = rel["models/model.json"].decode()
    symbol = "Symbol('s77', positive=True, integer=True)"
    for k, p in enumerate(sympy_payloads(marker)):
        text = json.dumps(p)[1:-1]
        changed = graph.replace(json.dumps(symbol)[1:-1], text)
        assert changed != graph
        out.append(("refuse", f"archive: models/model.json expr_str = {p[:70]}...",
                    _rebuild(items, {"models/model.json": changed.encode()}, root)))
        if k < 3:
            out.append(("refuse", f"archive: models/model.json expr_str payload, digest stale",
                        _rebuild(items, {"models/model.json": changed.encode()}, root, refresh=False)))
    # node targets and other strings of the graph that name Python objects
    for target in ("os.system", "builtins.eval", "builtins.exec", "subprocess.call", "torch.ops.aten.evil.default",
                   "__import__('os').system('" + marker + "')"):
        changed = graph.replace('"torch.ops.aten.conv1d.default"', json.dumps(target), 1)
        assert changed != graph
        out.append(("refuse", f"archive: a node target is {target[:50]!r}",
                    _rebuild(items, {"models/model.json": changed.encode()}, root)))
    out.append(("refuse", "archive: models/model.json 100,000-deep nested",
                _rebuild(items, {"models/model.json": deep_json()}, root)))
    out.append(("refuse", "archive: models/model.json not JSON", _rebuild(items, {"models/model.json": b"{"}, root)))
    program = json.loads(graph)
    for desc, value in _json_leaf_mutations(program, 40, seed=3):   # digests updated: a file that may be valid
        out.append(("any", f"archive: models/model.json {desc}",
                    _rebuild(items, {"models/model.json": json.dumps(value).encode()}, root)))
    # weights: pickled, pointing elsewhere, sizes and strides that do not fit the bytes
    config = json.loads(rel["data/weights/model_weights_config.json"])
    first = next(iter(config["config"]))
    for desc, change in (
            ("use_pickle true and the weight a pickle", lambda c: c["config"][first].__setitem__("use_pickle", True)),
            ("path_name '../../evil'", lambda c: c["config"][first].__setitem__("path_name", "../../evil")),
            ("path_name of a missing entry", lambda c: c["config"][first].__setitem__("path_name", "weight_99")),
            ("~two weights share one entry", lambda c: c["config"][list(c["config"])[1]].__setitem__(
                "path_name", c["config"][first]["path_name"])),
            ("dtype 99", lambda c: c["config"][first]["tensor_meta"].__setitem__("dtype", 99)),
            ("dtype float64 over float32 bytes", lambda c: c["config"][first]["tensor_meta"].__setitem__("dtype", 6)),
            ("sizes larger than the bytes", lambda c: c["config"][first]["tensor_meta"]["sizes"][0].__setitem__(
                "as_int", 8000)),
            ("a negative size", lambda c: c["config"][first]["tensor_meta"]["sizes"][0].__setitem__("as_int", -8)),
            ("strides all 0", lambda c: [s.__setitem__("as_int", 0)
                                         for s in c["config"][first]["tensor_meta"]["strides"]]),
            ("storage_offset 10**9", lambda c: c["config"][first]["tensor_meta"]["storage_offset"].__setitem__(
                "as_int", 10 ** 9)),
            ("sizes a string", lambda c: c["config"][first]["tensor_meta"].__setitem__("sizes", "8x1x5")),
            ("a weight missing", lambda c: c["config"].pop(first)),
            ("~an extra weight", lambda c: c["config"].__setitem__("evil", c["config"][first])),
    ):
        c = json.loads(rel["data/weights/model_weights_config.json"])
        change(c)
        changes = {"data/weights/model_weights_config.json": json.dumps(c).encode()}
        if "pickle" in desc:
            changes[f"data/weights/{config['config'][first]['path_name']}"] = payload
        # "~": a file that may be valid (another model), as long as it loads without running anything
        out.append(("any" if desc[0] == "~" else "refuse", f"archive: weights config: {desc.lstrip('~')}",
                    _rebuild(items, changes, root)))
    w = config["config"][first]["path_name"]
    weight = rel[f"data/weights/{w}"]
    out.append(("refuse", "archive: a weight entry empty (digest updated)",
                _rebuild(items, {f"data/weights/{w}": b""}, root)))
    out.append(("refuse", "archive: a weight entry one byte short (digest updated)",
                _rebuild(items, {f"data/weights/{w}": weight[:-1]}, root)))
    c = json.loads(rel["data/weights/model_weights_config.json"])
    c["config"][first]["tensor_meta"]["sizes"] = [{"as_int": 2}, {"as_int": 2}]
    c["config"][first]["tensor_meta"]["strides"] = [{"as_int": 0}, {"as_int": 0}]
    out.append(("refuse", "archive: a weight with strides [0, 0] over 4 bytes",
                _rebuild(items, {"data/weights/model_weights_config.json": json.dumps(c).encode(),
                                 f"data/weights/{w}": weight[:4]}, root)))
    out.append(("refuse", "archive: a flipped byte in a weight entry (digest not updated)",
                _rebuild(items, {f"data/weights/{w}": bytes([weight[0] ^ 0xFF]) + weight[1:]}, root, refresh=False)))
    # metadata schema
    meta = json.loads(rel["extra/granet_fx.json"])
    for desc, m in _metadata_mutations(meta):
        plausible = desc.endswith(" is null") and any(k in desc for k in ("macs", "total_steps", "prune_end"))
        changed = _rebuild(items, {"extra/granet_fx.json": json.dumps(m).encode()}, root, refresh=False)
        out.append(("any" if plausible else "refuse", f"archive: {desc}", changed))
    out.append(("refuse", "archive: metadata 100,000-deep nested",
                _rebuild(items, {"extra/granet_fx.json": deep_json()}, root)))
    out.append(("refuse", "archive: metadata with a NaN token",
                _rebuild(items, {"extra/granet_fx.json": rel["extra/granet_fx.json"].replace(b'"version": 2',
                                                                                           b'"version": NaN')}, root)))
    out.append(("refuse", "archive: metadata not UTF-8",
                _rebuild(items, {"extra/granet_fx.json": b"\xff\xfe{}"}, root)))
    out.append(("refuse", "archive: metadata removed", _rebuild(items, {"extra/granet_fx.json": None}, root)))
    for r in ("models/model.json", "data/weights/model_weights_config.json", "archive_format", "byteorder"):
        out.append(("either" if r == "byteorder" else "refuse", f"archive: entry {r} removed",
                    _rebuild(items, {r: None}, root)))
    out += [("either", d, b) for d, b in flips("archive", base, 160, seed=11)]
    out += [("refuse", d, b) for d, b in truncations("archive", base, 40, seed=12)]
    return out


def _json_leaf_mutations(value: Any, count: int, seed: int) -> list[tuple[str, Any]]:
    """``count`` copies of ``value`` with one leaf (chosen at random) given a value of another type."""
    leaves = []

    def walk(v, path):
        if isinstance(v, dict):
            for k, x in v.items():
                walk(x, path + [k])
        elif isinstance(v, list):
            for i, x in enumerate(v):
                walk(x, path + [i])
        else:
            leaves.append(path)

    walk(value, [])
    rng = random.Random(seed)
    out = []
    for path in rng.sample(leaves, min(count, len(leaves))):
        old = value
        for p in path:
            old = old[p]
        choices = [None, "x" * 300, -1, 10 ** 30, 1.5, [], {}, True, "../../etc/passwd", "__import__('os')"]
        bad = rng.choice([c for c in choices if type(c) is not type(old)])
        copy = json.loads(json.dumps(value))
        target = copy
        for p in path[:-1]:
            target = target[p]
        if path:
            target[path[-1]] = bad
        out.append((f"{'.'.join(map(str, path))[:80]} = {json.dumps(bad)[:30]}", copy))
    return out


def state_dict_variants(base: bytes, marker: str) -> list[tuple[str, str, bytes]]:
    """(kind, description, bytes) for granet-export on a torch.save state dict (--model hostile:small_mlp)."""
    import torch

    items = zip_items(base)
    root = items[0][0].split("/", 1)[0]
    pkl = f"{root}/data.pkl"
    out = list(zip_attacks("state_dict", base, marker, bomb_targets=[pkl, f"{root}/data/0"], unsafe_root=root,
                           strict=False))
    legacy = io.BytesIO()
    torch.save({"0.weight": Touch(marker)}, legacy, _use_new_zipfile_serialization=False)
    out.append(("refuse", "state_dict: the legacy (non-zip) torch.save format holding a pickle that runs code",
                legacy.getvalue()))
    for desc, obj in (("a list, not a dict", [1, 2]), ("a dict of strings", {"0.weight": "x"}),
                      ("a state dict missing a key", {k: v for k, v in small_mlp().state_dict().items()
                                                      if k != "0.bias"}),
                      ("a weight of the wrong shape", {**small_mlp().state_dict(), "0.weight": torch.zeros(2, 2)}),
                      ("NaN weights", {k: torch.full_like(v, float("nan"))
                                       for k, v in small_mlp().state_dict().items()})):
        b = io.BytesIO()
        torch.save(obj, b)
        out.append(("refuse", f"state_dict: {desc}", b.getvalue()))
    out += [("either", d, b) for d, b in flips("state_dict", base, 40, seed=21)]
    out += [("refuse", d, b) for d, b in truncations("state_dict", base, 16, seed=22)]
    return out


def _checkpoint_file(payload: bytes) -> bytes:
    """A version 2 checkpoint around ``payload``, written from the format's description (not its code)."""
    header = {"format": "granet_fx.checkpoint", "payload_bytes": len(payload),
              "sha256": hashlib.sha256(payload).hexdigest(), "version": 2}
    return _checkpoint_with_header(header, payload)


def _checkpoint_with_header(header: Any, payload: bytes) -> bytes:
    line = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return b"GRANET_FX CHECKPOINT\n" + line + b"\n" + payload


def checkpoint_variants(base: bytes, marker: str) -> list[tuple[str, str, bytes]]:
    import torch

    end = base.index(b"\n", 21)
    payload = base[end + 1:]
    header = json.loads(base[21:end])
    out = [("refuse", d, b) for d, b in flips("checkpoint", base, 130, seed=31)]
    out += [("refuse", d, b) for d, b in truncations("checkpoint", base, 40, seed=32)]
    out.append(("refuse", "checkpoint: appended bytes", base + b"\x00"))
    for desc, h in (("version 3", {**header, "version": 3}), ("version '2'", {**header, "version": "2"}),
                    ("another format", {**header, "format": "x"}),
                    ("payload_bytes -1", {**header, "payload_bytes": -1}),
                    ("payload_bytes 10**30", {**header, "payload_bytes": 10 ** 30}),
                    ("sha256 of another file", {**header, "sha256": "0" * 64}),
                    ("a missing key", {"format": header["format"]}), ("an extra key", {**header, "pickle": 1}),
                    ("a list", [1, 2]), ("payload_bytes 1.5", {**header, "payload_bytes": 1.5})):
        out.append(("refuse", f"checkpoint: header {desc}", _checkpoint_with_header(h, payload)))
    out.append(("refuse", "checkpoint: header 100,000-deep nested JSON",
                b"GRANET_FX CHECKPOINT\n" + deep_json() + b"\n" + payload))
    out.append(("refuse", "checkpoint: header with spaces (not the canonical form)",
                b"GRANET_FX CHECKPOINT\n" + json.dumps(header, sort_keys=True).encode() + b"\n" + payload))
    # What an attacker who recomputes the checksum can do: the zip and the state inside.
    attacks = zip_attacks("checkpoint payload", payload, marker, bomb_targets=["archive/data.pkl", "archive/data/0"],
                          strict=False)
    out += [(k, d + " (checksum recomputed)", _checkpoint_file(b)) for k, d, b in attacks]
    out += [(k, d.replace("checkpoint payload", "version 1 checkpoint"), b) for k, d, b in attacks
            if b[:4] == b"PK\x03\x04"][:40]
    legacy = io.BytesIO()
    torch.save({"format": "granet_fx.checkpoint", "version": 2, "model": Touch(marker)}, legacy,
               _use_new_zipfile_serialization=False)
    out.append(("refuse", "checkpoint: a legacy torch.save pickle payload that runs code (checksum recomputed)",
                _checkpoint_file(legacy.getvalue())))
    for desc, change in (
            ("model missing", lambda s: s.pop("model")), ("model a list", lambda s: s.__setitem__("model", [1])),
            ("a model tensor replaced by a string", lambda s: s["model"].__setitem__(next(iter(s["model"])), "x")),
            ("a model tensor of another shape",
             lambda s: s["model"].__setitem__(next(iter(s["model"])), torch.zeros(3))),
            ("model keys renamed", lambda s: s.__setitem__("model", {k + "x": v for k, v in s["model"].items()})),
            ("optimizer without param_groups", lambda s: s["optimizer"].pop("param_groups")),
            ("optimizer param_groups for another model", lambda s: s["optimizer"]["param_groups"][0].__setitem__(
                "params", [0])),
            ("granet state empty", lambda s: s.__setitem__("granet", {})),
            ("granet state a string", lambda s: s.__setitem__("granet", "x")),
            ("rng missing", lambda s: s.pop("rng")),
            ("rng torch state of 3 bytes", lambda s: s["rng"].__setitem__("torch", torch.zeros(3, dtype=torch.uint8))),
            ("rng python state malformed", lambda s: s["rng"].__setitem__("python", (3, (1, 2), None))),
            ("rng numpy state malformed",
             lambda s: s["rng"].__setitem__("numpy", ("MT19937", torch.zeros(3, dtype=torch.int64), 0, 0, 0.0))),
            ("extra a list", lambda s: s.__setitem__("extra", [1])),
            ("version 1 inside a version 2 file", lambda s: s.__setitem__("version", 1)),
            ("format of another tool", lambda s: s.__setitem__("format", "x"))):
        s = read_checkpoint_from(base)
        change(s)
        b = io.BytesIO()
        torch.save(s, b)
        out.append(("refuse", f"checkpoint: state {desc} (checksum recomputed)", _checkpoint_file(b.getvalue())))
    return out


def read_checkpoint_from(data: bytes) -> dict:
    import tempfile
    from granet_fx.checkpoint import read_checkpoint

    with tempfile.TemporaryDirectory() as d:
        Path(d, "c.pt").write_bytes(data)
        return read_checkpoint(Path(d, "c.pt"))


def _onnx_variants(paths: dict[str, Path], marker: str) -> list[tuple[str, str, dict, str, list]]:
    """(kind, description, files, input name, extra args) for granet-bench."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    dense = paths["onnx"].read_bytes()
    sparse = paths["onnx_sparse"].read_bytes()
    out = []
    for d, b in flips("onnx", dense, 70, seed=41) + flips("onnx (sparse initializers)", sparse, 40, seed=42):
        out.append(("any", d, {"model.onnx": b}, "model.onnx", []))   # ONNX has no checksum: may be another model
    for d, b in truncations("onnx", dense, 30, seed=43):
        out.append(("any", d, {"model.onnx": b}, "model.onnx", []))
    model = onnx.load_from_string(sparse)

    def variant(desc, change, base_model=model, kind="refuse", files=None):
        m = onnx.ModelProto()
        m.CopyFrom(base_model)
        change(m)
        out.append((kind, desc, {"model.onnx": m.SerializeToString(), **(files or {})}, "model.onnx", []))

    n_sparse = len(model.graph.sparse_initializer)
    for k in range(n_sparse):
        st = model.graph.sparse_initializer[k]
        name = st.values.name
        index = numpy_helper.to_array(st.indices)
        numel = math.prod(st.dims)

        def set_indices(m, values, dims=None, k=k):
            t = numpy_helper.from_array(np.asarray(values, dtype=np.int64), m.graph.sparse_initializer[k].indices.name)
            if dims is not None:
                del t.dims[:]
                t.dims.extend(dims)
            m.graph.sparse_initializer[k].indices.CopyFrom(t)

        flat = index.reshape(-1) if index.ndim == 1 else None
        if flat is None or len(flat) < 2:
            continue
        variant(f"onnx: sparse {name}: an index past the end", lambda m, f=flat: set_indices(m, [*f[:-1], numel]))
        variant(f"onnx: sparse {name}: a negative index", lambda m, f=flat: set_indices(m, [-1, *f[1:]]))
        variant(f"onnx: sparse {name}: an index of 2**62", lambda m, f=flat: set_indices(m, [*f[:-1], 2 ** 62]))
        variant(f"onnx: sparse {name}: indices out of order", lambda m, f=flat: set_indices(m, f[::-1]))
        variant(f"onnx: sparse {name}: a repeated index", lambda m, f=flat: set_indices(m, [f[0], f[0], *f[2:]]))
        variant(f"onnx: sparse {name}: one index fewer than values", lambda m, f=flat: set_indices(m, f[:-1]))
        variant(f"onnx: sparse {name}: indices claim more elements than stored",
                lambda m, f=flat: set_indices(m, f, dims=[len(f) * 4]))
        variant(f"onnx: sparse {name}: 2-D indices out of range",
                lambda m, f=flat, s=list(st.dims): set_indices(m, [[d for d in s]] * len(f), dims=[len(f), len(s)]))
        variant(f"onnx: sparse {name}: int32 indices", lambda m, k=k: setattr(
            m.graph.sparse_initializer[k].indices, "data_type", TensorProto.INT32))
        variant(f"onnx: sparse {name}: dims 10**6 x 10**6", lambda m, k=k: (
            m.graph.sparse_initializer[k].ClearField("dims"),
            m.graph.sparse_initializer[k].dims.extend([10 ** 6, 10 ** 6])))
        variant(f"onnx: sparse {name}: a negative dimension",
                lambda m, k=k: m.graph.sparse_initializer[k].dims.__setitem__(0, -4))
        variant(f"onnx: sparse {name}: values 2-D", lambda m, k=k: m.graph.sparse_initializer[k].values.dims.append(1))
        variant(f"onnx: sparse {name}: values stored outside the file", lambda m, k=k: (
            setattr(m.graph.sparse_initializer[k].values, "data_location", TensorProto.EXTERNAL),
            m.graph.sparse_initializer[k].values.external_data.add(key="location", value="../../etc/passwd")))
        variant(f"onnx: sparse {name}: no dimensions", lambda m, k=k: m.graph.sparse_initializer[k].ClearField("dims"))
    dense_model = onnx.load_from_string(dense)
    # Constant nodes with sparse_value (the default layout): the same checks inside attributes.
    for node in dense_model.graph.node:
        if node.op_type == "Constant" and any(a.name == "sparse_value" for a in node.attribute):
            def attr(m, node_name=node.name):
                n = next(x for x in m.graph.node if x.name == node_name)
                return next(a for a in n.attribute if a.name == "sparse_value").sparse_tensor

            def shift(m, node_name=node.name, by=10 ** 6):
                st = attr(m, node_name)
                idx = numpy_helper.to_array(st.indices).copy()
                idx[-1] += by
                st.indices.CopyFrom(numpy_helper.from_array(idx, st.indices.name))

            variant(f"onnx: Constant {node.name} sparse_value: an index past the end", shift, dense_model)
            variant(f"onnx: Constant {node.name} sparse_value: a negative index",
                    lambda m, n=node.name: shift(m, n, by=-10 ** 9), dense_model)
            variant(f"onnx: Constant {node.name} sparse_value: dims 10**7 x 10**7", lambda m, n=node.name: (
                attr(m, n).ClearField("dims"), attr(m, n).dims.extend([10 ** 7, 10 ** 7])), dense_model)
    # dense tensors: data that does not fit the dims
    init = dense_model.graph.initializer
    if len(init):
        t0 = init[0].name
        variant("onnx: an initializer with raw data 4 bytes short", lambda m: setattr(
            next(t for t in m.graph.initializer if t.name == t0), "raw_data",
            next(t for t in m.graph.initializer if t.name == t0).raw_data[:-4] or b"\x00"), dense_model)
        variant("onnx: an initializer with dims 10**12", lambda m: (
            next(t for t in m.graph.initializer if t.name == t0).ClearField("dims"),
            next(t for t in m.graph.initializer if t.name == t0).dims.extend([10 ** 12])), dense_model)
        variant("onnx: an initializer with an unknown data type", lambda m: setattr(
            next(t for t in m.graph.initializer if t.name == t0), "data_type", 77), dense_model)
    # external data
    ext = onnx.load(str(paths["onnx_external"]), load_external_data=False)
    data_file = Path(str(paths["onnx_external"]) + ".data").read_bytes()
    good = {"external.onnx.data": data_file}

    def ext_variant(desc, location, files=None, offset=None, length=None, extra=None, kind="refuse"):
        m = onnx.ModelProto()
        m.CopyFrom(ext)
        for t in m.graph.initializer:
            if t.data_location == TensorProto.EXTERNAL:
                entries = {e.key: e.value for e in t.external_data}
                entries["location"] = location if location is not None else entries["location"]
                if offset is not None:
                    entries["offset"] = offset
                if length is not None:
                    entries["length"] = length
                del t.external_data[:]
                for key, value in entries.items():
                    t.external_data.add(key=key, value=value)
                for key, value in (extra or {}).items():
                    t.external_data.add(key=key, value=value)
                break
        files = good if files is None else files
        out.append((kind, f"onnx external data: {desc}", {"model.onnx": m.SerializeToString(), **files},
                    "model.onnx", []))

    ext_variant("an absolute location", "/etc/passwd")
    ext_variant("a location with ..", "../../../../etc/passwd")
    ext_variant("a location inside then out", "sub/../../secret.bin")
    ext_variant("a link that leads out of the folder", "out.bin", {**good, "out.bin": ("link", "/etc/passwd")})
    ext_variant("a link to /dev/zero", "zero.bin", {**good, "zero.bin": ("link", "/dev/zero")})
    ext_variant("a location that is a folder", "sub", {**good, "sub": ("folder",)})
    ext_variant("a missing file", "missing.bin")
    ext_variant("an empty location", "")
    ext_variant("a location with a NUL", "external.onnx.data\x00x")
    ext_variant("an offset past the end", None, offset=str(10 ** 9))
    ext_variant("a negative offset", None, offset="-5")
    ext_variant("an offset that is not a number", None, offset="12abc")
    ext_variant("a length past the end", None, length=str(10 ** 9))
    ext_variant("a length that does not fit the dims", None, length="4")
    ext_variant("the location named twice", None, extra={"location": "/etc/passwd"})
    ext_variant("a 10 GiB sparse data file (only the tensor's bytes are read)", "big.bin",
                {**good, "big.bin": ("sparse", 10 << 30)}, kind="any")
    ext_variant("data file truncated", None, {"external.onnx.data": data_file[: len(data_file) // 2]})
    # inputs granet-bench would have to make: huge, scalar, strings
    for desc, shape, elem in (("an input of 10**6 x 10**6 floats", ["N", 10 ** 6, 10 ** 6], TensorProto.FLOAT),
                              ("a scalar input", [], TensorProto.FLOAT),
                              ("a string input", ["N", 3], TensorProto.STRING)):
        g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", elem, shape)],
                              [helper.make_tensor_value_info("y", elem, shape)])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 9
        out.append(("refuse", f"onnx: {desc}", {"model.onnx": m.SerializeToString()}, "model.onnx", []))
    # 300 nested If subgraphs (protobuf recursion), encoded by hand: protobuf refuses to build it
    graph = b""
    for _ in range(300):
        attribute = _pb(1, b"then_branch") + _pb(6, graph) + _varint_field(20, 5)
        graph = _pb(1, _pb(1, b"c") + _pb(2, b"y") + _pb(4, b"If") + _pb(5, attribute))
    nested = _varint_field(1, 9) + _pb(7, graph) + _pb(8, _varint_field(2, 17))
    out.append(("refuse", "onnx: 300 nested If subgraphs", {"model.onnx": nested}, "model.onnx", []))
    # outputs that are inputs
    out.append(("refuse", "onnx: --json is the input model", {"model.onnx": dense}, "model.onnx",
                ["--json", "model.onnx"]))
    out.append(("refuse", "onnx: --json is the baseline", {"model.onnx": dense, "base.onnx": dense}, "model.onnx",
                ["--baseline", "base.onnx", "--json", "base.onnx"]))
    out.append(("refuse", "onnx: --json is the model's external data file",
                {"model.onnx": paths["onnx_external"].read_bytes(), "external.onnx.data": data_file}, "model.onnx",
                ["--json", "external.onnx.data"]))
    out.append(("refuse", "onnx: a pickle that runs code", {"model.onnx": pickled(marker)}, "model.onnx", []))
    return out


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _pb(field: int, value: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(field << 3 | 2) + _varint(len(value)) + value


def _varint_field(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _run_variants(paths: dict[str, Path]) -> list[tuple[str, str, bytes]]:
    """(kind, description, bytes) for granet-report."""
    run = json.loads(paths["run"].read_text())
    sweep = json.loads(paths["sweep"].read_text())
    out = []
    for desc, value in _json_leaf_mutations(run, 70, seed=51):
        out.append(("any", f"run: {desc}", json.dumps(value).encode()))
    for desc, value in _json_leaf_mutations(sweep, 40, seed=52):
        out.append(("any", f"sweep: {desc}", json.dumps(value).encode()))
    for key in run:
        out.append(("refuse" if key in ("format", "version", "label", "history", "updates", "layers") else "any",
                    f"run: key {key!r} missing", json.dumps({k: v for k, v in run.items() if k != key}).encode()))
    for key in ("summary", "runs"):
        out.append(("refuse", f"sweep: key {key!r} missing",
                    json.dumps({k: v for k, v in sweep.items() if k != key}).encode()))
    for desc, change in (
            ("label 1,000,000 characters", lambda r: r.__setitem__("label", "x" * 1_000_000)),
            ("a layer name 1,000,000 characters", lambda r: r["layers"][0].__setitem__("name", "y" * 1_000_000)),
            ("config.final_sparsity a string", lambda r: r["config"].__setitem__("final_sparsity", "0.7")),
            ("history lists of different lengths", lambda r: r["history"]["step"].append(99)),
            ("history 2,000,000 points", lambda r: r["history"].update({k: [0] * 2_000_000 for k in r["history"]})),
            ("20,000 layers", lambda r: r.__setitem__("layers", r["layers"] * 10_000)),
            ("a density of 5", lambda r: r["layers"][0].__setitem__("density", 5)),
            ("a negative step", lambda r: r["history"]["step"].__setitem__(0, -1)),
            ("a step that is a float", lambda r: r["history"]["step"].__setitem__(0, 0.5)),
            ("a label with a newline and a traceback",
             lambda r: r.__setitem__("label", "x\nTraceback (most recent call last):")),
            ("version true", lambda r: r.__setitem__("version", True))):
        r = json.loads(json.dumps(run))
        change(r)
        out.append(("refuse", f"run: {desc}", json.dumps(r).encode()))
    text = paths["run"].read_bytes()
    out.append(("refuse", "run: a NaN token", text.replace(b'"accuracy": 0.5', b'"accuracy": NaN', 1)))
    out.append(("refuse", "run: an Infinity token", text.replace(b'"accuracy": 0.5', b'"accuracy": Infinity', 1)))
    out.append(("refuse", "run: a number of 5,000 digits",
                text.replace(b'"accuracy": 0.5', b'"accuracy": ' + b"9" * 5000, 1)))
    out.append(("refuse", "run: 100,000-deep nested JSON", deep_json()))
    out.append(("refuse", "run: a label nested 40 deep",
                text.replace(b'"label": "GraNet"', b'"label": ' + b"[" * 40 + b"]" * 40, 1)))
    out.append(("refuse", "run: not UTF-8", b"\xff\xfe" + text))
    out.append(("refuse", "run: a sweep with 1,000 runs", json.dumps({**sweep, "runs": sweep["runs"] * 1000}).encode()))
    out += [("any", d, b) for d, b in flips("run", text, 40, seed=53)]
    out += [("any", d, b) for d, b in truncations("run", text, 20, seed=54)]
    return out


def build_cases(workdir: Path, full: bool) -> list[Case]:
    """Every hostile case (``full``) or a small representative sample, with its files described."""
    bases = build_bases(workdir / "base")
    markers = workdir / "markers"
    markers.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []
    counter = {}

    def add(reader, kind, what, files, input_name, args=(), output=None):
        counter[reader] = counter.get(reader, 0) + 1
        cid = f"{reader}-{counter[reader]:04d}"
        cases.append(Case(cid, reader, what, files, input_name, kind, list(args), output))

    marker = MARKER_COMMAND
    archive = bases["archive"].read_bytes()
    for kind, what, data in archive_variants(archive, marker):
        add("archive", kind, what, {"model.pt2": data}, "model.pt2")
    for kind, what, data in state_dict_variants(bases["state_dict"].read_bytes(), marker):
        add("export", kind, what, {"state.pt": data}, "state.pt", SD_ARGS)
    add("export", "refuse", "export: -o is the input archive", {"model.pt2": archive}, "model.pt2", output="model.pt2")
    add("export", "refuse", "export: -o is the input state dict", {"state.pt": bases["state_dict"].read_bytes()},
        "state.pt", SD_ARGS, output="state.pt")
    add("export", "refuse", "export: a pickled module without --trust-pickle",
        {"state.pt": pickled(marker)}, "state.pt", SD_ARGS)
    for kind, what, files, input_name, args in _onnx_variants(bases, marker):
        add("bench", kind, what, files, input_name, args)
    for kind, what, data in checkpoint_variants(bases["checkpoint"].read_bytes(), marker):
        add("checkpoint", kind, what, {"ckpt.pt": data}, "ckpt.pt")
    for kind, what, data in _run_variants(bases):
        add("report", kind, what, {"run.json": data}, "run.json")
    add("report", "refuse", "report: the input named schedule.png in the output folder",
        {"plots/schedule.png": bases["run"].read_bytes()}, "plots/schedule.png")
    for reader, name, args in (("archive", "model.pt2", []), ("export", "state.pt", SD_ARGS),
                               ("bench", "model.onnx", []), ("checkpoint", "ckpt.pt", []), ("report", "run.json", [])):
        for c in special_cases(reader, name, args):
            files = {k: (pickled(marker) if v is None else v) for k, v in c.files.items()}
            add(reader, "refuse", c.what, files, c.input, c.args)
    if not full:
        cases = sample(cases)
    return cases


def sample(cases: list[Case]) -> list[Case]:
    """A few dozen cases that cover every reader and every kind of attack (the default test)."""
    wanted = ("duplicate entry", "overlap", "deflate bomb", "expr_str", "replaced by a pickle", "strides [0, 0]",
              "/dev/zero", "10 GiB sparse", "100,000-deep", "1,000,000 characters", "flipped", "truncated",
              "sparse", "external data", "is the input", "numel", "NaN", "checksum recomputed", "legacy")
    seen, out = set(), []
    for c in cases:
        for w in wanted:
            if w in c.what and (c.reader, w) not in seen:
                seen.add((c.reader, w))
                out.append(c)
                break
    return out


def subprocess_sample(cases: list[Case], per_reader: int) -> list[str]:
    """Ids of the cases whose command also runs as a real subprocess: the first ``per_reader`` kinds of attack
    of each command's reader."""
    taken: dict[str, int] = {}
    ids, seen = [], set()
    for c in cases:
        kind = c.what.split(":")[1].split(",")[0].strip()[:25] if ":" in c.what else c.what
        if c.reader in COMMANDS and taken.get(c.reader, 0) < per_reader and (c.reader, kind) not in seen:
            seen.add((c.reader, kind))
            taken[c.reader] = taken.get(c.reader, 0) + 1
            ids.append(c.id)
    return ids


# Running the cases --------------------------------------------------------------------


def materialize(case: Case, folder: Path) -> None:
    """Write the case's files into ``folder`` (plus the outputs that must survive)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in case.files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content[0] == "sparse":
            with open(path, "wb") as f:
                f.truncate(content[1])
        elif content[0] == "link":
            os.symlink(content[1], path)
        elif content[0] == "folder":
            path.mkdir()
    # existing outputs, which a refused input must leave as they are
    (folder / "out.onnx").write_bytes(b"precious onnx")
    (folder / "out.json").write_bytes(b'{"precious": true}')
    plots = folder / "plots"
    plots.mkdir(exist_ok=True)
    for name in ("schedule.png", "layer_density.png", "accuracy.png"):
        if not (plots / name).exists():
            (plots / name).write_bytes(b"old " + name.encode())


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under ``folder``: name -> what it is (a file's SHA-256 of up to 64 MB, or its size)."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root, name)
            rel = str(path.relative_to(folder))
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = "link " + os.readlink(path)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = "folder"
            elif st.st_size > 64 << 20:
                out[rel] = f"size {st.st_size} mtime {st.st_mtime_ns}"
            else:
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def command(case: Case, folder: Path) -> list[str]:
    """The command line of the case's reader (None for the library-only checkpoint reader)."""
    path = case.input if os.path.isabs(case.input) else str(folder / case.input)
    exe = Path(sys.executable).with_name(COMMANDS[case.reader])
    if case.reader in ("archive", "export"):
        out = str(folder / (case.output or "out.onnx"))
        return [str(exe), path, "-o", out, *case.args]
    if case.reader == "bench":
        args = [a if a.startswith("-") else str(folder / a) for a in case.args]
        if "--json" not in args:
            args += ["--json", str(folder / "out.json")]
        return [str(exe), path, *args, "--runs", "1", "--warmup", "0", "--threads", "1", "--batch", "1"]
    return [str(exe), path, "-o", str(folder / "plots")]


def outputs_of(case: Case) -> set[str]:
    """Paths (relative) that the reader may write when it accepts the input."""
    return {"out.onnx", "out.json", "plots/schedule.png", "plots/layer_density.png", "plots/accuracy.png"}


def _limits() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def judge_after(case: Case, folder: Path, before: dict[str, str], accepted: bool, markers: Path,
                side: str) -> list[str]:
    """Problems visible on disk after a run: a marker, a changed or new file, a temporary file."""
    problems = []
    if (markers / f"{case.id}.{side}").exists() or (folder / "HOSTILE_MARKER").exists():
        problems.append("CODE RAN: the marker file exists")
    after = snapshot(folder)
    allowed = outputs_of(case) if accepted else set()
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k) and k not in allowed)
    temporary = sorted(k for k in after if k not in before and (k.endswith(".tmp") or "/." in "/" + k))
    if temporary:
        problems.append(f"temporary file left: {temporary[:3]}")
    elif changed:
        problems.append(f"files changed: {changed[:4]}")
    return problems


def check_cli(case: Case, folder: Path, markers: Path) -> dict:
    """Run the case's command as a subprocess; the problems seen (empty: it kept every promise)."""
    before = snapshot(folder)
    argv = command(case, folder)
    env = {**os.environ, **ENV, "HOSTILE_MARKER": str(markers / f"{case.id}.subprocess")}
    start = time.monotonic()
    try:
        r = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=CASE_SECONDS, env=env,
                           preexec_fn=_limits, cwd=folder, stdin=subprocess.DEVNULL)
        rc, err = r.returncode, r.stderr
    except subprocess.TimeoutExpired:
        rc, err = None, ""
    seconds = time.monotonic() - start
    problems = _command_problems(case, rc, err)
    problems += judge_after(case, folder, before, rc == 0, markers, "subprocess")
    lines = err.strip().splitlines()
    return {"id": case.id, "side": "command", "rc": rc, "seconds": round(seconds, 2), "problems": problems,
            "message": lines[-1][:300] if lines else ""}


# The worker: the library side, many cases in one process ------------------------------


def worker(workdir: Path) -> None:
    """Read case ids on stdin, run each through the library, print one JSON line per case."""
    _limits()
    os.environ.update(ENV)
    import torch
    torch.set_num_threads(1)
    import granet_fx as gf
    from granet_fx import plots
    from granet_fx.checkpoint import CheckpointError
    from granet_fx.export import bench, cli

    manifest = {c["id"]: c for c in json.loads((workdir / "cases.json").read_text())}
    bases = build_bases(workdir / "base")
    markers = workdir / "markers"
    original_archive = _archive_fingerprint(gf.load(bases["archive"]))
    reference = checkpoint_objects()
    gf.load_checkpoint(bases["checkpoint"], *reference)
    original_checkpoint = _checkpoint_fingerprint(*reference)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cid = line.strip()
        if not cid:
            continue
        c = manifest[cid]
        case = Case(**{**c, "files": {}})
        folder = workdir / "cases" / cid / "library"
        path = case.input if os.path.isabs(case.input) else str(folder / case.input)
        before = snapshot(folder)
        problems, message, accepted = [], "", False
        os.environ["HOSTILE_MARKER"] = str(markers / f"{cid}.library")
        start = time.monotonic()
        try:
            if case.reader == "archive":
                try:
                    saved = gf.load(path)
                    accepted = True
                    if case.kind == "either" and _archive_fingerprint(saved) != original_archive:
                        problems.append("gf.load: SILENT DAMAGE: loaded, but not what was saved")
                except gf.ArchiveError as e:
                    message = _message_problems(e, path, problems)
                if accepted and case.kind == "refuse":
                    problems.append("gf.load accepted a file it must refuse")
            elif case.reader == "checkpoint":
                objects = checkpoint_objects()
                try:
                    gf.load_checkpoint(path, *objects)
                    accepted = True
                    if case.kind == "either" and _checkpoint_fingerprint(*objects) != original_checkpoint:
                        problems.append("SILENT DAMAGE: loaded, but not what was saved")
                except CheckpointError as e:
                    message = _message_problems(e, path, problems)
                if accepted and case.kind == "refuse":
                    problems.append("accepted a file it must refuse")
            if case.reader in ("export", "bench", "report"):
                main = {"export": cli.main, "bench": bench.main, "report": plots.main}[case.reader]
                argv = command(case, folder)[1:]
                err = io.StringIO()
                with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                    try:
                        rc = main(argv)
                    except SystemExit as e:
                        rc = e.code
                lines = err.getvalue().strip().splitlines()
                message = message or (lines[-1] if lines else "")
                name = f"{COMMANDS[case.reader]} in-process"
                accepted = accepted or rc == 0
                if rc == 0 and case.kind != "refuse":
                    pass
                elif _parity_caught(case, rc, lines):
                    pass
                elif rc != 2:
                    problems.append(f"{name}: returned {rc} (expected 2): {lines[-1][:150] if lines else ''}")
                elif len(lines) != 1:
                    problems.append(f"{name}: stderr is not one line: {len(lines)} lines")
        except MemoryError:
            problems.append(f"MemoryError (more than {MEMORY_LIMIT >> 30} GiB)")
        except RecursionError:
            problems.append("RecursionError")
        except BaseException as e:  # noqa: BLE001 - any other exception is what the test looks for
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            problems.append(f"raised {type(e).__name__}: {first}")
        seconds = time.monotonic() - start
        problems += judge_after(case, folder, before, accepted, markers, "library")
        print(json.dumps({"id": cid, "side": "library", "seconds": round(seconds, 2), "problems": problems,
                          "message": message[:300]}), flush=True)


def _message_problems(e: BaseException, path: str, problems: list) -> str:
    text = str(e)
    if "\n" in text.strip():
        problems.append("the error has more than one line")
    if path not in text and os.path.basename(path) not in text:
        problems.append("the error does not name the file")
    return text


def _archive_fingerprint(saved) -> str:
    """A digest of everything ``gf.load`` returned, and of what the program computes on the example inputs."""
    import torch

    def raw(t):
        return t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()

    h = hashlib.sha256()
    for k, v in sorted(saved.program.state_dict.items()):
        h.update(k.encode() + raw(v))
    for t in [*saved.example_inputs, *saved.reference_outputs]:
        h.update(raw(t))
    with torch.no_grad():
        outputs = saved.module()(*saved.example_inputs)
    for t in outputs if isinstance(outputs, (tuple, list)) else [outputs]:
        h.update(raw(t))
    h.update(repr((saved.config, saved.layers, saved.output_names, saved.dynamic_batch, saved.kind)).encode())
    return h.hexdigest()


def _checkpoint_fingerprint(model, optimizer, granet) -> str:
    import torch

    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode() + v.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    h.update(repr(granet.state_dict()).encode())
    h.update(repr(optimizer.state_dict()).encode())
    h.update(torch.get_rng_state().numpy().tobytes())
    return h.hexdigest()


def zygote(workdir: Path) -> None:
    """The command side, fast: import the tools once, then run each case's command in a forked child.

    The child does what the console script does (``sys.exit(main())``) with its
    own stdout and stderr files, so its exit code and stderr are the command's;
    an exception that escapes ``main`` prints its traceback and exits 1, as
    Python would. Saves the 3 s of importing torch for each of 1,000 runs.
    """
    _limits()
    os.environ.update(ENV)
    import traceback
    import torch
    torch.set_num_threads(1)
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401
    from matplotlib.figure import Figure  # noqa: F401
    from granet_fx import plots
    from granet_fx.export import archive, bench, cli
    archive._layout()            # imports torch.export's archive constants (torch._dynamo), as every run would

    mains = {"granet-export": cli.main, "granet-bench": bench.main, "granet-report": plots.main}
    manifest = {c["id"]: c for c in json.loads((workdir / "cases.json").read_text())}
    markers = workdir / "markers"
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cid = line.strip()
        if not cid:
            continue
        case = Case(**{**manifest[cid], "files": {}})
        folder = workdir / "cases" / cid / "command"
        argv = command(case, folder)
        before = snapshot(folder)
        err_path = workdir / "cases" / cid / "stderr.txt"
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:
            rc = 1
            try:
                os.chdir(folder)
                os.environ["HOSTILE_MARKER"] = str(markers / f"{cid}.command")
                out = os.open(os.devnull, os.O_WRONLY)
                err = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(out, 1)
                os.dup2(err, 2)
                sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", closefd=False), write_through=True)
                sys.stderr = io.TextIOWrapper(os.fdopen(2, "wb", closefd=False), write_through=True)
                sys.argv = argv
                try:
                    rc = mains[Path(argv[0]).name](argv[1:])
                except SystemExit as e:
                    rc = e.code if isinstance(e.code, int) else 1
                except BaseException:
                    traceback.print_exc()
                    rc = 1
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(rc if isinstance(rc, int) else 1)
        rc = None
        while time.monotonic() - start < CASE_SECONDS:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                rc = os.waitstatus_to_exitcode(status)
                break
            time.sleep(0.02)
        if rc is None:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        seconds = time.monotonic() - start
        err = err_path.read_text(errors="replace") if err_path.exists() else ""
        if err_path.exists():
            err_path.unlink()
        problems = _command_problems(case, rc, err)
        problems += judge_after(case, folder, before, rc == 0, markers, "command")
        lines = err.strip().splitlines()
        print(json.dumps({"id": cid, "side": "command", "rc": rc, "seconds": round(seconds, 2), "problems": problems,
                          "message": lines[-1][:300] if lines else ""}), flush=True)


def _parity_caught(case: Case, rc: int | None, lines: list[str]) -> bool:
    """A changed file that reads as another model (kind "any"), whose export granet-export's own parity
    check refused: exit 1, nothing written. That is a kept promise too."""
    return (case.kind == "any" and case.reader in ("archive", "export") and rc == 1 and bool(lines)
            and "differ from the reference" in lines[-1] and "nothing written" in lines[-1])


def _command_problems(case: Case, rc: int | None, err: str) -> list[str]:
    problems = []
    if rc is None:
        problems.append(f"hung: killed after {CASE_SECONDS} s")
    elif rc == 0 and case.kind != "refuse":
        pass
    elif _parity_caught(case, rc, err.strip().splitlines()):
        pass
    elif rc != 2:
        problems.append(f"exit code {rc} (expected 2)")
    lines = err.strip().splitlines()
    if rc == 2 and (len(lines) != 1 or not lines[0].startswith(ERROR_PREFIX[COMMANDS[case.reader]])):
        problems.append(f"stderr is not one error line: {len(lines)} lines, last {lines[-1][:150] if lines else ''!r}")
    if any(line.startswith("Traceback (most recent call last)") for line in err.splitlines()):
        problems.append("a traceback: " + next((l for l in reversed(lines) if l.strip()), "")[:150])
    return problems


class Worker:
    """A worker (library side) or zygote (command side) process fed case ids; restarted after a case that
    killed or hung it."""

    def __init__(self, workdir: Path, mode: str = "worker"):
        self.workdir = workdir
        self.mode = mode
        self.proc = None

    def _start(self) -> None:
        env = {**os.environ, **ENV}
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__)), self.mode, str(self.workdir)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, env=env, cwd=TESTS)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, args=(self.proc, self.lines), daemon=True).start()
        ready = self.lines.get(timeout=600)
        if ready is None or not json.loads(ready).get("ready"):
            raise RuntimeError("the hostile-file worker did not start")

    @staticmethod
    def _read(proc, lines) -> None:
        for line in proc.stdout:
            if line.startswith("{"):
                lines.put(line)
        lines.put(None)

    def run(self, case: Case) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        start = time.monotonic()
        self.proc.stdin.write(case.id + "\n")
        self.proc.stdin.flush()
        try:
            line = self.lines.get(timeout=CASE_SECONDS + 30)
        except queue.Empty:
            line = "hung"
        if line is None or line == "hung":
            self.proc.kill()
            self.proc.wait()
            self.proc = None
            why = f"hung: killed after {CASE_SECONDS} s" if line == "hung" else "the process died (crash or memory)"
            return {"id": case.id, "side": "library" if self.mode == "worker" else "command",
                    "seconds": round(time.monotonic() - start, 2),
                    "problems": [why], "message": ""}
        return json.loads(line)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
            self.proc = None


def run_cases(workdir: Path, cases: list[Case], jobs: int = 2, subprocesses: Iterable[str] | None = None,
              progress: Callable[[int, int, dict], None] | None = None) -> list[dict]:
    """Run every case through the library (one worker) and its command (``jobs`` zygotes).

    The cases named in ``subprocesses`` (default: all) also run their command
    as a real subprocess of the installed console script (side "subprocess").
    """
    import shutil

    (workdir / "cases.json").write_text(json.dumps([c.to_json() for c in cases]))
    real = {c.id for c in cases} if subprocesses is None else set(subprocesses)
    for c in cases:
        folder = workdir / "cases" / c.id
        if folder.exists():
            shutil.rmtree(folder)
        materialize(c, folder / "library")
        if c.reader in COMMANDS:
            materialize(c, folder / "command")
        if c.id in real and c.reader in COMMANDS:
            materialize(c, folder / "subprocess")
    markers = workdir / "markers"
    results: list[dict] = []
    lock = threading.Lock()
    commands = [c for c in cases if c.reader in COMMANDS]
    total = len(cases) + len(commands) + sum(c.id in real for c in commands)

    def record(r):
        with lock:
            results.append(r)
            if progress:
                progress(len(results), total, r)

    todo: queue.Queue = queue.Queue()
    for c in commands:
        todo.put(c)

    def library_side():
        w = Worker(workdir, "worker")
        try:
            for c in cases:
                record(w.run(c))
        finally:
            w.close()

    def command_side():
        w = Worker(workdir, "zygote")
        try:
            while True:
                try:
                    c = todo.get_nowait()
                except queue.Empty:
                    break
                record(w.run(c))
        finally:
            w.close()

    def subprocess_side():
        for c in commands:
            if c.id in real:
                r = check_cli(c, workdir / "cases" / c.id / "subprocess", markers)
                r["side"] = "subprocess"
                record(r)

    threads = [threading.Thread(target=library_side), threading.Thread(target=subprocess_side)]
    threads += [threading.Thread(target=command_side) for _ in range(max(1, jobs - 1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    by_id = {c.id: c for c in cases}
    for r in results:
        c = by_id[r["id"]]
        r.update(reader=c.reader, what=c.what, kind=c.kind)
    order = {c.id: i for i, c in enumerate(cases)}
    return sorted(results, key=lambda r: (order[r["id"]], r["side"]))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "worker":
        worker(Path(sys.argv[2]))
    elif len(sys.argv) == 3 and sys.argv[1] == "zygote":
        zygote(Path(sys.argv[2]))
    else:
        sys.exit(__doc__)
