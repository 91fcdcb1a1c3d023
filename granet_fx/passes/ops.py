"""Which graph operations carry a prunable weight, and where it sits.

A weight is a parameter that a conv, linear or matmul-family op consumes as
an operand, directly or through view-like ops (``.T``, ``transpose``,
``view``, ``x[i]``, ...): ``F.linear(x, w)``, ``x @ self.weight.T``
(Falcon's ``FalconLinear``), ``torch.bmm(self.experts[idx], x)``,
``torch.einsum("bi,oi->bo", x, w)``, grouped matmuls of mixture-of-experts
layers. The same rules serve the fx graphs (``weight_uses``) and the ops seen
while a model runs (``WeightFinder``).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

# Conv/linear call_function targets and their kind (channel compaction rewrites these calls).
WEIGHT_OPS = {
    F.conv1d: "conv1d",
    F.conv2d: "conv2d",
    F.conv3d: "conv3d",
    F.linear: "linear",
    torch.addmm: "addmm",
}
# Where an op takes its weight, when not as its second argument ``weight``:
# addmm(bias, x, weight) is how HF's GPT-2 ``Conv1D`` computes a linear layer
# with the weight laid out (in, out) instead of linear's (out, in).
WEIGHT_ARGS = {torch.addmm: (2, "mat2")}
# The modules whose forward is one of the ops above; fx traces into them.
WEIGHT_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

# Matmul-family ops by name (a torch function, a Tensor method or a call_method target): which
# positional arguments may be a weight. ``einsum`` takes its operands after the equation.
_MATMUL_ARGS = {
    "matmul": (0, 1), "__matmul__": (0, 1), "__rmatmul__": (0, 1), "mm": (0, 1), "bmm": (0, 1),
    "mv": (0, 1), "tensordot": (0, 1), "addmm": (1, 2), "baddbmm": (1, 2), "addbmm": (1, 2), "addmv": (1, 2),
    "grouped_mm": (0, 1), "_grouped_mm": (0, 1), "bilinear": (2,),
    "conv_transpose1d": (1,), "conv_transpose2d": (1,), "conv_transpose3d": (1,),
}
_MATMUL_FUNCTIONS = {torch.matmul, torch.Tensor.matmul, operator.matmul, torch.Tensor.__matmul__,
                     torch.Tensor.__rmatmul__, torch.mm, torch.Tensor.mm, torch.bmm, torch.Tensor.bmm,
                     torch.mv, torch.Tensor.mv, torch.tensordot, torch.addmm, torch.Tensor.addmm, torch.baddbmm,
                     torch.Tensor.baddbmm, torch.addbmm, torch.addmv, torch.einsum, F.bilinear,
                     F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d}
_MATMUL_FUNCTIONS |= {getattr(m, n) for m, n in ((F, "grouped_mm"), (torch, "_grouped_mm")) if hasattr(m, n)}

# Ops that give a view (or a plain copy) of their first argument: a weight read through them is still
# that weight. ``getattr`` covers the ``.T``/``.mT`` properties, ``getitem`` an expert's slice.
VIEW_OPS = {
    "t", "T", "mT", "H", "mH", "transpose", "swapaxes", "permute", "movedim", "view", "reshape",
    "contiguous", "to", "type_as", "float", "half", "bfloat16", "double", "unsqueeze", "squeeze", "expand",
    "flatten", "unflatten", "chunk", "split", "unbind", "narrow", "select", "getitem", "__getitem__",
}


def op_name(target) -> str:
    """The name of an op: a call_method target, a torch function, a property getter, an OpOverload."""
    if isinstance(target, str):
        return target
    name = getattr(target, "__name__", "")
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return name.split(".")[0]                        # "mm.default" -> "mm"
    if name == "__get__":                                # Tensor.T.__get__ and friends
        name = getattr(getattr(target, "__self__", None), "__name__", "")
    return name


def op_kind(target) -> str | None:
    """The kind of a conv/linear/matmul-family op ("conv2d", "linear", "matmul", ...), or None."""
    if target in WEIGHT_OPS:
        return WEIGHT_OPS[target]
    if target in _MATMUL_FUNCTIONS:
        return op_name(target).strip("_").replace("rmatmul", "matmul")
    if isinstance(target, str):                          # call_method
        return op_name(target).strip("_").replace("rmatmul", "matmul") if target in _MATMUL_ARGS else None
    name = op_name(target)
    if "grouped_mm" in name:                             # F.grouped_mm, transformers::grouped_mm_fallback
        return "grouped_mm"
    if target is F.multi_head_attention_forward:        # seen while running: its projections are linear
        return "linear"
    return None


# F.multi_head_attention_forward (nn.MultiheadAttention's code) computes linear layers with these arguments.
_ATTENTION_WEIGHTS = ((5, "in_proj_weight"), (11, "out_proj_weight"), (18, "q_proj_weight"),
                      (19, "k_proj_weight"), (20, "v_proj_weight"))


def weight_positions(target, args: tuple, kwargs: dict) -> list:
    """The arguments of a call to a conv/linear/matmul op that may be its weight."""
    if target in WEIGHT_OPS:
        return [weight_argument(target, args, kwargs)]
    name = op_name(target)
    if name == "multi_head_attention_forward":
        return [args[i] if len(args) > i else kwargs.get(k) for i, k in _ATTENTION_WEIGHTS]
    if name == "einsum":
        rest = args[1:]
        return list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else list(rest)
    positions = _MATMUL_ARGS.get(name, (0, 1))
    return [args[i] for i in positions if i < len(args)]


@dataclass
class WeightUse:
    """One weight op of a graph and the get_attr node that feeds its weight (maybe through views)."""

    op: fx.Node
    weight: fx.Node
    kind: str


def weight_argument(target, args: tuple, kwargs: dict):
    """The weight argument of a call to the conv/linear op ``target`` (a node or a tensor), or None."""
    index, keyword = WEIGHT_ARGS.get(target, (1, "weight"))
    return args[index] if len(args) > index else kwargs.get(keyword)


def weight_operand(node: fx.Node) -> fx.Node | None:
    """The weight argument of a conv/linear call node, or None."""
    w = weight_argument(node.target, node.args, node.kwargs)
    return w if isinstance(w, fx.Node) else None


def _source(node) -> fx.Node | None:
    """The get_attr or call_module node that ``node`` is a view of (following view-like ops back), or None."""
    while isinstance(node, fx.Node):
        if node.op in ("get_attr", "call_module"):
            return node
        if node.op not in ("call_function", "call_method") or not node.args:
            return None
        name = op_name(node.target)
        if name == "getattr":                            # x.T, x.mT
            name = node.args[1] if len(node.args) > 1 else ""
        if name not in VIEW_OPS:
            return None
        node = node.args[0]
    return None


def _parametrized(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """For the output of a parametrization (``nn.utils.parametrize``, traced through), the get_attr of
    its largest original parameter: the one shaped like the weight (weight_norm's ``original1``, not
    its norms ``original0``). None for other nodes."""
    owner, sep, rest = f".{node.target}".rpartition(".parametrizations.")
    if node.op != "call_module" or not sep:
        return None
    prefix = f"{owner}.parametrizations.{rest.split('.')[0]}.".lstrip(".")
    found, todo = {}, [node]
    while todo:             # chained parametrizations: the first one reads the originals
        n = todo.pop()
        for arg in n.args:
            if isinstance(arg, fx.Node) and arg.target.startswith(prefix):
                if arg.op == "call_module":
                    todo.append(arg)
                elif arg.op == "get_attr":
                    try:
                        found[arg] = gm.get_parameter(arg.target).numel()
                    except AttributeError:
                        pass
    if not found:
        return None
    best = max(found.values())
    largest = [n for n, size in found.items() if size == best]
    return largest[0] if len(largest) == 1 else None


def weight_uses(gm: fx.GraphModule) -> list[WeightUse]:
    """Every conv/linear/matmul op in ``gm`` with an operand that is a parameter (of two or more
    dimensions) read by get_attr, through view-like ops or a parametrization."""
    uses = []
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        kind = op_kind(node.target)
        if kind is None:
            continue
        for arg in weight_positions(node.target, node.args, node.kwargs):
            source = _source(arg)
            if source is not None and source.op == "call_module":
                source = _parametrized(gm, source)
            if source is None:
                continue
            try:
                param = gm.get_parameter(source.target)
            except AttributeError:
                continue
            if isinstance(param, nn.Parameter) and param.dim() >= 2:
                uses.append(WeightUse(node, source, kind))
    return uses


def is_weight_op(func) -> bool:
    return op_kind(func) is not None


def macs_of(output: torch.Tensor, weight: torch.Tensor, func, args: tuple = (), position: int = 1) -> int:
    """Multiply-accumulates of a weight op: one per output element per input that feeds it.

    Conv/linear weights are (out, in, ...); addmm's is (in, out); a transposed
    conv's (in, out / groups, ...) is counted per input element. A matmul
    contracts the weight's last dimension when it comes first, else its
    second-to-last; einsum contracts the weight's letters missing from the output.
    """
    kind = op_kind(func)
    if func is F.multi_head_attention_forward:         # a projection of every query token (out, in)
        return args[0].numel() // args[0].shape[-1] * weight.numel()
    if kind in ("conv1d", "conv2d", "conv3d", "linear", "bilinear"):
        fan_in = weight.numel() // weight.shape[0]
    elif kind.startswith("conv_transpose"):      # (in, out / groups, kernel): each input feeds that many
        return args[0].numel() * (weight.numel() // weight.shape[0]) if args else 0
    elif kind == "einsum":
        fan_in = _einsum_fan_in(args, weight)
    elif weight.dim() < 2:
        fan_in = weight.numel()
    else:                                                # the weight's place among the two factors
        first = position == _MATMUL_ARGS.get(op_name(func), (0, 1))[0]
        fan_in = weight.shape[-1] if first else weight.shape[-2]
    return output.numel() * fan_in


def _einsum_fan_in(args: tuple, weight: torch.Tensor) -> int:
    equation = args[0] if args and isinstance(args[0], str) else ""
    operands = weight_positions(torch.einsum, args, {})
    if "->" not in equation or "." in equation:
        return 1
    inputs, output = equation.replace(" ", "").split("->")
    terms = inputs.split(",")
    for term, operand in zip(terms, operands):
        if operand is weight and len(term) == weight.dim():
            return math.prod(size for letter, size in zip(term, weight.shape) if letter not in output)
    return 1


# The same search while a model runs ------------------------------------------------------------


@dataclass
class RuntimeUse:
    """A weight op seen while the model ran: which parameter, in which module's code, how many MACs."""

    param: nn.Parameter
    kind: str
    macs: int
    stack: tuple[nn.Module, ...]   # the modules running at the time, outermost first


