"""Lifters of sequence layers: embeddings, recurrent layers (nn.LSTM, nn.GRU, nn.RNN) and attention
(nn.MultiheadAttention, F.scaled_dot_product_attention, nn.TransformerEncoderLayer/Encoder), and
their kernels, batched over the agent axis (the tables are in liftnn.py).

Everything is written with batched matrix products (bmm/baddbmm/matmul), elementwise ops and softmax:
twice differentiable on every device (exact ν-step meta-gradients need a double backward, which
PyTorch's fused RNN and flash-attention kernels do not have). Stacked activations are (B, *per-agent
shape); a recurrent layer runs time-major (B, T, n, features) inside, one ``baddbmm`` per time step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from mpifedmeta.models.liftops import C, S, T, NotLiftable, Val, align, bind, dense, layer_norm


# --------------------------------------------------------------------------- kernels

def embedding(w: torch.Tensor, ids: torch.Tensor, shared: bool, padding_idx: int | None = None) -> torch.Tensor:
    """Every agent's rows of its own table ``w`` (B, V, D): per-agent ids (B, ...) — or ``shared`` ids
    (...), the same for every agent (positions) — in any dtype (float ids are exact integers).

    Plain indexing: its gradient accumulates each agent's rows in the order of that agent's ids
    (the same bits for any block size), and the gradient of that gradient is indexing again."""
    ids = ids.long() if ids.is_floating_point() else ids
    if padding_idx is not None:         # the padding row gets no gradient (nn.Embedding's padding_idx)
        keep = torch.ones((w.shape[1], 1), dtype=torch.bool, device=w.device)
        keep[padding_idx] = False
        w = torch.where(keep, w, w.detach())
    if shared:
        return w[:, ids]
    agents = torch.arange(w.shape[0], device=ids.device).view((-1,) + (1,) * (ids.dim() - 1))
    return w[agents, ids]


def _lstm_direction(xs, w_t, h, c, H, steps):
    """``xs``: the input projections of every time step, each (B, n, 4H) (gates i, f, g, o)."""
    outs = [None] * len(xs)
    B, n = h.shape[:2]
    for t in steps:
        i, f, g, o = torch.sigmoid(torch.baddbmm(xs[t], h, w_t)).view(B, n, 4, H).unbind(2)
        c = torch.addcmul(f * c, i, 2.0 * g - 1.0)              # the g gate's rows come doubled: tanh(x) = 2σ(2x) − 1
        h = o * torch.tanh(c)
        outs[t] = h
    return outs, h, c


def _gru_direction(xs, w_t, b_hh, h, H, steps):
    outs = [None] * len(xs)
    for t in steps:
        gh = torch.bmm(h, w_t) if b_hh is None else torch.baddbmm(b_hh.unsqueeze(1), h, w_t)   # r, z, n
        gx = xs[t]
        rz = torch.sigmoid(gx[..., :2 * H] + gh[..., :2 * H])
        new = torch.tanh(torch.addcmul(gx[..., 2 * H:], rz[..., :H], gh[..., 2 * H:]))
        h = torch.addcmul(new, rz[..., H:], h - new)             # (1 − z)·n + z·h
        outs[t] = h
    return outs, h


def _rnn_direction(xs, w_t, h, act, steps):
    outs = [None] * len(xs)
    for t in steps:
        h = act(torch.baddbmm(xs[t], h, w_t))
        outs[t] = h
    return outs, h


def _doubled_g(t: torch.Tensor | None, H: int) -> torch.Tensor | None:
    """An LSTM weight or bias (B, 4H, …) with the g gate's rows times 2 (exact): one sigmoid then
    gives all four gates, tanh(x) = 2σ(2x) − 1."""
    if t is None:
        return None
    scale = torch.ones((4 * H,) + (1,) * (t.dim() - 2), dtype=t.dtype, device=t.device)
    scale[2 * H:3 * H] = 2.0
    return t * scale


def recurrent(mode: str, x: torch.Tensor, layers: list, h0=None, c0=None):
    """Every agent's multi-layer (bi)directional RNN on time-major stacked input x (B, T, n, I).

    ``mode``: "LSTM", "GRU", "RNN_TANH" or "RNN_RELU" (PyTorch's gate order and equations);
    ``layers``: per layer, per direction, (w_ih, w_hh, b_ih, b_hh) stacked (B, …), biases may be
    None; ``h0``/``c0``: (B, layers·directions, n, H) or None (zeros). Returns (output (B, T, n,
    directions·H), h_n (B, layers·directions, n, H), c_n or None)."""
    B, T, n = x.shape[:3]
    hs, cs = [], []
    for dirs in layers:
        outs = []
        flat = x.reshape(B, T * n, x.shape[-1])
        for d, (w_ih, w_hh, b_ih, b_hh) in enumerate(dirs):
            k, H = len(hs), w_hh.shape[-1]
            h = x.new_zeros(B, n, H) if h0 is None else h0[:, k]
            if mode == "LSTM":
                w_ih, w_hh, b_ih, b_hh = (_doubled_g(t, H) for t in (w_ih, w_hh, b_ih, b_hh))
            xp = dense(w_ih, b_ih, flat)
            if mode != "GRU" and b_hh is not None:     # added to the projection, not to b_ih: autograd would give
                xp = xp + b_hh.unsqueeze(1)             # b_ih and b_hh the same gradient tensor (updated in place later)
            xs = xp.view(B, T, n, -1).unbind(1)        # one view per step; its gradient is one stack, not T copies
            w_t, steps = w_hh.transpose(1, 2), (range(T - 1, -1, -1) if d == 1 else range(T))
            if mode == "LSTM":
                c = x.new_zeros(B, n, H) if c0 is None else c0[:, k]
                seq, h, c = _lstm_direction(xs, w_t, h, c, H, steps)
                cs.append(c)
            elif mode == "GRU":
                seq, h = _gru_direction(xs, w_t, b_hh, h, H, steps)
            else:
                seq, h = _rnn_direction(xs, w_t, h, torch.tanh if mode == "RNN_TANH" else torch.relu, steps)
            outs.append(torch.stack(seq, 1))
            hs.append(h)
        x = outs[0] if len(outs) == 1 else torch.cat(outs, -1)
    return x, torch.stack(hs, 1), (torch.stack(cs, 1) if mode == "LSTM" else None)


def as_bias(mask: torch.Tensor | None, like: torch.Tensor, true_means_masked: bool) -> torch.Tensor | None:
    """An attention mask as an additive float bias: a boolean mask becomes 0 / −inf (True masks out
    for nn.MultiheadAttention, True takes part for F.scaled_dot_product_attention), a float one is
    used as given."""
    if mask is None or mask.is_floating_point():
        return mask
    out = torch.zeros(mask.shape, dtype=like.dtype, device=like.device)
    return out.masked_fill_(mask if true_means_masked else ~mask, float("-inf"))


def attention(q, k, v, bias=None, scale: float | None = None):
    """softmax(q kᵀ·scale + bias) v over the last two dims (any leading dims, broadcast); also
    returns the attention weights."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.matmul(q, k.transpose(-2, -1)) * scale
    if bias is not None:
        s = s + bias
    a = torch.softmax(s, dim=-1)
    return torch.matmul(a, v), a


class MHA:
    """nn.MultiheadAttention's computation on stacked batch-first values (B, n, L, E), its
    parameters read from the stacked params by their names in the model (``pname``)."""

    def __init__(self, m: nn.MultiheadAttention, pname):
        if m.bias_k is not None or m.add_zero_attn:
            raise NotLiftable("add_bias_kv / add_zero_attn")
        self.E, self.heads, self.d = m.embed_dim, m.num_heads, m.head_dim
        self.same = m._qkv_same_embed_dim
        self.w = pname(m.in_proj_weight) if self.same else None
        self.wq, self.wk, self.wv = (None, None, None) if self.same else \
            (pname(m.q_proj_weight), pname(m.k_proj_weight), pname(m.v_proj_weight))
        self.b = pname(m.in_proj_bias)
        self.wo, self.bo = pname(m.out_proj.weight), pname(m.out_proj.bias)

    def _heads(self, h):
        B, n, L = h.shape[:3]
        return h.reshape(B, n, L, self.heads, self.d).transpose(2, 3)          # (B, n, heads, L, d)

    def __call__(self, P, q, k, v, self_attention: bool, bias=None, need_weights=False, average=True):
        """q (B, n, L, E), k/v (B, n, S, E) (batch-first stacked); ``bias``: additive, broadcast
        over the scores (B, n, heads, L, S) (:func:`mask_bias`). Returns (output, weights or None)."""
        E = self.E
        b = None if self.b is None else P[self.b]
        bq, bk, bv = (None, None, None) if b is None else (b[:, :E], b[:, E:2 * E], b[:, 2 * E:])
        if self.same and self_attention:
            qkv = dense(P[self.w], b, q)
            qp, kp, vp = qkv[..., :E], qkv[..., E:2 * E], qkv[..., 2 * E:]
        elif self.same:
            w = P[self.w]
            qp, kp, vp = dense(w[:, :E], bq, q), dense(w[:, E:2 * E], bk, k), dense(w[:, 2 * E:], bv, v)
        else:
            qp, kp, vp = dense(P[self.wq], bq, q), dense(P[self.wk], bk, k), dense(P[self.wv], bv, v)
        out, a = attention(self._heads(qp), self._heads(kp), self._heads(vp), bias)
        B, n, _, L, _ = out.shape
        out = dense(P[self.wo], None if self.bo is None else P[self.bo], out.transpose(2, 3).reshape(B, n, L, E))
        if not need_weights:
            return out, None
        return out, (a.mean(2) if average else a)


def mask_bias(attn_mask, key_padding_mask, like, n: int, heads: int, shared: tuple[bool, bool]):
    """nn.MultiheadAttention's masks as one additive bias that broadcasts over the scores
    (B, n, heads, L, S): ``attn_mask`` per agent (L, S) or (n·heads, L, S), ``key_padding_mask``
    per agent (n, S); each stacked (B, …) or ``shared`` (the same for every agent); boolean True
    masks out, float is added."""
    bias = None
    if attn_mask is not None:
        bias = as_bias(attn_mask, like, True)
        lead = 0 if shared[0] else 1
        if bias.dim() - lead == 3:                                           # (n·heads, L, S)
            bias = bias.reshape(bias.shape[:lead] + (n, heads) + bias.shape[-2:])
        elif not shared[0]:                                                  # (B, L, S)
            bias = bias[:, None, None]
    if key_padding_mask is not None:
        pad = as_bias(key_padding_mask, like, True)
        pad = pad[..., None, None, :]                                        # (…, n, 1, 1, S)
        bias = pad if bias is None else bias + pad
    return bias


# --------------------------------------------------------------------------- lifters

def _param_name(ctx, arg) -> str:
    v = ctx.val(arg)
    if v.param is None:
        raise NotLiftable("a weight that is not a parameter")
    return v.param


def _getter(ctx, arg, what: str):
    """(env → the value or None, slots, shared): an optional argument that is an activation (S) or a
    constant (C, the same for every agent)."""
    if arg is None:
        return (lambda env: None), (), False
    v = ctx.val(arg)
    if v.kind == C:
        if v.slot is None:
            c = v.const
            return (lambda env: c), (), True
        s = v.slot
        return (lambda env: env[s]), (s,), True
    if v.kind != S:
        raise NotLiftable(f"{what} in another layout")
    s = ctx.need(v, S).slot
    return (lambda env: env[s]), (s,), False


def _shared_to_stacked(t, B):
    return None if t is None else t.unsqueeze(0).expand((B,) + t.shape).contiguous()


def embedding_module(ctx, node, m):
    if m.max_norm is not None or m.scale_grad_by_freq:
        raise NotLiftable("max_norm / scale_grad_by_freq")
    return _embed(ctx, ctx.val(node.args[0]), ctx.pname(m.weight), m.padding_idx)


def embedding_function(ctx, node):
    a = bind(node, ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"),
             {"padding_idx": None, "max_norm": None, "scale_grad_by_freq": False})
    if ctx.static(a["max_norm"]) is not None or ctx.static(a["scale_grad_by_freq"]):
        raise NotLiftable("max_norm / scale_grad_by_freq")
    pad = ctx.static(a["padding_idx"])
    return _embed(ctx, ctx.val(a["input"]), _param_name(ctx, a["weight"]), pad)


def _embed(ctx, ids: Val, wn: str, padding_idx) -> Val:
    if ids.kind == C:
        if ids.slot is None:
            c = torch.as_tensor(ids.const)
            return ctx.emit(lambda env, P: embedding(P[wn], c.to(P[wn].device), True, padding_idx), (), S, False)
        s = ids.slot
        return ctx.emit(lambda env, P: embedding(P[wn], env[s], True, padding_idx), (s,), S, False)
    if not ids.acts:
        raise NotLiftable("ids computed from parameters")
    s = ctx.need(ids, S).slot
    return ctx.emit(lambda env, P: embedding(P[wn], env[s], False, padding_idx), (s,), S, True)


def recurrent_module(ctx, node, m):
    """nn.LSTM / nn.GRU / nn.RNN (any num_layers, bidirectional, batch_first, biases, an initial
    state): output and final states as a tuple value, like the module."""
    if m.proj_size:
        raise NotLiftable("proj_size")
    a = bind(node, ("input", "hx"), {"hx": None})
    x = ctx.need(ctx.val(a["input"]), S)
    if not x.acts:
        raise NotLiftable("not an activation")
    lstm = m.mode == "LSTM"
    hx = a["hx"]
    if isinstance(hx, fx.Node) and ctx.val(hx).kind == T:
        hx = tuple(_tuple_node(ctx, hx))
    if lstm and hx is not None and not (isinstance(hx, (tuple, list)) and len(hx) == 2):
        raise NotLiftable("an initial state that is not a pair (h0, c0)")
    parts = [None, None] if hx is None else (list(hx) if lstm else [hx, None])
    states = [_getter(ctx, p, "an initial state") for p in parts]
    sfx = ["", "_reverse"][:2 if m.bidirectional else 1]
    layers = [[tuple(ctx.pname(getattr(m, f"{w}_l{k}{s}", None)) for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
               for s in sfx] for k in range(m.num_layers)]
    mode, batch_first, xs, cls = m.mode, m.batch_first, x.slot, type(m).__name__

    def run(env, P):
        h = env[xs]
        if h.dim() != 4:
            raise RuntimeError(f"nn.{cls}: unbatched input is not lifted (per agent {h.dim() - 1}-D)")
        B = h.shape[0]
        h0, c0 = ((_shared_to_stacked(get(env), B) if shared else get(env)) for get, _, shared in states)
        weights = [[tuple(None if name is None else P[name] for name in d) for d in dirs] for dirs in layers]
        out, hn, cn = recurrent(mode, h.transpose(1, 2) if batch_first else h, weights, h0, c0)
        return (out.transpose(1, 2).contiguous() if batch_first else out), hn, cn

    slots = (xs,) + tuple(s for _, ins, _ in states for s in ins)
    whole = ctx.emit(run, slots, T)
    out = ctx.emit(lambda env, P: env[whole.slot][0], (whole.slot,), S, True)
    hn = ctx.emit(lambda env, P: env[whole.slot][1], (whole.slot,), S, True)
    if not lstm:
        return Val(whole.slot, T, True, const=(out, hn))
    cn = ctx.emit(lambda env, P: env[whole.slot][2], (whole.slot,), S, True)
    return Val(whole.slot, T, True, const=(out, Val(None, T, True, const=(hn, cn))))


def _tuple_node(ctx, node):
    v = ctx.val(node)
    if v.const is None:
        raise NotLiftable("a tuple of unknown length")
    return v.const


def _batch_first(h, batch_first: bool):
    return h if batch_first else h.transpose(1, 2)


def mha_module(ctx, node, m):
    """nn.MultiheadAttention(query, key, value, key_padding_mask, need_weights, attn_mask,
    average_attn_weights, is_causal) → (output, weights or None)."""
    a = bind(node, ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
                    "is_causal"), {"key_padding_mask": None, "need_weights": True, "attn_mask": None,
                                   "average_attn_weights": True, "is_causal": False})
    need, average, causal = ctx.static((a["need_weights"], a["average_attn_weights"], a["is_causal"]))
    if causal and a["attn_mask"] is None:
        raise NotLiftable("is_causal without attn_mask")
    mha = MHA(m, ctx.pname)
    qkv = [ctx.need(ctx.val(a[k]), S) for k in ("query", "key", "value")]
    if not all(v.acts for v in qkv):
        raise NotLiftable("query, key or value computed from parameters only")
    same = a["query"] is a["key"] is a["value"]
    mask, kpm = _getter(ctx, a["attn_mask"], "attn_mask"), _getter(ctx, a["key_padding_mask"], "key_padding_mask")
    iq, ik, iv = (v.slot for v in qkv)
    bf, heads = m.batch_first, m.num_heads

    def run(env, P):
        q, k, v = (_batch_first(env[i], bf) for i in (iq, ik, iv))
        bias = mask_bias(mask[0](env), kpm[0](env), q, q.shape[1], heads, (mask[2], kpm[2]))
        out, w = mha(P, q, k, v, same, bias, need, average)
        return _batch_first(out, bf).contiguous(), w

    whole = ctx.emit(run, (iq, ik, iv) + mask[1] + kpm[1], T)
    out = ctx.emit(lambda env, P: env[whole.slot][0], (whole.slot,), S, True)
    weights = ctx.emit(lambda env, P: env[whole.slot][1], (whole.slot,), S, True) if need else Val(None, C, False)
    return Val(whole.slot, T, True, const=(out, weights))


def sdpa_function(ctx, node):
    """F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p = 0, is_causal, scale)."""
    a = bind(node, ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"),
             {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False})
    causal, scale, gqa = ctx.static((a["is_causal"], a["scale"], a["enable_gqa"]))
    if gqa:
        raise NotLiftable("enable_gqa")
    vals = [ctx.need(ctx.val(a[k]), S) for k in ("query", "key", "value")]
    if not all(v.acts for v in vals):
        raise NotLiftable("query, key or value computed from parameters only")
    get, ins, shared = _getter(ctx, a["attn_mask"], "attn_mask")
    iq, ik, iv = (v.slot for v in vals)

    def run(env, P):
        q, k, v = env[iq], env[ik], env[iv]
        bias, one = as_bias(get(env), q, False), shared
        if causal:                   # top-left aligned, like PyTorch (an explicit attn_mask is an error there)
            tri = torch.ones((q.shape[-2], k.shape[-2]), dtype=torch.bool, device=q.device).tril()
            bias, one = as_bias(tri, q, False), True
        s = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5 if scale is None else scale)
        if bias is not None:
            s = torch.add(*align(s, bias.unsqueeze(0) if one else bias))
        return torch.matmul(torch.softmax(s, dim=-1), v)
    return ctx.emit(run, (iq, ik, iv) + ins, S, True)


