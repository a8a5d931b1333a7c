"""Sequence layers in the stacked form (mpifedmeta/models/liftseq.py): nn.Embedding, nn.LSTM / nn.GRU /
nn.RNN, nn.MultiheadAttention, F.scaled_dot_product_attention, nn.TransformerEncoderLayer/Encoder and
the built-in char-lstm, transformer and CIFAR-shaped CNN, in float64: logits, every agent's gradient
and Hessian-vector product against an independent per-agent reference (plain torch.autograd on a
copy of the original module holding one agent's weights, math attention), ≤ 1e-12 relative, and
exact ν = 2 meta-gradients against core/reference.py; float32 bits that do not depend on the block
size; the refusals; the start-up check's fallback (stacked → vmap → loop, or exit 2); and runs of a
user's LSTM and TransformerEncoderLayer (examples/my_text.py, int64 ids) under `mpifedmeta run` with
fo, hf and exact, and the char-lstm bit-identical on 1, 2 and 3 ranks.
"""

from __future__ import annotations

import copy
import os
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import engine_api as api
from helpers import (REPO, assert_models_identical, assert_ok, assert_one_error_line, describe, final_model, run_cli,
                     sets, write_tiny_config)
from mpifedmeta.core import metagrad as mg
from mpifedmeta.core import reference
from mpifedmeta.engine import backends, strategy
from mpifedmeta.models import build_model, param_dict
from mpifedmeta.models.lift import Refused, lift

F64 = torch.float64
TOL = 1e-12
B, N, CLASSES, VOCAB = 3, 5, 4, 9


@pytest.fixture(autouse=True)
def _seeded():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        yield


def _math():
    """The per-agent reference differentiates attention twice: PyTorch's math kernel (the fused
    CPU kernel has no double backward)."""
    return sdpa_kernel(SDPBackend.MATH)


def _ce(logits, y, mask):
    return (F.cross_entropy(logits, y, reduction="none") * mask).sum() / mask.sum()


def _agents(model, shape, ids: bool):
    """Every agent's own weights (B, ...), inputs (float, or int64 ids < VOCAB), labels, a padded mask, v."""
    model = model.to(F64).requires_grad_(False)
    params = {k: v.unsqueeze(0) + 0.3 * v.abs().mean().clamp_min(0.1) * torch.randn((B,) + v.shape, dtype=F64)
              for k, v in param_dict(model).items()}
    x = torch.randint(0, VOCAB, (B, N) + shape) if ids else torch.randn((B, N) + shape, dtype=F64)
    y = torch.randint(0, CLASSES, (B, N))
    mask = torch.ones(B, N, dtype=F64)
    mask[1, 3:] = 0
    return model, params, x, y, mask, {k: torch.randn_like(p) for k, p in params.items()}


