"""Lifters of layers, shape ops and reductions, and the tables lift.py dispatches on: a module's
class (``MODULES``), a function (``FUNCTIONS``), a Tensor method (``METHODS``) → lifter(ctx, node[,
module]) → the node's lifted value. Layouts and kernels: liftops.py.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from .liftops import (C, G, S, NotLiftable, Val, bind, binary, bmatmul, conv, dense, grouped_cat_channels,
                      grouped_flatten, grouped_size, group_norm, identity, layer_norm, shift, unary)


def _get(env, s):
    return None if s is None else env[s]


def _param_slots(ctx, *args) -> list:
    """The slots of parameter arguments (None stays None); NotLiftable for anything else."""
    out = []
    for arg in args:
        v = None if arg is None else ctx.val(arg)
        if v is not None and (v.kind != S or v.acts):
            raise NotLiftable("a weight that is not a parameter")
        out.append(None if v is None else v.slot)
    return out


def _slots(*slots) -> tuple:
    return tuple(s for s in slots if s is not None)


# --------------------------------------------------------------------------- layers

def linear_module(ctx, node, m):
    a = ctx.need(ctx.val(node.args[0]), S).slot
    wn, bn = ctx.pname(m.weight), ctx.pname(m.bias)
    if bn is None:
        return ctx.emit(lambda env, P: dense(P[wn], None, env[a]), (a,))
    return ctx.emit(lambda env, P: dense(P[wn], P[bn], env[a]), (a,))


def linear_function(ctx, node):
    a = bind(node, ("input", "weight", "bias"), {"bias": None})
    x = ctx.need(ctx.val(a["input"]), S).slot
    w, b = _param_slots(ctx, a["weight"], a["bias"])
    return ctx.emit(lambda env, P: dense(env[w], _get(env, b), env[x]), _slots(x, w, b))


def conv_module(ctx, node, m):
    x = ctx.need(ctx.val(node.args[0]), G).slot
    wn, bn, mode = ctx.pname(m.weight), ctx.pname(m.bias), m.padding_mode
    pad, padding = (None, m.padding) if mode == "zeros" else (m._reversed_padding_repeated_twice, 0)
    args = (m.stride, padding, m.dilation, m.groups)

    def run(env, P):
        h = env[x] if pad is None else F.pad(env[x], pad, mode=mode)
        return conv(P[wn], None if bn is None else P[bn], h, *args)
    return ctx.emit(run, (x,), G)


def conv_function(ctx, node):
    a = bind(node, ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
             {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1})
    x = ctx.need(ctx.val(a["input"]), G).slot
    w, b = _param_slots(ctx, a["weight"], a["bias"])
    args = ctx.static((a["stride"], a["padding"], a["dilation"], a["groups"]))
    return ctx.emit(lambda env, P: conv(env[w], _get(env, b), env[x], *args), _slots(x, w, b), G)


def _pool(ctx, x: Val, fn) -> Val:
    """A per-channel op (pooling): on grouped values directly, on stacked ones with (B, n) folded."""
    a = x.slot
    if x.kind == G:
        return ctx.emit(lambda env, P: fn(env[a]), (a,), G)
    if x.kind != S or not x.acts:
        raise NotLiftable("not an activation")

    def run(env, P):
        h = env[a]
        out = fn(h.flatten(0, 1))
        return out.reshape(h.shape[:2] + out.shape[1:])
    return ctx.emit(run, (a,), S)


def pool_module(ctx, node, m):
    if getattr(m, "return_indices", False):
        raise NotLiftable("return_indices")
    return _pool(ctx, ctx.val(node.args[0]), m.forward)


def pool_function(fn):
    def lifter(ctx, node):
        rest, kw = ctx.static(tuple(node.args[1:])), ctx.static(dict(node.kwargs))
        if kw.get("return_indices") or (len(rest) >= 6 and rest[5] is True):
            raise NotLiftable("return_indices")
        return _pool(ctx, ctx.val(node.args[0]), lambda h: fn(h, *rest, **kw))
    return lifter


def group_norm_module(ctx, node, m):
    """GroupNorm, and InstanceNorm as GroupNorm with one channel per group (liftops.group_norm)."""
    x = _activation(ctx, node.args[0])
    wn, bn, eps = ctx.pname(m.weight), ctx.pname(m.bias), m.eps
    groups = m.num_features if isinstance(m, nn.modules.instancenorm._InstanceNorm) else m.num_groups
    return ctx.emit(lambda env, P: group_norm(env[x], groups, _get(P, wn), _get(P, bn), eps), (x,))


def group_norm_function(ctx, node):
    a = bind(node, ("input", "num_groups", "weight", "bias", "eps"), {"weight": None, "bias": None, "eps": 1e-5})
    x = _activation(ctx, a["input"])
    w, b = _param_slots(ctx, a["weight"], a["bias"])
    groups, eps = ctx.static((a["num_groups"], a["eps"]))
    return ctx.emit(lambda env, P: group_norm(env[x], groups, _get(env, w), _get(env, b), eps), _slots(x, w, b))


def _activation(ctx, arg) -> int:
    """The slot of an activation argument in the stacked layout."""
    v = ctx.val(arg)
    if not v.acts:
        raise NotLiftable("not an activation")
    return ctx.need(v, S).slot


def layer_norm_module(ctx, node, m):
    x = ctx.need(ctx.val(node.args[0]), S).slot
    wn, bn, shape, eps = ctx.pname(m.weight), ctx.pname(m.bias), tuple(m.normalized_shape), m.eps
    return ctx.emit(lambda env, P: layer_norm(env[x], shape, _get(P, wn), _get(P, bn), eps), (x,))


def layer_norm_function(ctx, node):
    a = bind(node, ("input", "normalized_shape", "weight", "bias", "eps"), {"weight": None, "bias": None, "eps": 1e-5})
    x = ctx.need(ctx.val(a["input"]), S).slot
    w, b = _param_slots(ctx, a["weight"], a["bias"])
    shape, eps = ctx.static((a["normalized_shape"], a["eps"]))
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    return ctx.emit(lambda env, P: layer_norm(env[x], shape, _get(env, w), _get(env, b), eps), _slots(x, w, b))


def elementwise_module(ctx, node, m):
    x, fn = ctx.val(node.args[0]), m.forward
    a = x.slot
    return ctx.emit(lambda env, P: fn(env[a]), (a,), x.kind, x.acts, x.shape)


# --------------------------------------------------------------------------- shape ops

def _flatten(ctx, x: Val, start: int, end: int) -> Val:
    if x.kind == G and start == 1 and end == -1:
        a = x.slot
        return ctx.emit(lambda env, P: grouped_flatten(env[a], env[0]), (a,))
    x = ctx.need(x, S)
    a, s, e = x.slot, shift(start), shift(end)
    return ctx.emit(lambda env, P: env[a].flatten(s, e), (a,), S, x.acts)


def flatten_module(ctx, node, m):
    return _flatten(ctx, ctx.val(node.args[0]), m.start_dim, m.end_dim)


def flatten_call(ctx, node):
    a = bind(node, ("input", "start_dim", "end_dim"), {"start_dim": 0, "end_dim": -1})
    return _flatten(ctx, ctx.val(a["input"]), *ctx.static((a["start_dim"], a["end_dim"])))


def unflatten_module(ctx, node, m):
    x = ctx.need(ctx.val(node.args[0]), S)
    a, d, sizes = x.slot, shift(m.dim), tuple(m.unflattened_size)
    return ctx.emit(lambda env, P: env[a].unflatten(d, sizes), (a,), S, x.acts)


def reshape_call(ctx, node):
    """view / reshape: the target shape is every agent's (sizes may be computed, e.g. x.size(0))."""
    x = ctx.need(ctx.val(node.args[0]), S)
    shape = node.kwargs.get("shape", node.args[1] if len(node.args) == 2 else tuple(node.args[1:]))
    get, ins = ctx.dyn(shape)
    a = x.slot

    def run(env, P):
        h, s = env[a], get(env)
        return h.reshape((h.shape[0],) + (tuple(s) if isinstance(s, (tuple, list)) else (s,)))
    return ctx.emit(run, (a,) + ins, S, x.acts)


