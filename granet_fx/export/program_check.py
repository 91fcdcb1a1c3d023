"""Checks on the parts of a ``torch.export`` archive that ``torch.export.load`` would turn into code.

``torch.export.load`` hands every symbolic size (``expr_str``) to
``sympy.sympify``, which evaluates Python; resolves each node's ``target``
by name under ``torch``, ``operator`` and ``math``; ``exec``s the program's
``guards_code`` when a module is built; and unpickles payloads marked
``use_pickle``. These functions check those parts of the graph JSON and of the
weight and constant configs against what ``gf.save`` writes, so that a crafted
archive is refused before torch parses it. Each raises ``ProgramProblem``.
"""

from __future__ import annotations

import io
import json
import math
import re
import tokenize
from typing import Any, Iterator

MAX_DEPTH = 200                  # nesting of the graph JSON; torch.export writes about 20
MAX_JSON_BYTES = 512 << 20
MAX_EXPR_CHARS = 2000
MAX_EXPR_DEPTH = 32

# The sympy names that torch.export writes in symbolic sizes (sympy's srepr and
# torch's own integer functions); nothing else may be called.
SYMPY_FUNCTIONS = frozenset({
    "Symbol", "Integer", "Rational", "Add", "Mul", "Max", "Min", "Abs", "Mod", "PythonMod",
    "FloorDiv", "CleanDiv", "CeilDiv", "ModularIndexing", "IntTrueDiv", "FloatTrueDiv",
    "TruncToInt", "FloorToInt", "CeilToInt", "RoundToInt", "ToFloat", "Identity",
    "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "Equality", "Unequality", "StrictLessThan",
    "StrictGreaterThan", "LessThan", "GreaterThan", "And", "Or", "Not",
})
SYMPY_CONSTANTS = frozenset({"True", "False", "true", "false", "oo", "S"})
SYMBOL_KEYWORDS = frozenset({"integer", "positive", "nonnegative", "negative", "real", "finite", "nonzero",
                             "zero", "commutative", "evaluate"})
_SYMBOL_NAME = re.compile(r"[a-z]{1,4}\d{1,9}")
_STRING = re.compile(r"'[a-z]{1,4}\d{1,9}'")