def _vector(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _reference(model, params, x, y, mask, v, a: int):
    """Agent a: its weights in a copy of the module; logits, gradient and H v by plain autograd."""
    m = copy.deepcopy(model)
    named = dict(m.named_parameters())
    for k, p in named.items():
        p.data = params[k][a].clone()
        p.requires_grad_(True)
    leaves = [named[k] for k in params]
    with _math():
        logits = m(x[a])
        g = torch.autograd.grad(_ce(logits, y[a], mask[a]), leaves, create_graph=True, allow_unused=True)
        used = [i for i, t in enumerate(g) if t is not None]
        hv = dict(zip(used, torch.autograd.grad([g[i] for i in used], [leaves[i] for i in used],
                                                grad_outputs=[v[list(params)[i]][a] for i in used])))
    zeros = [torch.zeros_like(params[k][a]) for k in params]
    return (logits.detach(), _vector(zeros[i] if t is None else t.detach() for i, t in enumerate(g)),
            _vector(hv.get(i, zeros[i]) for i in range(len(zeros))))


def check(model, shape, ids: bool = False) -> None:
    """The stacked backend equals the per-agent reference (logits, gradients, HVPs of every agent)."""
    model, params, x, y, mask, v = _agents(model, shape, ids)
    result = lift(model)
    assert result.forward is not None, result.reason
    be = backends.make(model, "stacked")
    logits, (g, _), hv = api.logits(be, params, x), api.grad(be, params, x, y, mask), api.hvp(be, params, v, x, y, mask)
    for a in range(B):
        ref = _reference(model, params, x, y, mask, v, a)
        errs = (_rel(logits[a], ref[0]), _rel(_vector(g[k][a] for k in params), ref[1]),
                _rel(_vector(hv[k][a] for k in params), ref[2]))
        assert max(errs) <= TOL, (a, errs)
    assert _rel(_vector(g[k][0] for k in params), _vector(g[k][1] for k in params)) > 1e-3, "agents do not differ"


# --------------------------------------------------------------------------- recurrent layers

class Recurrent(nn.Module):
    """[Embedding →] an RNN layer → Linear from the last step's output, or from the last layer's h_n."""

    def __init__(self, rnn, read: str = "output", embed: nn.Embedding | None = None, state: bool = False):
        super().__init__()
        self.embed, self.rnn, self.read, self.state = embed, rnn, read, state
        width = rnn.hidden_size * (2 if rnn.bidirectional else 1)
        self.fc = nn.Linear(width if read == "output" else rnn.hidden_size, CLASSES)

    def forward(self, x):
        if self.embed is not None:
            x = self.embed(x)
        seq = x if self.rnn.batch_first else x.transpose(0, 1)
        if self.state:                        # an initial state computed from the input (h0, c0)
            h0 = torch.tanh(seq[:, :1, :self.rnn.hidden_size] if self.rnn.batch_first else seq[:1, :, :self.rnn.hidden_size])
            h0 = h0.transpose(0, 1) if self.rnn.batch_first else h0
            out = self.rnn(seq, (h0, h0 * 0.5) if isinstance(self.rnn, nn.LSTM) else h0)
        else:
            out = self.rnn(seq)
        if self.read == "output":
            return self.fc(out[0][:, -1] if self.rnn.batch_first else out[0][-1])
        h_n = out[1][0] if isinstance(self.rnn, nn.LSTM) else out[1]
        return self.fc(h_n[-1])


RECURRENT = {
    "lstm": lambda: Recurrent(nn.LSTM(3, 4, batch_first=True)),
    "lstm-2layers-bidirectional-time-major": lambda: Recurrent(nn.LSTM(3, 4, num_layers=2, bidirectional=True)),
    "lstm-h_n": lambda: Recurrent(nn.LSTM(3, 4, num_layers=2, batch_first=True), read="h_n"),
    "lstm-initial-state": lambda: Recurrent(nn.LSTM(5, 4, batch_first=True), state=True),
    "gru-2layers-bidirectional": lambda: Recurrent(nn.GRU(3, 4, num_layers=2, batch_first=True, bidirectional=True)),
    "gru-h_n-time-major": lambda: Recurrent(nn.GRU(3, 4), read="h_n"),
    "gru-no-bias-initial-state": lambda: Recurrent(nn.GRU(5, 4, bias=False), state=True),
    "rnn-tanh": lambda: Recurrent(nn.RNN(3, 4, batch_first=True)),
    "rnn-relu-no-bias-bidirectional": lambda: Recurrent(nn.RNN(3, 4, nonlinearity="relu", bias=False, bidirectional=True)),
}


@pytest.mark.parametrize("case", list(RECURRENT))
def test_recurrent_layers_against_the_reference(case):
    check(RECURRENT[case](), (6, 5) if "initial-state" in case else (6, 3))


def test_embeddings_with_ids_padding_and_shared_positions():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.pos = nn.Embedding(VOCAB, 5, padding_idx=0), nn.Embedding(6, 5)
            self.w = nn.Parameter(torch.randn(VOCAB, 5))
            self.rnn, self.fc = nn.GRU(5, 4, batch_first=True), nn.Linear(4, CLASSES)

        def forward(self, x):
            h = self.embed(x) + self.pos(torch.arange(6)) + F.embedding(x.long(), self.w) * 0.5
            return self.fc(self.rnn(h)[0][:, -1])
    check(M(), (6,), ids=True)


# --------------------------------------------------------------------------- attention

class Attending(nn.Module):
    """``layer`` applied to (n, L, 8) inputs as the case says, then Linear(8, CLASSES)."""

    def __init__(self, layer, how):
        super().__init__()
        self.layer, self.how, self.fc = layer, how, nn.Linear(8, CLASSES)
        self.register_buffer("causal", torch.ones(5, 5, dtype=torch.bool).triu(1), persistent=False)
        self.register_buffer("bias", torch.randn(5, 5), persistent=False)
        self.register_buffer("first", torch.tensor([-9.0, 0, 0, 0, 0]), persistent=False)   # key 0 is never padding

    def padding(self, x, feature):
        return x[:, :, feature] + self.first > 1.0      # no query has every key masked (that would be NaN)

    def forward(self, x):
        if self.how == "self":                         # weights averaged over heads, used in the output
            out, w = self.layer(x, x, x)
            return self.fc(out.mean(1)) + w.sum(-1).mean(-1, keepdim=True)
        if self.how == "cross-masked":                 # bool causal mask, a padding mask from the input
            out, w = self.layer(x, torch.tanh(x), 2 * x, attn_mask=self.causal, key_padding_mask=self.padding(x, 0),
                                average_attn_weights=False)
            return self.fc(out[:, -1]) + w.sum((1, 2, 3)).unsqueeze(-1)
        if self.how == "kdim-time-major":
            t = x.transpose(0, 1)
            return self.fc(self.layer(t, t[..., :6] * 2, torch.tanh(t[..., 2:6]), need_weights=False)[0][-1])
        if self.how == "sdpa":
            q = x.reshape(x.size(0), 5, 2, 4).transpose(1, 2)
            causal = F.scaled_dot_product_attention(q, torch.tanh(q), q, is_causal=True)
            masked = F.scaled_dot_product_attention(q, q, q * 0.5, attn_mask=self.bias, scale=0.3)
            return self.fc((causal + masked).transpose(1, 2).reshape(x.size(0), 5, 8).mean(1))
        if self.how == "encoder-float-mask-time-major":
            return self.fc(self.layer(x.transpose(0, 1), src_mask=self.bias)[-1])
        if self.how == "encoder-causal-padding":
            return self.fc(self.layer(x, mask=self.causal, src_key_padding_mask=self.padding(x, 1))[:, -1])
        return self.fc(self.layer(x).mean(1))


ATTENTION = {
    "mha-self": lambda: Attending(nn.MultiheadAttention(8, 2, batch_first=True), "self"),
    "mha-cross-masked": lambda: Attending(nn.MultiheadAttention(8, 2, batch_first=True), "cross-masked"),
    "mha-kdim-vdim-time-major": lambda: Attending(nn.MultiheadAttention(8, 2, kdim=6, vdim=4), "kdim-time-major"),
    "F.scaled_dot_product_attention": lambda: Attending(nn.Identity(), "sdpa"),
    "encoder-layer": lambda: Attending(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), "plain"),
    "encoder-layer-pre-norm-gelu": lambda: Attending(nn.TransformerEncoderLayer(
        8, 2, 16, dropout=0.0, batch_first=True, norm_first=True, activation="gelu"), "plain"),
    "encoder-layer-float-mask-time-major": lambda: Attending(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0),
                                                             "encoder-float-mask-time-major"),
    "encoder-2-layers-norm-causal-padding": lambda: Attending(nn.TransformerEncoder(
        nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 2, norm=nn.LayerNorm(8),
        enable_nested_tensor=False), "encoder-causal-padding"),
}