def _size(ctx, x: Val, d) -> Val:
    if x.kind == S and not x.acts and x.shape is not None:
        return Val(None, C, False, const=torch.Size(x.shape) if d is None else x.shape[d])
    a = x.slot
    if x.kind == G:
        run = lambda env, P: grouped_size(env[a], env[0], d)  # noqa: E731
    elif d is None:
        run = lambda env, P: env[a].shape[1:]  # noqa: E731
    else:
        sd = shift(d)
        run = lambda env, P: env[a].shape[sd]  # noqa: E731
    return ctx.emit(run, (a,), C, False)


def size_call(ctx, node):
    a = bind(node, ("input", "dim"), {"dim": None})
    return _size(ctx, ctx.val(a["input"]), ctx.static(a["dim"]))


def dim_call(ctx, node):
    x = ctx.val(node.args[0])
    a, extra = x.slot, 1 if x.kind == S else 0
    return ctx.emit(lambda env, P: env[a].dim() - extra, (a,), C, False)


def _on_stacked(ctx, x: Val, fn) -> Val:
    x = ctx.need(x, S)
    a = x.slot
    return ctx.emit(lambda env, P: fn(env[a]), (a,), S, x.acts)


def attribute(ctx, node):
    """getattr(x, name) of a traced value: shape, T, mT, ndim, dtype, device."""
    x, name = ctx.val(node.args[0]), node.args[1]
    if name == "shape":
        return _size(ctx, x, None)
    if name == "T":
        return _on_stacked(ctx, x, lambda h: h.permute((0,) + tuple(range(h.dim() - 1, 0, -1))))
    if name == "mT":
        return _on_stacked(ctx, x, lambda h: h.transpose(-2, -1))
    if name == "ndim":
        return dim_call(ctx, node)
    if name not in ("dtype", "device", "is_cuda"):
        raise NotLiftable(f"attribute '{name}'")
    a = x.slot
    return ctx.emit(lambda env, P: getattr(env[a], name), (a,), C, False)


