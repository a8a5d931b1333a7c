"""How each operation of a traced forward is lifted to the agent axis (the tables used by lift.py).

One agent's activation is (n, *features); the block of B agents holds it in one of two layouts:

- ``S``, stacked (agent-major): (B, n, *features) — dense layers, elementwise ops, LayerNorm, shape
  ops. Parameters are ``S`` values too, (B, *shape), without a sample axis (``Val.acts`` False).
- ``G``, grouped (sample-major): (n, B·C, *spatial) — convolutions as ONE grouped convolution (the
  B agents are the groups), pooling, GroupNorm / InstanceNorm with B·G groups; elementwise ops keep it.

A value is converted only where an op needs the other layout (lift.Ctx.need). Per-agent dims map to
stacked ones by :func:`shift` (d ≥ 0 → d + 1, negative dims unchanged). ``C`` values are constants
(literals, sizes, buffers): the same for every agent. ``T`` values are tuples (what an LSTM or
attention layer returns, ``x.chunk(…)``): only indexed, their elements are values of the above.
"""

from __future__ import annotations

import math
import operator
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

S, G, C, T = "S", "G", "C", "T"


class NotLiftable(Exception):
    """Raised by a lifter: the node has no stacked form (``detail``: why, if not obvious)."""

    def __init__(self, detail: str = ""):
        super().__init__(detail)
        self.detail = detail


@dataclass(frozen=True)
class Val:
    """A node's lifted value: its slot (None: the literal ``const``) and layout."""
    slot: int | None
    kind: str                   # S, G, C or T
    acts: bool = True           # carries the sample axis (False: parameters and what only they compute)
    shape: tuple | None = None  # a parameter's per-agent shape
    const: object = None        # C: the literal; T: the elements' values where known at lift time
    param: str | None = None    # the parameter's name, for a parameter itself


def shift(d: int) -> int:
    """A per-agent dim as a dim of the stacked value."""
    return d + 1 if d >= 0 else d


# --------------------------------------------------------------------------- kernels

def _grouped(h: torch.Tensor, B: int) -> torch.Tensor:
    """(B, n, C, *spatial) → (n, B·C, *spatial) in one copy, channels-last for 2-D images (the
    convolutions' format)."""
    if h.dim() == 5:
        n, C, H, W = h.shape[1:]
        return h.permute(1, 3, 4, 0, 2).reshape(n, H, W, B * C).permute(0, 3, 1, 2)
    return h.transpose(0, 1).reshape((h.shape[1], B * h.shape[2]) + h.shape[3:]).contiguous()


def _stacked(h: torch.Tensor, B: int) -> torch.Tensor:
    """(n, B·C, *spatial) → (B, n, C, *spatial), contiguous, in one copy."""
    return h.reshape((h.shape[0], B, -1) + h.shape[2:]).transpose(0, 1).contiguous()


class _ToGrouped(torch.autograd.Function):
    """:func:`_grouped` whose gradient is :class:`_ToStacked` (and so on, for double backward)."""

    @staticmethod
    def forward(h, B):
        return _grouped(h, B)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.B = inputs[1]

    @staticmethod
    def backward(ctx, g):
        return to_stacked(g, ctx.B), None


class _ToStacked(torch.autograd.Function):
    """:func:`_stacked` whose gradient is :class:`_ToGrouped`."""

    @staticmethod
    def forward(h, B):
        return _stacked(h, B)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.B = inputs[1]

    @staticmethod
    def backward(ctx, g):
        return to_grouped(g, ctx.B), None


def to_grouped(h: torch.Tensor, B: int) -> torch.Tensor:
    """(B, n, C, *spatial) → (n, B·C, *spatial).

    Both conversions give contiguous tensors, forward and backward (and double backward): a
    transposed view's strides depend on B, and with them the kernels that a GEMM or a reduction on
    it picks — an agent's bits would depend on how many agents its rank holds. (Autograd's own
    gradient of a transpose is such a view, hence the autograd functions where a graph is built.)
    Under torch.compile the plain conversion is traced instead: measured with torch 2.13, it
    miscompiles the double backward of these autograd functions (exact HVPs off by ~1e-2)."""
    return _ToGrouped.apply(h, B) if _graph_built(h) else _grouped(h, B)


def _graph_built(h: torch.Tensor) -> bool:
    return h.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling()


def to_stacked(h: torch.Tensor, B: int) -> torch.Tensor:
    """(n, B·C, *spatial) → (B, n, C, *spatial) (contiguous, see :func:`to_grouped`)."""
    return _ToStacked.apply(h, B) if _graph_built(h) else _stacked(h, B)