_ACTIVATIONS = {F.relu: F.relu, F.gelu: F.gelu, torch.relu: torch.relu}


def _activation(act):
    if act in _ACTIVATIONS:
        return _ACTIVATIONS[act]
    if isinstance(act, (nn.ReLU, nn.GELU, nn.Tanh, nn.SiLU, nn.ELU, nn.LeakyReLU, nn.Sigmoid)):
        return act.forward
    raise NotLiftable(f"activation {getattr(act, '__name__', type(act).__name__)}")


class EncoderLayer:
    """nn.TransformerEncoderLayer on stacked batch-first values (B, n, L, E), dropout 0."""

    def __init__(self, m: nn.TransformerEncoderLayer, pname):
        self.mha, self.heads = MHA(m.self_attn, pname), m.self_attn.num_heads
        self.act = _activation(m.activation)
        self.norm_first = m.norm_first
        self.l1 = (pname(m.linear1.weight), pname(m.linear1.bias))
        self.l2 = (pname(m.linear2.weight), pname(m.linear2.bias))
        self.n1 = (pname(m.norm1.weight), pname(m.norm1.bias), tuple(m.norm1.normalized_shape), m.norm1.eps)
        self.n2 = (pname(m.norm2.weight), pname(m.norm2.bias), tuple(m.norm2.normalized_shape), m.norm2.eps)

    @staticmethod
    def _norm(P, norm, h):
        w, b, shape, eps = norm
        return layer_norm(h, shape, None if w is None else P[w], None if b is None else P[b], eps)

    @staticmethod
    def _dense(P, wb, h):
        return dense(P[wb[0]], None if wb[1] is None else P[wb[1]], h)

    def __call__(self, P, x, bias):
        def sa(h):
            return self.mha(P, h, h, h, True, bias)[0]

        def ff(h):
            return self._dense(P, self.l2, self.act(self._dense(P, self.l1, h)))
        if self.norm_first:
            x = x + sa(self._norm(P, self.n1, x))
            return x + ff(self._norm(P, self.n2, x))
        x = self._norm(P, self.n1, x + sa(x))
        return self._norm(P, self.n2, x + ff(x))


