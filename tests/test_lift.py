"""The stacked form derived from a model's structure (mpifedmeta/models/lift.py) for every supported
layer and op and for residual blocks: float64 logits, gradients and Hessian-vector products of the
derived ``stacked`` backend against the ``vmap`` backend and an independent per-agent reference
(plain torch.autograd on a copy of the nn.Module holding one agent's weights), ≤ 1e-12 relative;
the built-in models bit for bit against the stacked forward they had before (tests/legacy_stacked.py);
the refusals (BatchNorm, random dropout) and the reasons of what cannot be lifted.
"""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import legacy_stacked
from helpers import REPO
from mpifedmeta.engine import backends
from mpifedmeta.models import lift as liftmod
from mpifedmeta.core import metagrad as mg
from mpifedmeta.core import reference
from mpifedmeta.core.layout import ParamLayout
import engine_api as api
from mpifedmeta.models.lift import Refused, lift
from mpifedmeta.models import build_model, param_dict

F64 = torch.float64
TOL = 1e-12
B, N, CLASSES = 3, 7, 3
ERRORS: dict[str, float] = {}        # the largest relative error of each case (printed with -s)


@pytest.fixture(autouse=True)
def _seeded():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        yield


def _ce(logits, y, mask):
    ce = F.cross_entropy(logits, y, reduction="none")
    return (ce * mask).sum() / mask.sum().clamp_min(1.0)


def _agents(model, in_shape, dtype=F64):
    """Every agent's own weights (B, ...), inputs (B, N, *in_shape), labels, a padded mask, and v."""
    model = model.to(dtype).requires_grad_(False)
    params = {k: v.unsqueeze(0) + 0.3 * v.abs().mean().clamp_min(0.1) * torch.randn((B,) + v.shape, dtype=dtype)
              for k, v in param_dict(model).items()}
    x = torch.randn((B, N) + tuple(in_shape), dtype=dtype)
    y = torch.randint(0, CLASSES, (B, N))
    mask = (torch.arange(N) < torch.tensor([N, N - 2, N - 3]).unsqueeze(1)).to(dtype)
    v = {k: torch.randn_like(p) for k, p in params.items()}
    return model, params, x, y, mask, v


def _reference(model, params, x, y, mask, v):
    """Per agent: load its weights into a copy of the module, plain autograd (grad, double backward)."""
    out = {"logits": [], "grad": [], "hvp": []}
    for a in range(B):
        m = copy.deepcopy(model)
        named = dict(m.named_parameters())
        for k, p in named.items():
            p.data = params[k][a].clone()
            p.requires_grad_(True)
        leaves = [named[k] for k in params]
        logits = m(x[a])
        g = torch.autograd.grad(_ce(logits, y[a], mask[a]), leaves, create_graph=True, allow_unused=True)
        used = [i for i, t in enumerate(g) if t is not None]          # a parameter forward never reads: 0
        hv = torch.autograd.grad([g[i] for i in used], [leaves[i] for i in used],
                                 grad_outputs=[v[list(params)[i]][a] for i in used], allow_unused=True)
        hv = dict(zip(used, hv))
        out["logits"].append(logits.detach())
        out["grad"].append(_vector(torch.zeros_like(params[k][a]) if t is None else t.detach()
                                   for k, t in zip(params, g)))
        out["hvp"].append(_vector(torch.zeros_like(params[k][a]) if hv.get(i) is None else hv[i]
                                  for i, k in enumerate(params)))
    return out