def grouped_flatten(h: torch.Tensor, B: int) -> torch.Tensor:
    """flatten(1) of a grouped activation: (B, n, C·∏spatial), each agent's (C, *spatial) order kept."""
    return to_stacked(h, B).flatten(2)


def dense(w: torch.Tensor, b: torch.Tensor | None, h: torch.Tensor) -> torch.Tensor:
    """(B, n, in) → (B, n, out): h·Wᵀ + b per agent, one batched GEMM (more leading dims folded into n)."""
    if h.dim() != 3:
        out = dense(w, b, h.reshape(h.shape[0], -1, h.shape[-1]))
        return out.reshape(h.shape[:-1] + out.shape[-1:])
    if b is None:
        return torch.bmm(h, w.transpose(1, 2))
    return torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))


def conv(w, b, h, stride, padding, dilation, groups) -> torch.Tensor:
    """Per-agent convolution of grouped activations (n, B·C, *spatial) as one grouped convolution,
    channels-last for 2-D; ``w``: (B, O, C/groups, *k), ``b``: (B, O) or None.

    Measured on CPU (CNN 28×28, 8 agents, one local step, ν ∈ {0, 1}): channels-last grouped
    convolution 0.81–0.88× the time of the same in NCHW, im2col (unfold) + bmm 2.3–2.6×; the NCHW
    grouped convolution about equal to the per-agent loop.
    """
    B, O = w.shape[:2]
    w = w.reshape((B * O,) + w.shape[2:])
    b = None if b is None else b.reshape(B * O)
    if h.dim() == 4:
        cl = torch.channels_last
        return F.conv2d(h.contiguous(memory_format=cl), w.contiguous(memory_format=cl), b, stride, padding,
                        dilation, B * groups)
    return F.conv1d(h.contiguous(), w, b, stride, padding, dilation, B * groups)


