"""Model definitions. Models are used functionally: parameters live in dicts of tensors
(stacked along a leading agent dimension for a block) and are applied either with
``torch.func.functional_call`` (any model, under vmap) or, for the built-in architectures, by
:func:`stacked_forward`: the whole block as one model whose every parameter carries the agent
axis (B, ...), a handful of batched kernels per layer.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    """Multinomial logistic regression: logits = x · weightᵀ + bias."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_classes, in_features))
        self.bias = nn.Parameter(torch.zeros(num_classes))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1.0 / math.sqrt(in_features)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x):
        return x.flatten(1) @ self.weight.T + self.bias


class MLP(nn.Module):
    """Fully connected net with ELU activations (Per-FedAvg uses 784-80-60-10)."""

    def __init__(self, in_features: int, num_classes: int, hidden: tuple[int, ...] = (80, 60)):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ELU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x.flatten(1))


class CNN(nn.Module):
    """Small 2-conv net (conv32-pool-conv64-pool-fc) for single-channel images such as 28×28."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...] = (128,)):
        super().__init__()
        channels, height, width = in_shape
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        flat = 64 * (height // 4) * (width // 4)
        fc: list[nn.Module] = []
        for h in hidden:
            fc += [nn.Linear(flat, h), nn.ReLU()]
            flat = h
        fc.append(nn.Linear(flat, num_classes))
        self.classifier = nn.Sequential(*fc)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def _build_linear(in_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...] | None) -> nn.Module:
    return Linear(int(math.prod(in_shape)), num_classes)


def _build_mlp(in_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...] | None) -> nn.Module:
    return MLP(int(math.prod(in_shape)), num_classes, tuple(hidden) if hidden is not None else (80, 60))


def _build_cnn(in_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...] | None) -> nn.Module:
    if len(in_shape) != 3:
        raise ValueError(f"model.name = 'cnn' needs image inputs (C, H, W), got feature shape {tuple(in_shape)}")
    return CNN(tuple(in_shape), num_classes, tuple(hidden) if hidden is not None else (128,))


Builder = Callable[[tuple, int, "tuple[int, ...] | None"], nn.Module]
#: Model name → builder(in_shape, num_classes, hidden). Adding a model = one builder + one entry here.
MODELS: dict[str, Builder] = {"linear": _build_linear, "mlp": _build_mlp, "cnn": _build_cnn}


def build_model(name: str, in_shape: tuple[int, ...], num_classes: int,
                hidden: tuple[int, ...] | None = None) -> nn.Module:
    """Build the model ``name`` for inputs of shape ``in_shape`` (without the batch dimension)."""
    if name not in MODELS:
        raise ValueError(f"model.name = {name!r} is not one of {', '.join(MODELS)}")
    return MODELS[name](tuple(in_shape), num_classes, hidden)


def param_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters as a plain (detached) dict, named as in ``named_parameters()``."""
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def flatten(params: dict[str, torch.Tensor], batch_dims: int = 0) -> torch.Tensor:
    """Concatenate parameters into one vector (per leading batch index when batch_dims=1)."""
    if batch_dims == 0:
        return torch.cat([p.reshape(-1) for p in params.values()])
    lead = next(iter(params.values())).shape[0]
    return torch.cat([p.reshape(lead, -1) for p in params.values()], dim=1)