def _vector(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def check(name: str, model: nn.Module, in_shape) -> float:
    """The derived stacked backend equals vmap and the per-agent reference: logits, and every agent's
    gradient and HVP as one vector (relative 2-norm error)."""
    model, params, x, y, mask, v = _agents(model, in_shape)
    result = lift(model)
    assert result.forward is not None, result.reason
    ref = _reference(model, params, x, y, mask, v)
    got = {}
    for s in ("stacked", "vmap"):
        be = backends.make(model, s)
        got[s] = (api.logits(be, params, x), api.grad(be, params, x, y, mask)[0], api.hvp(be, params, v, x, y, mask))
    worst = 0.0
    for backend, (logits, g, hv) in got.items():
        for a in range(B):
            errs = (_rel(logits[a], ref["logits"][a]), _rel(_vector(g[k][a] for k in params), ref["grad"][a]),
                    _rel(_vector(hv[k][a] for k in params), ref["hvp"][a]))
            assert max(errs) <= TOL, (name, backend, a, errs)
            worst = max(worst, *errs)
    assert _rel(ref["grad"][0], ref["grad"][1]) > 1e-3, "agents do not differ"
    ERRORS[name] = worst
    return worst


class Net(nn.Module):
    """``body`` (or ``fn(self, x)`` using it), then flatten(1) and a Linear head to CLASSES."""

    def __init__(self, body: nn.Module, fn=None):
        super().__init__()
        self.body, self.fn = body, fn
        self.head = nn.Linear(1, CLASSES)

    def forward(self, x):
        h = self.body(x) if self.fn is None else self.fn(self, x)
        return self.head(h.flatten(1))


def net(body: nn.Module, in_shape: tuple, fn=None) -> Net:
    """A Net whose head width comes from one forward pass on a sample."""
    m = Net(body, fn)
    with torch.no_grad():
        h = body(torch.zeros((2,) + in_shape)) if fn is None else fn(m, torch.zeros((2,) + in_shape))
    m.head = nn.Linear(h[0].numel(), CLASSES)
    return m


# --------------------------------------------------------------------------- layers, one at a time

ACTIVATIONS = {"relu": nn.ReLU(), "elu": nn.ELU(0.7), "tanh": nn.Tanh(), "sigmoid": nn.Sigmoid(), "gelu": nn.GELU(),
               "gelu-tanh": nn.GELU("tanh"), "silu": nn.SiLU(), "leaky_relu": nn.LeakyReLU(0.2),
               "softplus": nn.Softplus(beta=2.0, threshold=3.0)}


@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_activation_modules(act):
    check(f"nn.{act}", nn.Sequential(nn.Linear(6, 8), ACTIVATIONS[act], nn.Linear(8, CLASSES)), (6,))


FUNCTIONAL = {
    "F.elu": lambda h: F.elu(h, alpha=0.5), "F.leaky_relu": lambda h: F.leaky_relu(h, 0.1),
    "F.softplus": lambda h: F.softplus(h, beta=1.5, threshold=2.0), "F.gelu": lambda h: F.gelu(h, approximate="tanh"),
    "F.silu": F.silu, "F.relu": F.relu, "torch.tanh": torch.tanh, "torch.sigmoid": torch.sigmoid,
    "Tensor.relu": lambda h: h.relu(), "Tensor.sigmoid": lambda h: h.sigmoid(), "Tensor.tanh": lambda h: h.tanh(),
    "neg-sub-div": lambda h: (1.0 - (-h) / 2.0).exp() * 0.1, "pow": lambda h: h ** 2 + torch.pow(h, 3) * 0.1,
}


@pytest.mark.parametrize("op", list(FUNCTIONAL))
def test_functional_activations_and_tensor_methods(op):
    fn = FUNCTIONAL[op]
    check(op, net(nn.Linear(6, 8), (6,), lambda m, x: fn(m.body(x))), (6,))


CONVS = {
    "conv1d": (nn.Conv1d(2, 4, 3, stride=2, padding=1, dilation=2), (2, 13)),
    "conv1d-nobias-same": (nn.Conv1d(2, 3, 3, padding="same", dilation=2, bias=False), (2, 9)),
    "conv2d": (nn.Conv2d(2, 4, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2)), (2, 7, 6)),
    "conv2d-reflect-nobias": (nn.Conv2d(1, 3, 3, padding=1, bias=False, padding_mode="reflect"), (1, 6, 6)),
    "conv2d-same-circular": (nn.Conv2d(2, 2, 3, padding="same", padding_mode="circular"), (2, 5, 5)),
    "conv2d-groups": (nn.Conv2d(4, 6, 3, groups=2), (4, 5, 5)),
}