def group_norm(h, groups: int, w, b, eps) -> torch.Tensor:
    """Every agent's GroupNorm(groups) of stacked h (B, n, C, *spatial), affine ``w``, ``b`` (B, C) or None.

    A LayerNorm over each group's elements, and the affine with B outermost: F.group_norm's CPU
    kernel, and any per-channel reduction over (n, B·C, ...), give an agent bits that depend on how
    many agents the call holds (B·C is one coalesced dim of the reduction), so runs would differ
    with the number of ranks."""
    shape = h.shape
    y = F.layer_norm(h.reshape(shape[:2] + (groups, -1)), (h[0, 0].numel() // groups,), None, None, eps).reshape(shape)
    if w is None and b is None:
        return y
    view = (shape[0], 1, shape[2]) + (1,) * (h.dim() - 3)
    if w is not None and b is not None:
        return torch.addcmul(b.view(view), y, w.view(view))
    return y * w.view(view) if w is not None else y + b.view(view)


def layer_norm(h, shape, w, b, eps) -> torch.Tensor:
    """LayerNorm over the last dims of stacked h with every agent's own affine parameters (B, *shape)."""
    y = F.layer_norm(h, shape, None, None, eps)
    if w is None and b is None:
        return y
    view = (h.shape[0],) + (1,) * (h.dim() - 1 - len(shape)) + tuple(shape)
    if b is None:
        return y * w.view(view)
    if w is None:
        return y + b.view(view)
    return torch.addcmul(b.view(view), y, w.view(view))


def align(a: torch.Tensor, b: torch.Tensor):
    """Two stacked values with their per-agent dims right-aligned (size-1 dims inserted after B)."""
    da, db = a.dim(), b.dim()
    if da < db:
        a = a[(slice(None),) + (None,) * (db - da)]
    elif db < da:
        b = b[(slice(None),) + (None,) * (da - db)]
    return a, b


def bmatmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Every agent's a @ b (torch.matmul's rules per agent) for stacked a, b."""
    va, vb = a.dim() == 2, b.dim() == 2           # per-agent vectors
    a = a.unsqueeze(1) if va else a
    b = b.unsqueeze(-1) if vb else b
    out = torch.matmul(*align(a, b))
    if vb:
        out = out.squeeze(-1)
    return out.squeeze(-1 if vb else -2) if va else out


def _grouped_pair(fn, a, b, B, kw):
    """fn of two grouped values: directly where both have the same channels, else through S."""
    if a.dim() == b.dim() and a.shape[1] == b.shape[1]:
        return fn(a, b, **kw)
    return to_grouped(fn(*align(to_stacked(a, B), to_stacked(b, B)), **kw), B)


def _grouped_other(fn, h, o, B, kw, swap: bool):
    """fn of grouped h and a number or constant tensor ``o`` (operands in the node's order)."""
    if not (isinstance(o, torch.Tensor) and o.dim() > 0):   # a number
        return fn(o, h, **kw) if swap else fn(h, o, **kw)
    s, o = align(to_stacked(h, B), o.unsqueeze(0))
    return to_grouped(fn(o, s, **kw) if swap else fn(s, o, **kw), B)


def grouped_cat_channels(hs, B: int) -> torch.Tensor:
    parts = [h.reshape((h.shape[0], B, -1) + h.shape[2:]) for h in hs]
    out = torch.cat(parts, 2)
    return out.reshape((out.shape[0], -1) + out.shape[3:])


def grouped_size(h: torch.Tensor, B: int, d):
    per = torch.Size((h.shape[0], h.shape[1] // B) + tuple(h.shape[2:]))
    return per if d is None else per[d]


# --------------------------------------------------------------------------- generic lifters

def bind(node, names: tuple, defaults: dict | None = None) -> dict:
    """The node's arguments by name (positional, keyword, defaults)."""
    out = dict(defaults or {})
    out.update(zip(names, node.args))
    out.update(node.kwargs)
    extra = [k for k in out if k not in names]
    if extra or len(node.args) > len(names):
        raise NotLiftable(f"argument {extra[0]!r}" if extra else "too many arguments")
    return out


def unary(fn):
    """An elementwise function of one tensor (further arguments: lift-time constants)."""
    def lifter(ctx, node):
        x = ctx.val(node.args[0])
        rest, kw = ctx.static(tuple(node.args[1:])), ctx.static(dict(node.kwargs))
        a = x.slot
        run = (lambda env, P: fn(env[a], *rest, **kw)) if rest or kw else (lambda env, P: fn(env[a]))
        return ctx.emit(run, (a,), x.kind, x.acts, x.shape)
    return lifter


def binary(fn):
    """An elementwise function of two operands (x + y, x * w, 1 - x, ...); x @ W.T + b is fused."""
    def lifter(ctx, node):
        if len(node.args) != 2:
            raise NotLiftable("not two operands")
        if fn in (operator.add, torch.add, torch.Tensor.add) and not node.kwargs:
            fused = fused_dense(ctx, node)
            if fused is not None:
                return fused
        return elementwise2(ctx, fn, ctx.val(node.args[0]), ctx.val(node.args[1]), ctx.static(dict(node.kwargs)))
    return lifter


def elementwise2(ctx, fn, a: Val, b: Val, kw: dict) -> Val:
    """fn(a, b) for every combination of layouts: S with S, G with G (an S activation is grouped
    first), an activation with a parameter (in S) or a constant."""
    if G in (a.kind, b.kind) and S in (a.kind, b.kind) and not (a.acts and b.acts):
        a, b = ctx.need(a, S), ctx.need(b, S)      # with a parameter: in the stacked layout (B outermost)
    if G in (a.kind, b.kind):
        a = ctx.need(a, G) if a.kind == S and a.acts else a
        b = ctx.need(b, G) if b.kind == S and b.acts else b
    kind, acts = (G if G in (a.kind, b.kind) else S), a.acts or b.acts
    if a.kind == b.kind:
        ia, ib = a.slot, b.slot
        if kind == S:
            run = (lambda env, P: fn(*align(env[ia], env[ib]), **kw))
        else:
            run = (lambda env, P: _grouped_pair(fn, env[ia], env[ib], env[0], kw))
        return ctx.emit(run, (ia, ib), kind, acts)
    swap = a.kind != kind
    m, o = (b, a) if swap else (a, b)
    im, io, oc = m.slot, o.slot, o.const
    if kind == G:
        def run(env, P):
            return _grouped_other(fn, env[im], oc if io is None else env[io], env[0], kw, swap)
    elif io is None and not isinstance(oc, torch.Tensor):      # a number
        run = (lambda env, P: fn(oc, env[im], **kw)) if swap else (lambda env, P: fn(env[im], oc, **kw))
    else:                                                     # a constant tensor: the same for every agent
        def run(env, P):
            c = oc if io is None else env[io]
            h, c = align(env[im], c.unsqueeze(0)) if isinstance(c, torch.Tensor) else (env[im], c)
            return fn(c, h, **kw) if swap else fn(h, c, **kw)
    return ctx.emit(run, (im,) if io is None else (im, io), kind, acts)


def identity(ctx, node, *_):
    return ctx.val(node.args[0])


def constant(ctx, node) -> Val:
    """A node computed from constants only (sizes, literals, buffers): the same for every agent."""
    fn = node.target if node.op == "call_function" else None
    get, ins = ctx.dyn((node.args, node.kwargs))
    if not ins and node.op == "call_function" and fn.__module__ in ("_operator", "math"):
        args, kw = get(None)
        return Val(None, C, False, const=fn(*args, **kw))     # folded at lift time
    name = node.target

    def run(env, P):
        args, kw = get(env)
        if fn is not None:
            return fn(*args, **kw)
        return getattr(args[0], name)(*args[1:], **kw)
    return ctx.emit(run, ins, C, False)


# --------------------------------------------------------------------------- naming (reasons)

_NAMES: dict[int, str] = {}


def fn_name(fn) -> str:
    """A function as a user writes it: torch.sort, F.relu, operator.add."""
    if not _NAMES:
        for prefix, mod in (("operator", operator), ("math", math), ("torch", torch), ("F", F)):
            for name in dir(mod):
                obj = getattr(mod, name, None)
                if callable(obj) and not name.startswith("_"):
                    _NAMES[id(obj)] = f"{prefix}.{name}"
    return _NAMES.get(id(fn)) or f"{getattr(fn, '__module__', None) or '?'}.{getattr(fn, '__name__', repr(fn))}"


def class_name(cls: type) -> str:
    mod = cls.__module__ or ""
    return f"nn.{cls.__name__}" if mod.startswith("torch.nn") else f"{mod}.{cls.__qualname__}"


def dropout_args(node):
    """(p, training) of a functional dropout node (literals where the trace made them constants)."""
    args = dict(zip(("input", "p", "training"), node.args))
    args.update(node.kwargs)
    default_training = node.target is not torch.dropout
    return args.get("p", 0.5), bool(args.get("training", args.get("train", default_training)))


def attribute_of_model(ctx, node) -> Val:
    """get_attr: a parameter (read from the stacked params), a buffer or constant (shared by agents)."""
    owner_path, _, attr = node.target.rpartition(".")
    owner = ctx.model.get_submodule(owner_path)
    obj = getattr(owner, attr)
    if isinstance(obj, nn.Parameter):
        name = ctx.pname(obj)
        return ctx.emit(lambda env, P: P[name], (), S, False, tuple(obj.shape), param=name)
    if isinstance(obj, torch.Tensor):
        ref = weakref.ref(owner)            # the lift cache must not keep the model alive
        return ctx.emit(lambda env, P: getattr(ref(), attr), (), C, False)
    return Val(None, C, False, const=obj)



# --------------------------------------------------------------------------- x @ W.T + b

_MATMULS = {operator.matmul, torch.matmul}


def _is_matmul(n) -> bool:
    return isinstance(n, fx.Node) and len(n.args) == 2 and not n.kwargs and (
        (n.op == "call_function" and n.target in _MATMULS) or (n.op == "call_method" and n.target == "matmul"))


def _transposed_weight(ctx, n) -> Val | None:
    """The value of W where node ``n`` computes W.T of a 2-D parameter W, else None."""
    if not isinstance(n, fx.Node):
        return None
    if n.op == "call_function" and n.target is getattr and n.args[1] in ("T", "mT"):
        src = n.args[0]
    elif n.op == "call_method" and n.target == "t" and len(n.args) == 1:
        src = n.args[0]
    elif ((n.op == "call_method" and n.target == "transpose") or (n.op == "call_function" and n.target is torch.transpose)) \
            and len(n.args) == 3 and sorted(n.args[1:]) in ([0, 1], [-2, -1]):
        src = n.args[0]
    else:
        return None
    v = ctx.vals.get(src) if isinstance(src, fx.Node) else None
    return v if v is not None and v.param and len(v.shape) == 2 else None


def fused_dense(ctx, node) -> Val | None:
    """``x @ W.T + b`` (a hand-written linear layer) as the same batched GEMM as nn.Linear."""
    for mm, bias in ((node.args[0], node.args[1]), (node.args[1], node.args[0])):
        if not _is_matmul(mm) or len(mm.users) != 1 or not isinstance(mm.args[0], fx.Node):
            continue
        w, x = _transposed_weight(ctx, mm.args[1]), ctx.vals[mm.args[0]]
        b = ctx.vals.get(bias) if isinstance(bias, fx.Node) else None
        if w is None or b is None or not b.param or b.shape != w.shape[:1] or not x.acts:
            continue
        a, wn, bn = ctx.need(x, S).slot, w.param, b.param
        return ctx.emit(lambda env, P: dense(P[wn], P[bn], env[a]), (a,), S, True)
    return None