def t_call(ctx, node):
    return _on_stacked(ctx, ctx.val(node.args[0]), lambda h: h.transpose(1, 2) if h.dim() == 3 else h)


def transpose_call(ctx, node):
    a = bind(node, ("input", "dim0", "dim1"))
    d0, d1 = (shift(d) for d in ctx.static((a["dim0"], a["dim1"])))
    return _on_stacked(ctx, ctx.val(a["input"]), lambda h: h.transpose(d0, d1))


def permute_call(ctx, node):
    dims = ctx.static(node.kwargs.get("dims", node.args[1:]))
    dims = tuple(dims[0]) if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else tuple(dims)
    return _on_stacked(ctx, ctx.val(node.args[0]),
                       lambda h: h.permute((0,) + tuple(d + 1 if d >= 0 else d + h.dim() for d in dims)))


def unsqueeze_call(ctx, node):
    a = bind(node, ("input", "dim"))
    d = shift(ctx.static(a["dim"]))
    return _on_stacked(ctx, ctx.val(a["input"]), lambda h: h.unsqueeze(d))


def squeeze_call(ctx, node):
    a = bind(node, ("input", "dim"), {"dim": None})
    d = ctx.static(a["dim"])
    if d is None:
        return _on_stacked(ctx, ctx.val(a["input"]), lambda h: h.squeeze(tuple(range(1, h.dim()))))
    d = shift(d) if isinstance(d, int) else tuple(shift(k) for k in d)
    return _on_stacked(ctx, ctx.val(a["input"]), lambda h: h.squeeze(d))


def getitem_call(ctx, node):
    x, idx = ctx.val(node.args[0]), ctx.static(node.args[1])
    idx = idx if isinstance(idx, tuple) else (idx,)
    if any(isinstance(i, (torch.Tensor, list, bool)) for i in idx):
        raise NotLiftable("advanced indexing")
    full = (slice(None),) + idx
    return _on_stacked(ctx, x, lambda h: h[full])


def cat_call(ctx, node):
    a = bind(node, ("tensors", "dim"), {"dim": 0})
    vals, d = [ctx.val(t) for t in a["tensors"]], ctx.static(a["dim"])
    if any(v.kind == C for v in vals) or len({v.acts for v in vals}) > 1:
        raise NotLiftable("of activations with parameters or constants")
    if vals[0].acts and d == 0:
        raise NotLiftable("along the sample dimension")
    if all(v.kind == G for v in vals) and d >= 1:
        slots = [v.slot for v in vals]
        if d == 1:
            return ctx.emit(lambda env, P: grouped_cat_channels([env[s] for s in slots], env[0]), slots, G)
        return ctx.emit(lambda env, P: torch.cat([env[s] for s in slots], d), slots, G)
    slots, sd = [ctx.need(v, S).slot for v in vals], shift(d)
    return ctx.emit(lambda env, P: torch.cat([env[s] for s in slots], sd), slots, S, vals[0].acts)