@pytest.mark.parametrize("case", list(CONVS))
def test_convolutions(case):
    layer, shape = CONVS[case]
    check(case, net(nn.Sequential(layer, nn.Tanh()), shape), shape)


POOLS = {
    "maxpool2d": (nn.MaxPool2d(3, stride=2, padding=1), (3, 7, 7)),
    "avgpool2d-ceil": (nn.AvgPool2d(2, ceil_mode=True, count_include_pad=False), (3, 5, 5)),
    "adaptiveavgpool2d": (nn.AdaptiveAvgPool2d((2, 3)), (3, 6, 7)),
    "adaptivemaxpool2d": (nn.AdaptiveMaxPool2d(2), (3, 5, 5)),
    "maxpool1d": (nn.MaxPool1d(2), (3, 8)),
    "avgpool1d": (nn.AvgPool1d(3, stride=2, padding=1), (3, 9)),
    "adaptiveavgpool1d": (nn.AdaptiveAvgPool1d(3), (3, 8)),
}


@pytest.mark.parametrize("where", ["after-conv", "on-input"])
@pytest.mark.parametrize("case", list(POOLS))
def test_pooling_in_both_layouts(case, where):
    """After a convolution the activation is grouped (n, B·C, ...); on the input it is stacked."""
    pool, shape = POOLS[case]
    conv = (nn.Conv2d if len(shape) == 3 else nn.Conv1d)(shape[0], shape[0], 3, padding=1)
    body = nn.Sequential(conv, nn.ELU(), pool) if where == "after-conv" else nn.Sequential(pool, nn.Tanh())
    check(f"{case}-{where}", net(body, shape), shape)


def test_functional_pools_and_adaptive_pool_after_conv():
    def fn(m, x):
        h = F.max_pool2d(torch.relu(m.body(x)), 2)
        return F.adaptive_avg_pool2d(h, 1) + F.avg_pool2d(h, 2, stride=2)
    check("F.pools", net(nn.Conv2d(2, 4, 3, padding=1), (2, 8, 8), fn), (2, 8, 8))


FLATTENS = {
    "view-size0": lambda m, x: m.body(x).view(x.size(0), -1),
    "reshape-shape0": lambda m, x: m.body(x).reshape(x.shape[0], -1),
    "torch.flatten": lambda m, x: torch.flatten(m.body(x), 1),
    "flatten-1-2": lambda m, x: m.body(x).flatten(1, 2),
    "nn.Flatten": lambda m, x: m.body[1](m.body[0](x)),
    "view-minus1-static": lambda m, x: m.body(x).view(-1, 4 * 36),
}


@pytest.mark.parametrize("case", list(FLATTENS))
def test_flatten_and_reshape_after_conv(case):
    body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Flatten()) if case == "nn.Flatten" else nn.Conv2d(1, 4, 3, padding=1)
    check(case, net(body, (1, 6, 6), FLATTENS[case]), (1, 6, 6))


def test_reshape_permute_transpose_unsqueeze_squeeze_on_stacked():
    def fn(m, x):                                   # x: (n, 4, 5)
        h = m.body(x.permute(0, 2, 1)).transpose(1, 2)             # (n, 6, 5)
        h = h.unsqueeze(1).squeeze(1).reshape(x.size(0), 3, 10)
        return h.permute(0, -1, 1) * 0.5 + h.transpose(-1, -2)
    check("shape-ops", net(nn.Linear(4, 6), (4, 5), fn), (4, 5))


