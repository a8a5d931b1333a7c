"""Lifters of shape ops, attributes, indexing, concatenation, matrix products and reductions on
the agent axis (per-agent dims shifted by one, liftops.shift); the tables are in liftnn.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mpifedmeta.models.liftops import (C, G, S, T, NotLiftable, Val, bind, bmatmul, grouped_cat_channels, grouped_flatten, grouped_size,
                      shift)


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
    if x.kind == T:                                  # an element of a tuple (an LSTM's output, x.chunk(...))
        if not isinstance(idx, int):
            raise NotLiftable("a slice of a tuple")
        if x.const is not None:
            return x.const[idx]
        a = x.slot
        return ctx.emit(lambda env, P: env[a][idx], (a,), S, x.acts)
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