# Node targets: ATen and prims operators by name, and a few Python functions on sizes.
_OP_TARGET = re.compile(r"torch\.ops\.(aten|prims|granet_fx)\.[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)?")
PYTHON_TARGETS = frozenset(
    [f"_operator.{n}" for n in ("getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "neg", "pos", "pow",
                                "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "xor", "not_", "abs", "invert")]
    + [f"math.{n}" for n in ("ceil", "floor", "trunc", "sqrt")]
    + [f"torch.{n}" for n in ("sym_int", "sym_float", "sym_max", "sym_min", "sym_not", "sym_ite", "sym_sqrt",
                              "sym_sum", "_sym_sqrt")]
    + [f"torch.ops.higher_order.{n}" for n in ("wrap_with_set_grad_enabled", "wrap_with_autocast")]
)
# Pytree types that may describe inputs and outputs: gf.save stores them flat.
SPEC_TYPES = frozenset({None, "builtins.tuple", "builtins.list", "builtins.dict"})

# Payload dtypes (torch.export's ScalarType numbers) and their element sizes.
ELEMENT_SIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 2, 7: 4, 8: 8, 12: 1, 13: 2}
STRIDED = 7


class ProgramProblem(ValueError):
    """A part of the archive that ``gf.save`` would not have written; the message says which."""


def parse_json(data: bytes, what: str, *, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """``data`` as JSON, with its size and nesting bounded; ``ProgramProblem`` naming ``what`` otherwise."""
    if len(data) > max_bytes:
        raise ProgramProblem(f"{what} is {len(data):,} bytes of JSON, more than the {max_bytes:,} allowed")
    try:
        value = json.loads(data)
    except RecursionError:
        raise ProgramProblem(f"{what} is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ProgramProblem(f"{what} is not JSON ({e})") from None
    for _, depth in walk(value):
        if depth > MAX_DEPTH:
            raise ProgramProblem(f"{what} is nested more than {MAX_DEPTH} levels deep")
    return value


def walk(value: Any) -> Iterator[tuple[Any, int]]:
    """Every dict, list and scalar inside a JSON value, with its depth (iteratively: no recursion limit)."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        yield item, depth
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)


def check_program(program: dict) -> None:
    """Refuse a graph JSON whose symbolic sizes, targets, guards or pytree specs could run code."""
    if not isinstance(program, dict) or not isinstance(program.get("graph_module"), dict):
        raise ProgramProblem("the program JSON has no graph_module")
    if program.get("guards_code"):
        raise ProgramProblem("the program carries guard code, which gf.save never writes")
    for item, _ in walk(program):
        if not isinstance(item, dict):
            continue
        if "expr_str" in item:
            check_expression(item["expr_str"])
        if "target" in item:
            check_target(item["target"])
        for key in ("in_spec", "out_spec"):
            if key in item:
                check_spec(item[key], key)
    ranges = program.get("range_constraints", {})
    if not isinstance(ranges, dict) or not all(_SYMBOL_NAME.fullmatch(k) for k in ranges):
        raise ProgramProblem("the program's range constraints name something other than size symbols")


def check_expression(text: Any) -> None:
    """Accept only sympy expressions made of size symbols, integers, arithmetic and ``SYMPY_FUNCTIONS``."""
    if not isinstance(text, str) or not text or len(text) > MAX_EXPR_CHARS:
        raise ProgramProblem(f"a symbolic size is not a short expression: {str(text)[:80]!r}")
    try:
        tokens = [t for t in tokenize.generate_tokens(io.StringIO(text).readline)
                  if t.type not in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER)]
    except (tokenize.TokenError, SyntaxError, IndentationError):
        raise ProgramProblem(f"a symbolic size does not parse: {text[:80]!r}") from None
    depth = 0
    for i, tok in enumerate(tokens):
        nxt = tokens[i + 1].string if i + 1 < len(tokens) else ""
        prev = tokens[i - 1].string if i else ""
        ok = False
        if tok.type == tokenize.NAME:
            if nxt == "(":
                ok = tok.string in SYMPY_FUNCTIONS
            elif nxt == "=":
                ok = tok.string in SYMBOL_KEYWORDS
            else:
                ok = tok.string in SYMPY_CONSTANTS or bool(_SYMBOL_NAME.fullmatch(tok.string))
        elif tok.type == tokenize.NUMBER:
            ok = bool(re.fullmatch(r"\d{1,19}", tok.string))
        elif tok.type == tokenize.STRING:
            ok = prev == "(" and i >= 2 and tokens[i - 2].string == "Symbol" and bool(_STRING.fullmatch(tok.string))
        elif tok.type == tokenize.OP:
            ok = tok.string in {"(", ")", ",", "=", "+", "-", "*", "/", "//", "%", "<", ">", "<=", ">=", "==", "!="}
            depth += {"(": 1, ")": -1}.get(tok.string, 0)
            ok = ok and 0 <= depth <= MAX_EXPR_DEPTH
        if not ok:
            raise ProgramProblem(f"a symbolic size holds {tok.string!r}, which torch.export never writes: {text[:80]!r}")
    if depth:
        raise ProgramProblem(f"a symbolic size has unbalanced parentheses: {text[:80]!r}")


def check_target(target: Any) -> None:
    """Accept existing ATen/prims operators, granet_fx's own (masked_layer_norm) and the few Python functions
    on sizes that graphs call."""
    if not isinstance(target, str) or not (_OP_TARGET.fullmatch(target) or target in PYTHON_TARGETS):
        raise ProgramProblem(f"the graph calls {str(target)[:100]!r}, which is not a standard ATen operator")
    if _OP_TARGET.fullmatch(target) and not _op_exists(target):
        raise ProgramProblem(f"the graph calls {target[:100]!r}, which this torch does not have")


def _op_exists(target: str) -> bool:
    import torch

    _, _, namespace, name, *overload = target.split(".")
    try:
        packet = getattr(getattr(torch.ops, namespace), name)
        return not overload or overload[0] in packet.overloads()
    except (AttributeError, RuntimeError):
        return False


def check_spec(spec: Any, what: str) -> None:
    """Accept pytree specs of plain tuples, lists, dicts and tensors only."""
    try:
        parsed = json.loads(spec) if isinstance(spec, str) else None
    except (ValueError, RecursionError):
        parsed = None
    if not (isinstance(parsed, list) and len(parsed) == 2):
        raise ProgramProblem(f"the program's {what} is not a pytree spec")
    for item, _ in walk(parsed[1]):
        if isinstance(item, dict) and "type" in item and item["type"] not in SPEC_TYPES:
            raise ProgramProblem(f"the program's {what} holds the type {str(item['type'])[:80]!r}; "
                                 "gf.save stores inputs and outputs as plain tensors")


def check_payloads(config: Any, records: dict[str, int], what: str) -> None:
    """Check a weights or constants config against the sizes of the records it points at.

    Every payload must be raw bytes (never pickled), a known dtype, strided on
    the CPU, and laid out densely inside its record; each record must be
    exactly covered, so an empty, short or padded record is refused.
    """
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise ProgramProblem(f"{what} is not a payload config")
    extent: dict[str, int] = {}
    for fqn, meta in entries.items():
        where = f"{what}: {str(fqn)[:80]!r}"
        if not isinstance(meta, dict) or meta.get("use_pickle") is not False:
            raise ProgramProblem(f"{where} is pickled, which gf.save never writes")
        name, tm = meta.get("path_name"), meta.get("tensor_meta")
        if not isinstance(name, str) or name not in records:
            raise ProgramProblem(f"{where} points at {str(name)[:80]!r}, which the archive does not hold")
        if not isinstance(tm, dict):
            raise ProgramProblem(f"{where} has no tensor description")
        size = ELEMENT_SIZE.get(tm.get("dtype"))
        if size is None or tm.get("layout") != STRIDED or (tm.get("device") or {}).get("type") != "cpu":
            raise ProgramProblem(f"{where} is not a strided CPU tensor of a supported dtype")
        shape, strides = _ints(tm.get("sizes"), where), _ints(tm.get("strides"), where)
        offset = _ints([tm.get("storage_offset")], where)[0]
        if len(shape) != len(strides):
            raise ProgramProblem(f"{where} has {len(shape)} sizes but {len(strides)} strides")
        if not _dense(shape, strides):
            raise ProgramProblem(f"{where} has strides {strides} that do not lay out its shape {shape} densely")
        numel = math.prod(shape)
        if records[name] % size:
            raise ProgramProblem(f"{where}: its record {name} is not a whole number of elements")
        end = (offset + numel) * size if numel else 0
        if end > records[name]:
            raise ProgramProblem(f"{where} needs {end} bytes but its record {name} holds {records[name]}")
        extent[name] = max(extent.get(name, 0), end)
    for name, end in extent.items():
        if end != records[name]:
            raise ProgramProblem(f"{what}: record {name} holds {records[name]} bytes, its tensors use {end}")


def _ints(values: Any, where: str) -> list[int]:
    if not isinstance(values, list) or not all(isinstance(v, dict) and set(v) == {"as_int"} for v in values):
        raise ProgramProblem(f"{where} has symbolic or malformed sizes")
    out = [v["as_int"] for v in values]
    if not all(type(v) is int and 0 <= v < 2 ** 40 for v in out):
        raise ProgramProblem(f"{where} has sizes out of range")
    return out


def _dense(shape: list[int], strides: list[int]) -> bool:
    """Whether the strides lay the shape out without gaps or overlaps (any order of dimensions)."""
    dims = sorted((st, n) for n, st in zip(shape, strides) if n > 1)
    expected = 1
    for stride, n in dims:
        if stride != expected:
            return False
        expected *= n
    return True