def _encoder_call(ctx, node, layers, final_norm, batch_first: bool, heads: int, names: tuple):
    a = bind(node, names, {names[1]: None, names[2]: None, names[3]: None})
    x = ctx.need(ctx.val(a[names[0]]), S)
    if not x.acts:
        raise NotLiftable("not an activation")
    mask, kpm = _getter(ctx, a[names[1]], "a mask"), _getter(ctx, a[names[2]], "a key padding mask")
    xs = x.slot

    def run(env, P):
        h = _batch_first(env[xs], batch_first)
        bias = mask_bias(mask[0](env), kpm[0](env), h, h.shape[1], heads, (mask[2], kpm[2]))
        for layer in layers:
            h = layer(P, h, bias)
        if final_norm is not None:
            h = EncoderLayer._norm(P, final_norm, h)
        return _batch_first(h, batch_first).contiguous()
    return ctx.emit(run, (xs,) + mask[1] + kpm[1], S, True)


def encoder_layer_module(ctx, node, m):
    """nn.TransformerEncoderLayer(src, src_mask, src_key_padding_mask, is_causal) (dropout 0)."""
    return _encoder_call(ctx, node, [EncoderLayer(m, ctx.pname)], None, m.self_attn.batch_first, m.self_attn.num_heads,
                         ("src", "src_mask", "src_key_padding_mask", "is_causal"))