NORMS = {
    "layernorm": (nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh()), (6,)),
    "layernorm-2d": (nn.Sequential(nn.LayerNorm((4, 5)), nn.GELU()), (4, 5)),
    "layernorm-no-affine": (nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8, elementwise_affine=False)), (6,)),
    "layernorm-no-bias": (nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8, bias=False)), (6,)),
    "layernorm-after-conv": (nn.Sequential(nn.Conv2d(2, 3, 3), nn.LayerNorm((3, 3))), (2, 5, 5)),
    "groupnorm-conv": (nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.SiLU()), (2, 5, 5)),
    "groupnorm-conv1d": (nn.Sequential(nn.Conv1d(2, 6, 3), nn.GroupNorm(3, 6)), (2, 9)),
    "groupnorm-dense": (nn.Sequential(nn.Linear(6, 8), nn.GroupNorm(2, 8), nn.Tanh()), (6,)),   # groups of 4 (of 2, a ±1 step: ill-conditioned)
    "groupnorm-no-affine": (nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(1, 4, affine=False)), (2, 5, 5)),
    "instancenorm2d": (nn.Sequential(nn.Conv2d(2, 4, 3), nn.InstanceNorm2d(4, affine=True)), (2, 6, 6)),
    "dropout-p0": (nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.0), nn.Tanh()), (6,)),
}


@pytest.mark.parametrize("case", list(NORMS))
def test_norms_and_identity_dropout(case):
    body, shape = NORMS[case]
    check(case, net(body, shape), shape)


def test_functional_norms_with_own_parameters():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 4, 3, padding=1)
            self.gw, self.gb = nn.Parameter(torch.rand(4) + 0.5), nn.Parameter(torch.randn(4))
            self.lw, self.lb = nn.Parameter(torch.rand(64) + 0.5), nn.Parameter(torch.randn(64))
            self.fc = nn.Linear(64, CLASSES)

        def forward(self, x):
            h = F.group_norm(self.conv(x), 2, self.gw, self.gb, 1e-4)
            h = F.dropout(h, 0.0, self.training)
            return self.fc(F.layer_norm(h.flatten(1), (64,), self.lw, self.lb))
    check("F.group_norm+F.layer_norm", M(), (2, 4, 4))


# --------------------------------------------------------------------------- parameters used directly

class Direct(nn.Module):
    """Parameters used in forward: x @ W.T + b in every spelling, x @ W, F.linear, x * scale."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.w, self.b = nn.Parameter(torch.randn(8, 6) * 0.4), nn.Parameter(torch.randn(8) * 0.1)
        self.wt = nn.Parameter(torch.randn(6, 8) * 0.4)
        self.scale, self.s0 = nn.Parameter(torch.rand(8) + 0.5), nn.Parameter(torch.tensor(0.7))
        self.out = nn.Linear(8, CLASSES)

    def forward(self, x):
        x = x.flatten(1)
        h = {"T": lambda: x @ self.w.T + self.b, "t": lambda: x.matmul(self.w.t()) + self.b,
             "transpose": lambda: torch.matmul(x, self.w.transpose(0, 1)) + self.b,
             "bias-first": lambda: self.b + x @ self.w.T, "torch.add": lambda: torch.add(x @ self.w.mT, self.b),
             "x@W": lambda: x @ self.wt - self.b, "F.linear": lambda: F.linear(x, self.w, self.b),
             "F.linear-nobias": lambda: F.linear(x, self.w)}[self.how]()
        return self.out(torch.tanh(h) * self.scale / self.s0)


@pytest.mark.parametrize("how", ["T", "t", "transpose", "bias-first", "torch.add", "x@W", "F.linear", "F.linear-nobias"])
def test_parameters_used_directly(how):
    check(f"direct-{how}", Direct(how), (2, 3))


def test_parameter_broadcast_over_grouped_activations():
    """A per-channel parameter (C, 1, 1) on grouped activations (the fast path), a (W,) one (through
    the stacked layout), a buffer and a number."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 4, 3, padding=1)
            self.gain, self.row = nn.Parameter(torch.rand(4, 1, 1) + 0.5), nn.Parameter(torch.randn(5))
            self.register_buffer("offset", torch.linspace(-1, 1, 5))

        def forward(self, x):
            h = self.conv(x)
            return torch.tanh(h * self.gain - self.row + self.offset) / 2.0 + 1.0
    check("params-on-grouped", net(M(), (2, 4, 5)), (2, 4, 5))