@pytest.mark.parametrize("case", list(ATTENTION))
def test_attention_against_the_reference(case):
    check(ATTENTION[case](), (5, 8))


# --------------------------------------------------------------------------- built-in models

BUILT_IN = {
    "char-lstm": (lambda: build_model("char-lstm", (6,), CLASSES, (8, 8), {"embedding": 4, "vocab": VOCAB}), (6,)),
    "char-lstm-unequal-widths": (lambda: build_model("char-lstm", (6,), CLASSES, (8, 5), {"vocab": VOCAB}), (6,)),
    "transformer-causal": (lambda: build_model("transformer", (6,), CLASSES, None,
                                               {"width": 8, "heads": 2, "vocab": VOCAB}), (6,)),
    "transformer-encoder": (lambda: build_model("transformer", (6,), CLASSES, None,
                                                {"width": 8, "heads": 2, "depth": 1, "vocab": VOCAB, "causal": False}), (6,)),
    "cnn-cifar-shaped": (lambda: build_model("cnn", (3, 16, 16), CLASSES, (8,)), (3, 16, 16)),
    "cnn-2d-images": (lambda: build_model("cnn", (16, 16), CLASSES, (8,)), (16, 16)),
}


@pytest.mark.parametrize("case", list(BUILT_IN))
def test_built_in_models_against_the_reference(case):
    make, shape = BUILT_IN[case]
    check(make(), shape, ids=case.startswith(("char", "transformer")))