def matmul_call(ctx, node):
    """Every agent's a @ b; a constant operand (the same for every agent) is broadcast."""
    vals = [ctx.val(v) for v in node.args[:2]]
    if len(node.args) != 2 or any(v.kind == C and v.slot is None for v in vals):
        raise NotLiftable("not two tensors")
    (ia, ca), (ib, cb) = [(ctx.need(v, S).slot if v.kind == G else v.slot, v.kind == C) for v in vals]

    def run(env, P):
        a, b = env[ia], env[ib]
        return bmatmul(a.unsqueeze(0) if ca else a, b.unsqueeze(0) if cb else b)
    return ctx.emit(run, (ia, ib), S, vals[0].acts or vals[1].acts)


# --------------------------------------------------------------------------- reductions

def reduction(fn):
    """mean / sum / amax / amin / logsumexp over feature dims (never the sample one)."""
    def lifter(ctx, node):
        a = bind(node, ("input", "dim", "keepdim", "dtype"), {"dim": None, "keepdim": False})
        x, dim, keep = ctx.val(a["input"]), ctx.static(a["dim"]), ctx.static(a["keepdim"])
        kw = {"dtype": ctx.static(a["dtype"])} if "dtype" in a else {}
        dims = None if dim is None or dim == () or dim == [] else (dim,) if isinstance(dim, int) else tuple(dim)
        ia = x.slot
        if dims is None:
            if x.acts:
                raise NotLiftable("over every dimension, the sample one included")
            return ctx.emit(lambda env, P: fn(env[ia], tuple(range(1, env[ia].dim())), keep, **kw), (ia,), S, False)
        if x.acts and 0 in dims:
            raise NotLiftable("over the sample dimension")
        if x.kind == G and all(d >= 2 for d in dims):
            return ctx.emit(lambda env, P: fn(env[ia], dims, keep, **kw), (ia,), G)
        sd = tuple(shift(d) for d in dims)
        return _on_stacked(ctx, x, lambda h: fn(h, sd, keep, **kw))
    return lifter


def _along(ctx, x: Val, fn, d, kw) -> Val:
    if d is None:
        raise NotLiftable("without dim")
    if x.acts and d == 0:
        raise NotLiftable("over the sample dimension")
    if x.kind == G and d >= 2:
        a = x.slot
        return ctx.emit(lambda env, P: fn(env[a], d, **kw), (a,), G)
    sd = shift(d)
    return _on_stacked(ctx, x, lambda h: fn(h, sd, **kw))


def along_dim(fn):
    """softmax / log_softmax along a feature dim."""
    def lifter(ctx, node):
        a = bind(node, ("input", "dim", "_stacklevel", "dtype"), {"dim": None})
        kw = {"dtype": ctx.static(a["dtype"])} if "dtype" in a else {}
        return _along(ctx, ctx.val(a["input"]), fn, ctx.static(a["dim"]), kw)
    return lifter


def softmax_module(ctx, node, m):
    fn = F.log_softmax if isinstance(m, nn.LogSoftmax) else F.softmax
    return _along(ctx, ctx.val(node.args[0]), fn, m.dim, {})


# --------------------------------------------------------------------------- tables

_ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.LeakyReLU,
                        nn.Softplus, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.LogSigmoid,
                        nn.Softsign, nn.Tanhshrink, nn.Softshrink, nn.Hardshrink, nn.Threshold)
_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                 nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.LPPool1d, nn.LPPool2d)
_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)

MODULES = {nn.Linear: linear_module, nn.Conv1d: conv_module, nn.Conv2d: conv_module, nn.LayerNorm: layer_norm_module,
           nn.GroupNorm: group_norm_module, nn.InstanceNorm1d: group_norm_module,
           nn.InstanceNorm2d: group_norm_module, nn.Flatten: flatten_module, nn.Unflatten: unflatten_module,
           nn.Identity: identity, nn.Softmax: softmax_module, nn.LogSoftmax: softmax_module,
           **{t: elementwise_module for t in _ELEMENTWISE_MODULES}, **{t: pool_module for t in _POOL_MODULES},
           **{t: identity for t in _DROPOUT_MODULES}}     # dropout with p > 0 is refused before (lift.Refused)