def unflatten(vector: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`flatten` for unbatched parameters shaped like ``like``."""
    out, offset = {}, 0
    for name, p in like.items():
        n = p.numel()
        out[name] = vector[offset:offset + n].view_as(p)
        offset += n
    return out


def num_params(params: dict[str, torch.Tensor]) -> int:
    return sum(p.numel() for p in params.values())


# --------------------------------------------------------------------------- stacked form
# A block of B agents as one model: parameter ``name`` has shape (B, *global shape) and keeps the
# global model's name, inputs are (B, n, *features), logits (B, n, classes). Agents share no
# parameter, so the gradient of Σ_agents loss_a w.r.t. the stacked parameters is every agent's own
# gradient, and double backward with stacked vectors gives every agent's Hessian-vector product.

def _dense(w: torch.Tensor, b: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """(B, n, in) → (B, n, out): h·Wᵀ + b per agent, one batched GEMM.

    Kept in this form on purpose: measured with MKL (torch 2.13 CPU), the transposed form
    (W·hᵀ + b)ᵀ gives one agent different bits depending on its position in the batch for small
    shapes (e.g. (B, 10, 60)·(B, 60, 9)): batched small GEMMs with both operands non-transposed
    are vectorised across the batch. h·Wᵀ is position-independent (tests/test_mpi.py)."""
    return torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))


def _conv(w: torch.Tensor, b: torch.Tensor, h: torch.Tensor, padding: int) -> torch.Tensor:
    """Per-agent convolution as one grouped convolution in channels-last memory format.

    Activations are kept sample-major, (n, B·C, H, W), so that the B agents are the groups and no
    transpose is needed between layers; ``w``: (B, O, C, k, k), ``b``: (B, O). Measured on CPU
    (CNN 28×28, 8 agents, one local step, ν ∈ {0, 1}): channels-last grouped convolution
    0.81–0.88× the time of the same in NCHW, im2col (unfold) + bmm 2.3–2.6×; the NCHW grouped
    convolution about equal to the per-agent loop.
    """
    B, O = w.shape[:2]
    cl = torch.channels_last
    return F.conv2d(h.contiguous(memory_format=cl), w.reshape((B * O,) + w.shape[2:]).contiguous(memory_format=cl),
                    b.reshape(B * O), padding=padding, groups=B)


def _layers(model: nn.Module) -> list[tuple] | None:
    """The built-in models as a list of stacked operations, or None for any other model."""
    def seq(modules: nn.Sequential, prefix: str) -> list[tuple] | None:
        ops = []
        for i, m in enumerate(modules):
            name = f"{prefix}.{i}"
            if isinstance(m, nn.Linear):
                ops.append(("dense", f"{name}.weight", f"{name}.bias"))
            elif isinstance(m, nn.Conv2d):
                if m.stride != (1, 1) or m.dilation != (1, 1) or m.groups != 1 or m.padding_mode != "zeros" \
                        or len(set(m.padding)) != 1 or m.bias is None:
                    return None
                ops.append(("conv", f"{name}.weight", f"{name}.bias", m.padding[0]))
            elif isinstance(m, nn.ELU):
                ops.append(("elu", m.alpha))
            elif isinstance(m, nn.ReLU):
                ops.append(("relu",))
            elif isinstance(m, nn.MaxPool2d) and m.stride == m.kernel_size and m.padding == 0:
                ops.append(("pool", m.kernel_size))
            else:
                return None
        return ops

    if type(model) is Linear:
        return [("flatten",), ("dense", "weight", "bias")]
    if type(model) is MLP:
        ops = seq(model.net, "net")
        return None if ops is None else [("flatten",)] + ops
    if type(model) is CNN:
        feats, fc = seq(model.features, "features"), seq(model.classifier, "classifier")
        return None if feats is None or fc is None else [("images",)] + feats + [("flatten",)] + fc
    return None


def stacked_forward(model: nn.Module):
    """``forward(params, x)`` of the block model: params stacked (B, ...) under the global model's
    names, x (B, n, *features) → logits (B, n, classes). None if ``model`` has no stacked form."""
    ops = _layers(model)
    if ops is None:
        return None

    def forward(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        B, n = x.shape[:2]
        h, images = x, False
        for op in ops:
            kind = op[0]
            if kind == "images":        # (B, n, C, H, W) → sample-major (n, B·C, H, W)
                h, images = h.transpose(0, 1).reshape((n, B * h.shape[2]) + h.shape[3:]), True
            elif kind == "flatten":
                if images:               # back to agent-major, each image flattened as (C, H, W)
                    h, images = h.reshape((n, B, -1)).transpose(0, 1), False
                else:
                    h = h.reshape(B, n, -1)
            elif kind == "dense":
                h = _dense(params[op[1]], params[op[2]], h)
            elif kind == "conv":
                h = _conv(params[op[1]], params[op[2]], h, op[3])
            elif kind == "elu":
                h = F.elu(h, op[1])
            elif kind == "relu":
                h = F.relu(h)
            elif kind == "pool":
                h = F.max_pool2d(h, op[1])
        return h

    return forward