def test_built_in_shapes_and_errors():
    cnn = build_model("cnn", (3, 32, 32), 10, (512,))           # FedAvg's CNN for CIFAR: 5×5 kernels, fc 512
    assert cnn.features[0].kernel_size == (5, 5) and cnn.features[0].in_channels == 3
    assert cnn.classifier[0].in_features == 64 * 8 * 8 and cnn.classifier[0].out_features == 512
    assert build_model("cnn", (1, 8, 8), 10, (12,)).features[0].kernel_size == (3, 3)   # the digits' net, unchanged
    lstm = build_model("char-lstm", (80,), 80, (256, 256))                               # LEAF's Shakespeare model
    assert lstm.embed.embedding_dim == 8 and lstm.lstm[0].num_layers == 2 and lstm.lstm[0].hidden_size == 256
    with pytest.raises(ValueError, match=r"model.name = 'char-lstm' needs sequences of int64 token ids"):
        build_model("char-lstm", (1, 8, 8), 10, (16,))
    with pytest.raises(ValueError, match=r"model.width = 10 must be a multiple of model.heads = 4"):
        build_model("transformer", (8,), 10, None, {"width": 10})
    with pytest.raises(ValueError, match=r"needs image inputs"):
        build_model("cnn", (60,), 3, (16,))


# --------------------------------------------------------------------------- exact ν = 2 meta-gradients

META = {
    "lstm": (lambda: Recurrent(nn.LSTM(5, 4, num_layers=2, batch_first=True), embed=nn.Embedding(VOCAB, 5)), (6,)),
    "gru": (lambda: Recurrent(nn.GRU(5, 4, bidirectional=True), embed=nn.Embedding(VOCAB, 5)), (6,)),
    "rnn": (lambda: Recurrent(nn.RNN(5, 4, batch_first=True), embed=nn.Embedding(VOCAB, 5)), (6,)),
    "attention": (ATTENTION["mha-cross-masked"], (5, 8)),
    "encoder-layer": (ATTENTION["encoder-layer-pre-norm-gelu"], (5, 8)),
    "transformer": (BUILT_IN["transformer-causal"][0], (6,)),
}