# --------------------------------------------------------------------------- residual blocks and mixing ops

class ConvResidual(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.stem = nn.Conv2d(2, c, 3, padding=1)
        self.c1, self.n1 = nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(2, c)
        self.c2, self.n2 = nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(2, c)

    def forward(self, x):
        x = torch.tanh(self.stem(x))
        h = F.gelu(self.n1(self.c1(x)))
        return F.relu(x + self.n2(self.c2(h)))


class DenseResidual(nn.Module):
    """Pre-norm MLP residual with a multiplicative gate."""

    def __init__(self, d=8):
        super().__init__()
        self.inp = nn.Linear(6, d)
        self.norm, self.f, self.g = nn.LayerNorm(d), nn.Linear(d, d), nn.Linear(d, d)
        self.out = nn.Linear(d, CLASSES)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.f(self.norm(h)) * torch.sigmoid(self.g(h))
        return self.out(F.silu(h - 0.5 * h))


def test_residual_blocks():
    check("residual-conv", net(ConvResidual(), (2, 6, 6)), (2, 6, 6))
    check("residual-dense", DenseResidual(), (6,))


def test_input_skip_into_grouped_layout():
    """The input (stacked) added to a convolution's output (grouped): converted once, reused."""
    check("input-skip", net(_Skip(), (2, 5, 5)), (2, 5, 5))


class _Skip(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        return torch.tanh(self.conv(x)) + x + self.conv(x) * x


def test_reductions_softmax_and_cat():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1)
            self.fc = nn.Linear(5 + 5 + 4, 6)

        def forward(self, x):
            g = torch.cat([self.a(x), torch.tanh(self.b(x))], 1)          # grouped, channel cat
            g = torch.cat([g, g * 0.5], dim=2)                               # grouped, spatial cat
            pooled = g.mean((2, 3))                                          # (n, 5), grouped
            h = torch.tanh(self.fc(torch.cat([pooled, g.amax(dim=-1).sum(-1, keepdim=True).flatten(1),
                                              g.sum(dim=(1, 2)).flatten(1)[:, :4] * 0.1], -1)))
            return h * F.softmax(h, dim=-1) + torch.logsumexp(h, dim=-1, keepdim=True)
    check("reductions-cat-softmax", net(M(), (2, 4, 4)), (2, 4, 4))


def test_attention_like_activation_products():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):                                    # x: (n, 5 tokens, 4)
            att = F.softmax(self.q(x) @ self.k(x).transpose(-2, -1) / 2.0, dim=-1)
            return (att @ self.v(x)) + x
    check("attention", net(M(), (5, 4)), (5, 4))


# --------------------------------------------------------------------------- the built-in models

SHAPES = {"linear": (1, 4, 4), "mlp": (1, 6, 6), "cnn": (1, 8, 8)}
HIDDEN = {"linear": None, "mlp": (9, 7), "cnn": (8,)}


@pytest.mark.parametrize("name", ["linear", "mlp", "cnn"])
def test_builtin_models_against_the_reference(name):
    check(f"builtin-{name}", build_model(name, SHAPES[name], CLASSES, HIDDEN[name]), SHAPES[name])


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", ["linear", "mlp", "cnn"])
def test_builtin_models_bit_identical_to_the_previous_stacked_forward(name, dtype):
    model, params, x, y, mask, v = _agents(build_model(name, SHAPES[name], CLASSES, HIDDEN[name]), SHAPES[name], dtype)
    new, old = backends.make(model, "stacked"), backends.Stacked(legacy_stacked.stacked_forward(model), ParamLayout.of(dict(model.named_parameters())))
    assert torch.equal(api.logits(new, params, x), api.logits(old, params, x))
    (g_new, f_new), (g_old, f_old) = api.grad(new, params, x, y, mask), api.grad(old, params, x, y, mask)
    assert torch.equal(f_new, f_old) and all(torch.equal(g_new[k], g_old[k]) for k in params)
    h_new, h_old = api.hvp(new, params, v, x, y, mask), api.hvp(old, params, v, x, y, mask)
    assert all(torch.equal(h_new[k], h_old[k]) for k in params)