def encoder_module(ctx, node, m):
    """nn.TransformerEncoder(src, mask, src_key_padding_mask, is_causal): its layers and final norm."""
    layers = [EncoderLayer(layer, ctx.pname) for layer in m.layers]
    if not layers or any(type(layer) is not nn.TransformerEncoderLayer for layer in m.layers):
        raise NotLiftable("layers other than nn.TransformerEncoderLayer")
    norm = None
    if m.norm is not None:
        if type(m.norm) is not nn.LayerNorm:
            raise NotLiftable("a final norm other than nn.LayerNorm")
        norm = (ctx.pname(m.norm.weight), ctx.pname(m.norm.bias), tuple(m.norm.normalized_shape), m.norm.eps)
    first = m.layers[0].self_attn
    return _encoder_call(ctx, node, layers, norm, first.batch_first, first.num_heads,
                         ("src", "mask", "src_key_padding_mask", "is_causal"))


def chunk_call(ctx, node):
    """x.chunk(n, dim) / torch.chunk, x.split(size, dim) / torch.split, x.unbind(dim) along a feature
    dim: a tuple value whose elements are read by indexing."""
    name = node.target if node.op == "call_method" else node.target.__name__
    names = {"chunk": ("input", "chunks", "dim"), "split": ("input", "split_size_or_sections", "dim"),
             "unbind": ("input", "dim")}[name]
    a = bind(node, names, {"dim": 0})
    x = ctx.need(ctx.val(a["input"]), S)
    d = ctx.static(a["dim"])
    if x.acts and d == 0:
        raise NotLiftable("along the sample dimension")
    sd, s = (d + 1 if d >= 0 else d), x.slot
    arg = None if name == "unbind" else ctx.static(a[names[1]])
    fn = {"chunk": lambda h: torch.chunk(h, arg, sd), "split": lambda h: torch.split(h, arg, sd),
          "unbind": lambda h: torch.unbind(h, sd)}[name]
    whole = ctx.emit(lambda env, P: fn(env[s]), (s,), T)
    return Val(whole.slot, T, x.acts)