@pytest.mark.parametrize("case", list(META))
def test_exact_meta_gradient_nu2_equals_the_per_agent_reference(case):
    """The engine's ν-step recursion on the stacked backend vs reference.agent_meta_gradient_autograd."""
    make, shape = META[case]
    ids = shape == (6,)
    model, params, _, _, _, _ = _agents(make(), shape, ids)
    rows = B * N * 2
    X = torch.randint(0, VOCAB, (rows,) + shape) if ids else torch.randn((rows,) + shape, dtype=F64)
    Y = torch.randint(0, CLASSES, (rows,))
    meta = mg.MetaSpec(2, 0.1, "exact")
    idx = torch.randint(0, rows, (B, mg.num_slots(2, "exact"), 4))
    mask = torch.ones(idx.shape, dtype=F64)
    mask[1, :, 3:] = 0
    g, _ = api.block_meta_gradients(backends.make(model, "stacked"), params, X, Y, idx, mask, meta)
    loss = reference.make_loss(model)
    for a in range(B):
        with _math():
            ref, _ = reference.agent_meta_gradient_autograd(loss, {k: p[a] for k, p in params.items()}, X, Y, idx[a],
                                                            mask[a], 2, 0.1, "exact", 1e-3)
        assert _rel(_vector(g[k][a] for k in params), _vector(ref[k] for k in params)) <= TOL, a