def test_meta_gradient_of_a_residual_model_equals_the_per_agent_reference():
    """The engine's ν-step recursion on the derived backend vs metagrad.agent_meta_gradient_autograd."""
    model, params, x, _, _, _ = _agents(DenseResidual(), (6,))
    X, Y = x.reshape((B * N, 6)), torch.randint(0, CLASSES, (B * N,))
    meta = mg.MetaSpec(2, 0.1, "exact")
    idx = torch.randint(0, B * N, (B, mg.num_slots(2, "exact"), 6))
    mask = torch.ones(idx.shape, dtype=F64)
    mask[1, :, 4:] = 0
    g, _ = api.block_meta_gradients(backends.make(model, "stacked"), params, X, Y, idx, mask, meta)
    loss = reference.make_loss(model)
    for a in range(B):
        ref, _ = reference.agent_meta_gradient_autograd(loss, {k: p[a] for k, p in params.items()}, X, Y, idx[a], mask[a],
                                                 2, 0.1, "exact", 1e-3)
        assert max(_rel(g[k][a], ref[k]) for k in params) <= TOL


# --------------------------------------------------------------------------- the block size does not matter

def _example_model():
    return build_model(f"{REPO}/examples/tanh_resnet.py:build", (1, 8, 8), CLASSES, (16,))


BLOCK_SIZE_CASES = {
    "linear": (lambda: build_model("linear", (1, 8, 8), CLASSES, None), (1, 8, 8)),
    "mlp": (lambda: build_model("mlp", (1, 8, 8), CLASSES, (16, 8)), (1, 8, 8)),
    "cnn": (lambda: build_model("cnn", (1, 8, 8), CLASSES, (12,)), (1, 8, 8)),
    "example": (_example_model, (1, 8, 8)),
    "residual-conv": (lambda: net(ConvResidual(), (2, 6, 6)), (2, 6, 6)),
    "residual-dense": (DenseResidual, (6,)),
    "conv-groupnorm-gelu": (lambda: net(nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.GELU()),
                                        (2, 6, 6)), (2, 6, 6)),
    "conv1d-pool-layernorm": (lambda: net(nn.Sequential(nn.Conv1d(2, 4, 3), nn.AvgPool1d(2), nn.Flatten(),
                                                        nn.LayerNorm(12), nn.Tanh()), (2, 9)), (2, 9)),
}