def masked_fill_call(ctx, node):
    """x.masked_fill(mask, value): a constant or per-agent mask, a number."""
    from mpifedmeta.models.liftops import elementwise2
    a = bind(node, ("input", "mask", "value"))
    value = ctx.static(a["value"])
    if isinstance(value, torch.Tensor):
        raise NotLiftable("a tensor value")
    return elementwise2(ctx, lambda h, m: h.masked_fill(m, value), ctx.val(a["input"]), ctx.val(a["mask"]), {})


def refusal(m: nn.Module) -> str | None:
    """Why a sequence layer cannot be part of the meta-objective (random dropout), else None."""
    if isinstance(m, nn.modules.rnn.RNNBase) and m.dropout > 0 and m.num_layers > 1:
        return f"{type(m).__name__}(dropout={m.dropout})"
    if isinstance(m, nn.MultiheadAttention) and m.dropout > 0:
        return f"MultiheadAttention(dropout={m.dropout})"
    return None


def ids_refusal(m: nn.Module) -> str | None:
    """An nn.Embedding whose ids are not all exact in the run's floating dtype (ids travel as floats)."""
    if isinstance(m, nn.Embedding) and m.weight.is_floating_point():
        exact = 2 ** {torch.float64: 53, torch.float32: 24, torch.bfloat16: 8, torch.float16: 11}.get(m.weight.dtype, 53)
        if m.num_embeddings > exact:
            return (f"nn.Embedding({m.num_embeddings}, ...) has more rows than {m.weight.dtype} holds exact ids "
                    f"({exact}); use train.dtype = \"float64\"")
    return None


def sdpa_dropout(node) -> object:
    """dropout_p of an F.scaled_dot_product_attention node (0 when not given)."""
    args = dict(zip(("query", "key", "value", "attn_mask", "dropout_p"), node.args))
    args.update(node.kwargs)
    return args.get("dropout_p", 0.0)