def test_parameters_added_together_get_gradients_of_their_own():
    """autograd hands a + b the same gradient tensor for a and b; the recursion updates gradients in
    place (exact: g −= α H g; hf: ∇f(θ+δg) −= ∇f(θ−δg)), so the stacked backend returns copies
    (before: exact off by 9%, hf by 10³ on this model)."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.fc = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(4)), nn.Linear(4, CLASSES)

        def forward(self, x):
            return self.fc(torch.tanh(x * (self.a + self.b)))
    model, params, _, _, _, _ = _agents(M(), (4,), False)
    X, Y = torch.randn(30, 4, dtype=F64), torch.randint(0, CLASSES, (30,))
    for method in ("exact", "hf"):
        meta = mg.MetaSpec(2, 0.1, method, 1e-5)
        idx = torch.randint(0, 30, (B, mg.num_slots(2, method), 4))
        mask = torch.ones(idx.shape, dtype=F64)
        got = {s: api.block_meta_gradients(backends.make(model, s), params, X, Y, idx, mask, meta)[0]
               for s in ("stacked", "loop")}
        assert max(_rel(got["stacked"][k], got["loop"][k]) for k in params) <= (TOL if method == "exact" else 1e-8)


# --------------------------------------------------------------------------- bits and refusals

@pytest.mark.parametrize("case", ["char-lstm", "transformer-causal"])
def test_an_agents_bits_do_not_depend_on_the_block_size(case):
    """float32, widths of 16: agent a's gradient, HVP and logits are the same bits in a block of 1, 2,
    3 or 5 agents (what makes runs bit-identical for any number of ranks)."""
    opts = {"embedding": 16, "vocab": 16} if case == "char-lstm" else {"width": 16, "heads": 2, "vocab": 16}
    model = build_model(case.split("-causal")[0], (8,), 16, (16, 16), opts).float().requires_grad_(False)
    stacked, base = backends.make(model, "stacked"), param_dict(model)
    gen = torch.Generator().manual_seed(3)
    mine = ({k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in base.items()},
            {k: torch.randn(v.shape, generator=gen) for k, v in base.items()},
            torch.randint(0, 16, (16, 8), generator=gen).float(), torch.randint(0, 16, (16,), generator=gen))

    def agent(n: int, pos: int) -> list[torch.Tensor]:
        params = {k: v.unsqueeze(0) + 0.1 * torch.randn((n,) + v.shape) for k, v in base.items()}
        v = {k: torch.randn_like(p) for k, p in params.items()}
        x, y = torch.randint(0, 16, (n, 16, 8)).float(), torch.randint(0, 16, (n, 16))
        for k in params:
            params[k][pos], v[k][pos] = mine[0][k], mine[1][k]
        x[pos], y[pos] = mine[2], mine[3]
        g, f = api.grad(stacked, params, x, y, torch.ones(n, 16))
        h = api.hvp(stacked, params, v, x, y, torch.ones(n, 16))
        return [g[k][pos] for k in g] + [h[k][pos] for k in h] + [f[pos], api.logits(stacked, params, x)[pos]]

    ref = agent(1, 0)
    for n, pos in ((2, 0), (3, 1), (5, 1)):
        assert all(torch.equal(a, b) for a, b in zip(ref, agent(n, pos))), (case, n, pos)


REFUSED = {
    "LSTM(dropout=0.2) at 'rnn'": lambda: Recurrent(nn.LSTM(3, 4, num_layers=2, dropout=0.2)),
    "MultiheadAttention(dropout=0.1) at 'layer.self_attn'": lambda: Attending(
        nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), "plain"),
    "F.scaled_dot_product_attention(dropout_p=0.1)": lambda: _SDPADropout(),
    "nn.Embedding(16777217, ...) has more rows than torch.float32 holds exact ids": lambda: _huge_embedding(),
}


class _SDPADropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, CLASSES)

    def forward(self, x):
        return self.fc(F.scaled_dot_product_attention(x, x, x, dropout_p=0.1).mean(1))


def _huge_embedding():
    with torch.device("meta"):
        return nn.Sequential(nn.Embedding(2 ** 24 + 1, 2), nn.Flatten(), nn.Linear(2, CLASSES))


@pytest.mark.parametrize("text", list(REFUSED))
def test_random_dropout_and_inexact_ids_are_refused(text):
    with pytest.raises(Refused) as e:
        lift(REFUSED[text]())
    assert text in str(e.value) and "\n" not in str(e.value)


def test_what_is_not_lifted_says_why():
    assert lift(Recurrent(nn.LSTM(3, 4, proj_size=2, batch_first=True))).reason == "nn.LSTM at 'rnn' (proj_size)"
    assert lift(Attending(nn.MultiheadAttention(8, 2, add_bias_kv=True, batch_first=True), "self")).reason == \
        "nn.MultiheadAttention at 'layer' (add_bias_kv / add_zero_attn)"


def test_fallback_order_and_messages():
    """strategy.runnable: stacked → vmap → loop, each reason on the start-up line; none: one line."""
    fails = {"stacked": "x", "vmap": "no batching rule"}
    name, _, line = strategy.runnable("stacked", "stacked", "stacked", lambda s: s, fails.get)
    assert (name, line) == ("loop", "loop (vmap (stacked cannot run the model: x) cannot run the model: no batching rule)")
    with pytest.raises(strategy.CannotRun, match=r"^train.strategy = 'vmap' cannot run this model \(no batching rule\); "
                                                 r"use train.strategy = \"loop\"$"):
        strategy.runnable("vmap", "vmap", "vmap", lambda s: s, fails.get)
    with pytest.raises(strategy.CannotRun, match=r"^no strategy can run this model \(vmap \(stacked form not derivable: "
                                                 r"y\): no batching rule; loop: z\)$"):
        strategy.runnable("stacked", "vmap", "vmap (stacked form not derivable: y)", lambda s: s, {**fails, "loop": "z"}.get)


# --------------------------------------------------------------------------- the command line

STARTUP = re.compile(r"^mpifedmeta \S+: .* strategy (.*)$", re.M)
TEXT = "examples/my_text.py"


def _text_run(tmp_path, name: str, model: str, *extra, np_=None, hidden=(16,)):
    cfg = write_tiny_config(tmp_path)
    out = str(tmp_path / name)
    proc = run_cli(["run", cfg] + sets(data__dataset=f"{TEXT}:load", data__path="400", model__name=model,
                                       model__hidden=list(hidden), train__rounds=2, eval__every=2,
                                       output__dir=out) + list(extra), np_=np_)
    return proc, out


@pytest.mark.parametrize("flavour", ["exact", "fo", "hf"])
@pytest.mark.parametrize("model", ["lstm", "encoder"])
def test_user_sequence_models_run_stacked_with_every_flavour(tmp_path, model, flavour):
    proc, out = _text_run(tmp_path, f"{model}-{flavour}", f"{TEXT}:{model}", *sets(train__metagrad=flavour))
    assert_ok(proc)
    assert STARTUP.search(proc.stdout).group(1) == "stacked", describe(proc)
    assert all(v.dtype.kind == "f" and (v == v).all() for v in final_model(out).values())


def test_char_lstm_bit_identical_on_1_2_3_ranks(tmp_path):
    models = {}
    for P in (1, 2, 3):
        proc, out = _text_run(tmp_path, f"P{P}", "char-lstm", *sets(model__embedding=16, model__vocab=24), np_=P,
                              hidden=(16, 16))
        assert_ok(proc)
        assert STARTUP.search(proc.stdout).group(1) == "stacked", describe(proc)
        models[P] = final_model(out)
    for P in (2, 3):
        assert_models_identical(models[1], models[P], f"char-lstm P=1 vs P={P}")


UNLIFTED = """
    import torch
    from torch import nn

    class Projected(nn.Module):            # proj_size: not lifted; vmap has no batching rule for its no-grad forward
        def __init__(self, num_classes):
            super().__init__()
            self.embed, self.rnn = nn.Embedding(num_classes, 8), nn.LSTM(8, 16, batch_first=True, proj_size=4)
            self.fc = nn.Linear(4, num_classes)

        def forward(self, x):
            return self.fc(self.rnn(self.embed(x))[0][:, -1])

    def projected(in_shape, num_classes, hidden):
        return Projected(num_classes)

    class Encoder(nn.Module):              # an activation the stacked form does not know: fused CPU attention
        def __init__(self, num_classes):
            super().__init__()
            self.embed = nn.Embedding(num_classes, 8)
            self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True,
                                                    activation=lambda t: torch.relu(t))
            self.fc = nn.Linear(8, num_classes)

        def forward(self, x):
            return self.fc(self.layer(self.embed(x))[:, -1])

    def encoder(in_shape, num_classes, hidden):
        return Encoder(num_classes)