@pytest.mark.parametrize("case", list(BLOCK_SIZE_CASES))
def test_an_agents_bits_do_not_depend_on_the_block_size(case):
    """float32: agent a's gradient, HVP and logits are the same bits in a block of 1, 2, 3, 4, 5 or 8
    agents (at positions 0 and 1, beside different agents): what makes runs bit-identical for any
    number of ranks. Measured exceptions on CPU, for every backend and before lift.py too: a
    per-agent tensor whose size is not a multiple of 16 floats — MKL's GEMM rounds differently at
    another alignment (the agent's offset in the block; MKL_CBWR removes it), and the last agent
    of a block meets the scalar tail of vectorized elementwise kernels (ELU's expm1, GELU's erf)."""
    make, shape = BLOCK_SIZE_CASES[case]
    model = make().float().requires_grad_(False)
    stacked = backends.make(model, "stacked")
    base = param_dict(model)
    gen = torch.Generator().manual_seed(3)
    mine = ({k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in base.items()},
            {k: torch.randn(v.shape, generator=gen) for k, v in base.items()},
            torch.randn((16,) + shape, generator=gen), torch.randint(0, CLASSES, (16,), generator=gen))

    def agent(B: int, pos: int) -> list[torch.Tensor]:
        params = {k: v.unsqueeze(0) + 0.1 * torch.randn((B,) + v.shape) for k, v in base.items()}
        v = {k: torch.randn_like(p) for k, p in params.items()}
        x, y, mask = torch.randn((B, 16) + shape), torch.randint(0, CLASSES, (B, 16)), torch.ones(B, 16)
        for k in params:
            params[k][pos], v[k][pos] = mine[0][k], mine[1][k]
        x[pos], y[pos] = mine[2], mine[3]
        g, f = api.grad(stacked, params, x, y, mask)
        transposed = {k: t.transpose(-1, -2).contiguous().transpose(-1, -2) for k, t in v.items()}  # like a gradient
        h = api.hvp(stacked, params, transposed, x, y, mask)
        return [g[k][pos] for k in g] + [h[k][pos] for k in h] + [f[pos], api.logits(stacked, params, x)[pos]]

    ref = agent(1, 0)
    for B, pos in ((2, 0), (3, 1), (4, 0), (5, 1), (8, 1)):
        got = agent(B, pos)
        assert all(torch.equal(a, b) for a, b in zip(ref, got)), (case, B, pos)


# --------------------------------------------------------------------------- refusals and reasons

def _model(forward, **modules):
    cls = type("M", (nn.Module,), {"forward": forward})
    m = cls()
    nn.Module.__init__(m)
    for k, v in modules.items():
        setattr(m, k, v)
    return m


