"""Lifters of layers, shape ops and reductions, and the tables lift.py dispatches on: a module's
class (``MODULES``), a function (``FUNCTIONS``), a Tensor method (``METHODS``) → lifter(ctx, node[,
module]) → the node's lifted value. Layouts and kernels: liftops.py; sequence layers (embeddings,
recurrent layers, attention): liftseq.py.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from mpifedmeta.models import liftseq
from mpifedmeta.models.liftops import G, S, NotLiftable, Val, bind, binary, conv, dense, group_norm, identity, layer_norm, unary
from mpifedmeta.models.liftshape import (along_dim, attribute, cat_call, dim_call, flatten_call, flatten_module, getitem_call,
                        matmul_call, permute_call, reduction, reshape_call, size_call, softmax_module, squeeze_call,
                        t_call, transpose_call, unflatten_module, unsqueeze_call)


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
           **{t: identity for t in _DROPOUT_MODULES},     # dropout with p > 0 is refused before (lift.Refused)
           nn.Embedding: liftseq.embedding_module, nn.LSTM: liftseq.recurrent_module, nn.GRU: liftseq.recurrent_module,
           nn.RNN: liftseq.recurrent_module, nn.MultiheadAttention: liftseq.mha_module,
           nn.TransformerEncoderLayer: liftseq.encoder_layer_module, nn.TransformerEncoder: liftseq.encoder_module}

_UNARY_F = ("relu", "relu6", "elu", "selu", "celu", "gelu", "silu", "mish", "leaky_relu", "softplus", "tanh", "sigmoid",
            "hardtanh", "hardswish", "hardsigmoid", "logsigmoid", "softsign", "tanhshrink", "softshrink", "hardshrink",
            "threshold")
_UNARY_TORCH = ("relu", "tanh", "sigmoid", "exp", "log", "log1p", "expm1", "abs", "sqrt", "rsqrt", "square", "sin",
                "cos", "erf", "neg", "reciprocal", "clamp", "clip")
_UNARY_METHODS = _UNARY_TORCH + ("clamp_min", "clamp_max", "float", "double", "to", "clone", "long", "int")
_BINARY = {operator.add: "add", operator.sub: "sub", operator.mul: "mul", operator.truediv: "div",
           operator.pow: "pow", torch.maximum: "maximum", torch.minimum: "minimum", operator.eq: "eq",
           operator.ne: "ne", operator.lt: "lt", operator.le: "le", operator.gt: "gt", operator.ge: "ge"}
_BINARY_TORCH = ("add", "sub", "mul", "div", "true_divide", "pow", "maximum", "minimum", "eq", "ne", "lt", "le", "gt",
                 "ge")
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
    F.embedding: liftseq.embedding_function, F.scaled_dot_product_attention: liftseq.sdpa_function,
    torch.chunk: liftseq.chunk_call, torch.split: liftseq.chunk_call, torch.unbind: liftseq.chunk_call,
}

METHODS = {
    "flatten": flatten_call, "view": reshape_call, "reshape": reshape_call, "size": size_call, "dim": dim_call,
    "transpose": transpose_call, "permute": permute_call, "unsqueeze": unsqueeze_call, "squeeze": squeeze_call,
    "t": t_call, "contiguous": identity, "matmul": matmul_call,
    "softmax": along_dim(torch.Tensor.softmax), "log_softmax": along_dim(torch.Tensor.log_softmax),
    **{n: unary(getattr(torch.Tensor, n)) for n in _UNARY_METHODS},
    **{n: binary(getattr(torch.Tensor, n)) for n in _BINARY_TORCH},
    **{n: reduction(getattr(torch.Tensor, n)) for n in _REDUCTIONS},
    "chunk": liftseq.chunk_call, "split": liftseq.chunk_call, "unbind": liftseq.chunk_call,
    "masked_fill": liftseq.masked_fill_call,
}

_FACTORIES = {torch.zeros, torch.ones, torch.full, torch.arange, torch.eye, torch.tensor, torch.linspace}


def computes_constants(node) -> bool:
    """Whether a node whose inputs are all constants may be computed once per call, the same for every
    agent (deterministic functions only: never a random one)."""
    if node.op == "call_method":
        return node.target in METHODS
    t = node.target
    return t in FUNCTIONS or t in _FACTORIES or getattr(t, "__module__", None) in ("_operator", "math")