"""


def test_start_up_check_falls_back_or_exits_with_one_line(tmp_path):
    """An unliftable LSTM: vmap's evaluation forward has no batching rule → the per-agent loop, said on
    the start-up line. Fused attention under exact meta-gradients: neither vmap nor the loop can
    differentiate it twice → exit 2, one line naming the operation, nothing written; fo runs on vmap."""
    path = tmp_path / "unlifted.py"
    path.write_text(UNLIFTED.replace("\n    ", "\n"))
    proc, _ = _text_run(tmp_path, "projected", f"{path}:projected")
    assert_ok(proc)
    assert STARTUP.search(proc.stdout).group(1).startswith(
        "loop (vmap (stacked form not derivable: nn.LSTM at 'rnn' (proj_size)) cannot run the model: "
        "Batching rule not implemented for aten::lstm"), describe(proc)
    proc, out = _text_run(tmp_path, "encoder", f"{path}:encoder")
    assert_one_error_line(proc, 2, "no strategy can run this model (vmap (stacked form not derivable: "
                                   "nn.TransformerEncoderLayer at 'layer' (activation <lambda>)): derivative for "
                                   "aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented; loop: ")
    assert not os.path.exists(os.path.join(out, "metrics.h5"))
    proc, _ = _text_run(tmp_path, "encoder-fo", f"{path}:encoder", *sets(train__metagrad="fo"))
    assert_ok(proc)
    assert STARTUP.search(proc.stdout).group(1).startswith("vmap (stacked form not derivable"), describe(proc)