REFUSED = {
    "bn2d": (lambda: _model(lambda s, x: s.bn1(x), bn1=nn.BatchNorm2d(1)),
             "BatchNorm2d at 'bn1' keeps running statistics, which are not part of the meta-objective; use GroupNorm or LayerNorm"),
    "bn1d-no-stats": (lambda: _model(lambda s, x: s.bn(x), bn=nn.BatchNorm1d(4, track_running_stats=False)),
                      "BatchNorm1d at 'bn' normalizes with batch statistics, which mix an agent's samples"),
    "instancenorm-stats": (lambda: _model(lambda s, x: s.n(x), n=nn.InstanceNorm2d(4, track_running_stats=True)),
                           "InstanceNorm2d at 'n' keeps running statistics"),
    "F.batch_norm": (lambda: _model(lambda s, x: F.batch_norm(x, None, None, training=True)),
                     "F.batch_norm at node 'batch_norm' normalizes with batch statistics"),
    "dropout": (lambda: _model(lambda s, x: s.drop(x), drop=nn.Dropout(0.5)),
                "Dropout(p=0.5) at 'drop' makes every gradient random; use p = 0 or remove it"),
    "F.dropout": (lambda: _model(lambda s, x: F.dropout(x, 0.3, s.training)),
                  "F.dropout(p=0.3) at node 'dropout' makes every gradient random; use p = 0 or remove it"),
    "untraceable-with-dropout": (lambda: _model(lambda s, x: s.d(x) if x.sum() > 0 else x, d=nn.Dropout2d(0.1)),
                                 "Dropout2d(p=0.1) at 'd' makes every gradient random"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_batchnorm_and_random_dropout_are_refused(case):
    make, text = REFUSED[case]
    with pytest.raises(Refused) as e:
        lift(make())
    assert text in str(e.value) and "\n" not in str(e.value)


def test_dropout_outside_training_or_at_zero_lifts():
    assert lift(_model(lambda s, x: F.dropout(x.flatten(1), 0.5, training=False))).forward is not None
    assert lift(_model(lambda s, x: s.d(x.flatten(1)), d=nn.Dropout(0.0))).forward is not None


NOT_LIFTABLE = {
    "torch.sort at node 'sort'": lambda: _model(lambda s, x: s.fc(torch.sort(x, dim=1).values), fc=nn.Linear(6, 3)),
    "nn.LSTM at 'rnn' (proj_size)": lambda: _model(lambda s, x: s.rnn(x)[0].flatten(1),
                                                   rnn=nn.LSTM(6, 3, batch_first=True, proj_size=2)),
    "nn.Conv3d at 'conv'": lambda: _model(lambda s, x: s.conv(x).flatten(1), conv=nn.Conv3d(1, 2, 1)),
    "nn.PReLU at 'act'": lambda: _model(lambda s, x: s.act(x), act=nn.PReLU()),
    "Tensor.mean at node 'mean' (over the sample dimension)": lambda: _model(lambda s, x: x - x.mean(0)),
    "Tensor.sum at node 'sum_1' (over every dimension, the sample one included)": lambda: _model(lambda s, x: x * x.sum()),
    "torch.fx cannot trace M.forward: symbolically traced variables cannot be used as inputs to control flow":
        lambda: _model(lambda s, x: x if x.sum() > 0 else -x),
    "F.conv2d at node 'conv2d' (a weight that is not a parameter)": lambda: _buffer_conv(),
}


def _buffer_conv():
    m = _model(lambda s, x: F.conv2d(x, s.k).flatten(1))
    m.register_buffer("k", torch.ones(1, 1, 3, 3))
    return m


@pytest.mark.parametrize("reason", list(NOT_LIFTABLE))
def test_reasons_of_models_that_run_on_vmap(reason):
    model = NOT_LIFTABLE[reason]()
    result = lift(model)
    assert result.forward is None and result.reason.startswith(reason), result.reason
    assert backends.resolve("stacked", model) == ("vmap", f"vmap (stacked form not derivable: {result.reason})")
    assert not backends.has_stacked_form(model) and backends.default_strategy(model) == "vmap"


def test_strategy_resolution_for_a_model_that_cannot_be_lifted():
    """The bug of issue 19: train.strategy = "stacked" (the default) for such a model runs vmap and
    says why, also when resumed (strategy.choose, the one place the setting is resolved)."""
    from mpifedmeta.engine import strategy
    model = NOT_LIFTABLE["torch.sort at node 'sort'"]()
    reason = "vmap (stacked form not derivable: torch.sort at node 'sort')"
    assert strategy.choose("stacked", model, None, {}, None, 4, 2, 0, None, None) == ("vmap", reason)
    assert strategy.choose("auto", model, None, {}, None, 4, 2, 0, "stacked", None) == \
        ("vmap", reason + " (recorded in the checkpoint)")
    assert strategy.choose("loop", model, None, {}, None, 4, 2, 0, None, None) == ("loop", "loop")
    built_in = build_model("mlp", (6,), 3, (4,))
    assert strategy.choose("stacked", built_in, None, {}, None, 4, 2, 0, None, None) == ("stacked", "stacked")


def test_lift_is_cached_per_model_and_does_not_keep_it_alive():
    model = _model(lambda s, x: s.fc(x + s.shift), fc=nn.Linear(6, 3))
    model.register_buffer("shift", torch.ones(6))           # a root buffer: read through a weak reference
    assert lift(model) is lift(model) and lift(model).forward is not None and model in liftmod._CACHE
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


def test_derived_forward_keeps_only_the_steps_it_needs():
    """x @ W.T + b is one step (the matmul and transpose are fused away); flatten + dense for linear."""
    assert lift(build_model("linear", (6,), 3, None)).forward.steps == 2
    assert lift(build_model("mlp", (1, 4, 4), 3, (5,))).forward.steps == 4


def test_print_errors(capsys):
    """Not a check: the largest relative error of every case above (run with -s to see them)."""
    if ERRORS:
        with capsys.disabled():
            print(f"\n[lift] {len(ERRORS)} cases, largest relative error {max(ERRORS.values()):.2e} "
                  f"({max(ERRORS, key=ERRORS.get)})")
