"""Model definitions. Models are used functionally: parameters live in dicts of tensors
(stacked along a leading agent dimension for a block) and are applied either with
``torch.func.functional_call`` (any model, under vmap) or by the block's stacked forward that
mpifedmeta/models/lift.py derives from the model's structure (the built-in models and a user's alike).
``model.name`` is a key of :data:`MODELS` or a user's builder, ``"file.py:build"`` /
``"package.module:build"`` (mpifedmeta/userfile.py).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from mpifedmeta import userfile


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


def dense_layers(width: int, hidden: tuple[int, ...], num_classes: int, activation) -> list[nn.Module]:
    """Linear(width, h₁), activation, …, Linear(h_last, num_classes): the dense head of the MLP and the CNN."""
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(width, h), activation()]
        width = h
    return layers + [nn.Linear(width, num_classes)]


class MLP(nn.Module):
    """Fully connected net with ELU activations (Per-FedAvg uses 784-80-60-10)."""

    def __init__(self, in_features: int, num_classes: int, hidden: tuple[int, ...] = (80, 60)):
        super().__init__()
        self.net = nn.Sequential(*dense_layers(in_features, hidden, num_classes, nn.ELU))

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
        self.classifier = nn.Sequential(*dense_layers(64 * (height // 4) * (width // 4), hidden, num_classes, nn.ReLU))

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
    if userfile.is_spec(name):
        return _build_user(name, tuple(in_shape), num_classes, hidden)
    if name not in MODELS:
        raise ValueError(f"model.name = {name!r} is not one of {', '.join(MODELS)}")
    return MODELS[name](tuple(in_shape), num_classes, hidden)


def _build_user(spec: str, in_shape: tuple, num_classes: int, hidden) -> nn.Module:
    model = userfile.call(spec, "model.name", in_shape, num_classes, None if hidden is None else tuple(hidden))
    if not isinstance(model, nn.Module):
        raise userfile.UserFileError("model.name", spec, f"the builder returned a {type(model).__name__}, "
                                                         "not a torch.nn.Module")
    if not any(True for _ in model.parameters()):
        raise userfile.UserFileError("model.name", spec, "the model has no parameters")
    return model


def build_shapes(name: str, in_shape: tuple[int, ...], num_classes: int,
                 hidden: tuple[int, ...] | None = None) -> nn.Module:
    """The model on the meta device (parameter shapes, nothing allocated: an absurd size is refused
    before it exists); a user's builder that cannot run there (e.g. it reads a file) is built for real."""
    try:
        with torch.device("meta"):
            return build_model(name, in_shape, num_classes, hidden)
    except userfile.UserFileError:
        return build_model(name, in_shape, num_classes, hidden)


def param_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters as a plain (detached) dict, named as in ``named_parameters()``."""
    return {k: v.detach().clone() for k, v in model.named_parameters()}