_UNARY_F = ("relu", "relu6", "elu", "selu", "celu", "gelu", "silu", "mish", "leaky_relu", "softplus", "tanh", "sigmoid",
            "hardtanh", "hardswish", "hardsigmoid", "logsigmoid", "softsign", "tanhshrink", "softshrink", "hardshrink",
            "threshold")
_UNARY_TORCH = ("relu", "tanh", "sigmoid", "exp", "log", "log1p", "expm1", "abs", "sqrt", "rsqrt", "square", "sin",
                "cos", "erf", "neg", "reciprocal", "clamp", "clip")
_UNARY_METHODS = _UNARY_TORCH + ("clamp_min", "clamp_max", "float", "double", "to", "clone")
_BINARY = {operator.add: "add", operator.sub: "sub", operator.mul: "mul", operator.truediv: "div",
           operator.pow: "pow", torch.maximum: "maximum", torch.minimum: "minimum"}
_BINARY_TORCH = ("add", "sub", "mul", "div", "true_divide", "pow", "maximum", "minimum")
_POOLS_F = ("max_pool1d", "max_pool2d", "avg_pool1d", "avg_pool2d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
            "adaptive_max_pool1d", "adaptive_max_pool2d", "lp_pool1d", "lp_pool2d")
_DROPOUTS_F = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout, torch.dropout)
_REDUCTIONS = ("mean", "sum", "amax", "amin", "logsumexp")

FUNCTIONS = {
    F.linear: linear_function, F.conv1d: conv_function, F.conv2d: conv_function, F.layer_norm: layer_norm_function,
    F.group_norm: group_norm_function, torch.flatten: flatten_call, torch.reshape: reshape_call,
    torch.transpose: transpose_call, torch.permute: permute_call, torch.unsqueeze: unsqueeze_call,
    torch.squeeze: squeeze_call, torch.t: t_call, torch.cat: cat_call, torch.concat: cat_call,
    torch.concatenate: cat_call, torch.matmul: matmul_call, operator.matmul: matmul_call, getattr: attribute,
    operator.getitem: getitem_call, operator.neg: unary(operator.neg),
    F.softmax: along_dim(F.softmax), F.log_softmax: along_dim(F.log_softmax),
    torch.softmax: along_dim(torch.softmax), torch.log_softmax: along_dim(torch.log_softmax),
    **{getattr(F, n): unary(getattr(F, n)) for n in _UNARY_F},
    **{getattr(torch, n): unary(getattr(torch, n)) for n in _UNARY_TORCH},
    **{fn: binary(fn) for fn in _BINARY}, **{getattr(torch, n): binary(getattr(torch, n)) for n in _BINARY_TORCH},
    **{getattr(F, n): pool_function(getattr(F, n)) for n in _POOLS_F},
    **{fn: identity for fn in _DROPOUTS_F},                  # p = 0 or not training: refused otherwise
    **{getattr(torch, n): reduction(getattr(torch, n)) for n in _REDUCTIONS},
}

METHODS = {
    "flatten": flatten_call, "view": reshape_call, "reshape": reshape_call, "size": size_call, "dim": dim_call,
    "transpose": transpose_call, "permute": permute_call, "unsqueeze": unsqueeze_call, "squeeze": squeeze_call,
    "t": t_call, "contiguous": identity, "matmul": matmul_call,
    "softmax": along_dim(torch.Tensor.softmax), "log_softmax": along_dim(torch.Tensor.log_softmax),
    **{n: unary(getattr(torch.Tensor, n)) for n in _UNARY_METHODS},
    **{n: binary(getattr(torch.Tensor, n)) for n in _BINARY_TORCH},
    **{n: reduction(getattr(torch.Tensor, n)) for n in _REDUCTIONS},
}

_FACTORIES = {torch.zeros, torch.ones, torch.full, torch.arange, torch.eye, torch.tensor, torch.linspace}


def computes_constants(node) -> bool:
    """Whether a node whose inputs are all constants may be computed once per call, the same for every
    agent (deterministic functions only: never a random one)."""
    if node.op == "call_method":
        return node.target in METHODS
    t = node.target
    return t in FUNCTIONS or t in _FACTORIES or getattr(t, "__module__", None) in ("_operator", "math")