class WeightFinder(TorchFunctionMode):
    """Records the parameters that conv/linear/matmul ops consume as weights, through views.

    It also keeps, for each parameter, the names of the other ops that read it,
    and the stack of the modules running (kept by ``run_module_stack``), so that a
    use in code fx could not trace can be masked where that code runs.
    """

    def __init__(self):
        super().__init__()
        self.uses: list[RuntimeUse] = []
        self.other: dict[int, set[str]] = {}     # id(param) -> names of the non-weight ops reading it
        self.params: dict[int, nn.Parameter] = {}
        self.stack: list[nn.Module] = []
        self._views: dict[int, tuple[torch.Tensor, nn.Parameter]] = {}   # id -> (view, its parameter)

    def _param_of(self, t) -> nn.Parameter | None:
        if isinstance(t, nn.Parameter):
            return t
        entry = self._views.get(id(t)) if isinstance(t, torch.Tensor) else None
        return entry[1] if entry is not None and entry[0] is t else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = op_name(func)
        if getattr(func, "__name__", "") == "__get__" and name not in VIEW_OPS:
            return out                           # x.shape, x.dtype: no computation
        kind = op_kind(func)
        weights = weight_positions(func, args, kwargs) if kind else []
        result = out[0] if isinstance(out, tuple) and out else out       # attention: (output, weights)
        for t in weights:
            param = self._param_of(t)
            if param is not None and param.dim() >= 2 and isinstance(result, torch.Tensor):
                position = next((i for i, a in enumerate(args) if a is t), 1)
                self.uses.append(RuntimeUse(param, kind, macs_of(result, t, func, args, position),
                                            tuple(self.stack)))
                self.params[id(param)] = param
        first = args[0] if args else None
        source = self._param_of(first)
        if source is not None and name in VIEW_OPS:
            for o in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(o, torch.Tensor):
                    self._views[id(o)] = (o, source)
        else:
            for a in pytree.tree_leaves((args, kwargs)):     # torch.cat takes a list
                param = self._param_of(a)
                if param is not None and not any(a is t for t in weights):
                    self.other.setdefault(id(param), set()).add(name)
                    self.params[id(param)] = param
        return out


def run_module_stack(finder: WeightFinder):
    """Global module hooks that keep ``finder.stack`` (remove both handles afterwards)."""
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    def push(module, args):
        finder.stack.append(module)

    def pop(module, args, output):
        if finder.stack and finder.stack[-1] is module:
            finder.stack.pop()

    return register_module_forward_pre_hook(push), register_module_forward_hook(pop, always_call=True)


def run_finder(model: nn.Module, inputs: tuple, grad: bool = True) -> WeightFinder:
    """Run ``model`` on ``inputs`` under a ``WeightFinder`` (modules in their current mode).

    With ``grad`` the run keeps autograd on, so that modules take their
    ordinary path (``nn.MultiheadAttention`` has a fused inference path that
    reads its weights in one op).
    """
    finder = WeightFinder()
    handles = run_module_stack(finder)
    try:
        with torch.set_grad_enabled(grad), finder:
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return finder
