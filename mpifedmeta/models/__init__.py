"""Model definitions. Models are used functionally: parameters live in dicts of tensors
(stacked along a leading agent dimension for a block) and are applied either with
``torch.func.functional_call`` (any model, under vmap) or by the block's stacked forward that
mpifedmeta/models/lift.py derives from the model's structure (the built-in models and a user's alike).
``model.name`` is a key of :data:`MODELS` or a user's builder, ``"file.py:build"`` /
``"package.module:build"`` (mpifedmeta/userfile.py).
"""

from __future__ import annotations

import inspect
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
    """The two-convolution CNN of the FedAvg paper (McMahan et al. 2017): conv 32, ReLU, 2×2 max-pool,
    conv 64, ReLU, 2×2 max-pool, then the dense head ``hidden`` (FedAvg: 512) and the classes. Any
    image shape (C, H, W) — FEMNIST/MNIST 1×28×28, CIFAR 3×32×32 — or (H, W) (one channel).
    Kernels 5×5 (padding 2, FedAvg's) for images of at least 16 pixels a side, 3×3 (padding 1) below
    (the 8×8 digits: the small net this package always had there, unchanged)."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...] = (128,)):
        super().__init__()
        self.add_channel = len(in_shape) == 2
        channels, height, width = (1,) + tuple(in_shape) if self.add_channel else tuple(in_shape)
        k = 5 if min(height, width) >= 16 else 3
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, k, padding=k // 2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, k, padding=k // 2), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(*dense_layers(64 * (height // 4) * (width // 4), hidden, num_classes, nn.ReLU))

    def forward(self, x):
        if self.add_channel:
            x = x.unsqueeze(1)
        return self.classifier(self.features(x).flatten(1))


class CharLSTM(nn.Module):
    """LEAF's Shakespeare model: next character from ``seq_len`` characters (int64 ids), an
    embedding of ``embedding`` (8), LSTM layers of the ``hidden`` widths (LEAF: 256, 256; equal
    widths are one ``nn.LSTM`` with num_layers, as in LEAF) and a linear layer from the last time
    step to the classes (the vocabulary)."""

    def __init__(self, vocab: int, num_classes: int, embedding: int = 8, hidden: tuple[int, ...] = (256, 256)):
        super().__init__()
        self.embed = nn.Embedding(vocab, embedding)
        widths = (embedding,) + tuple(hidden)
        if len(set(hidden)) == 1:
            self.lstm = nn.ModuleList([nn.LSTM(embedding, hidden[0], num_layers=len(hidden), batch_first=True)])
        else:
            self.lstm = nn.ModuleList(nn.LSTM(i, o, batch_first=True) for i, o in zip(widths, widths[1:]))
        self.fc = nn.Linear(hidden[-1], num_classes)

    def forward(self, x):
        h = self.embed(x)
        for layer in self.lstm:
            h = layer(h)[0]
        return self.fc(h[:, -1])


class Attention(nn.Module):
    """Multi-head self-attention written with matmul and softmax (twice differentiable on every
    device, so exact meta-gradients run on every strategy); ``causal``: position t sees 0..t."""

    def __init__(self, seq_len: int, width: int, heads: int, causal: bool):
        super().__init__()
        self.seq_len, self.width, self.heads, self.head = seq_len, width, heads, width // heads
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.scale = self.head ** -0.5
        self.causal = causal
        if causal:
            self.register_buffer("mask", torch.full((seq_len, seq_len), float("-inf")).triu(1), persistent=False)

    def forward(self, h):
        n, L, W, H, d = h.size(0), self.seq_len, self.width, self.heads, self.head
        qkv = self.qkv(h)
        q = qkv[:, :, :W].reshape(n, L, H, d).transpose(1, 2)             # (n, heads, L, d)
        k = qkv[:, :, W:2 * W].reshape(n, L, H, d).transpose(1, 2)
        v = qkv[:, :, 2 * W:].reshape(n, L, H, d).transpose(1, 2)
        s = (q @ k.transpose(-2, -1)) * self.scale
        if self.causal:
            s = s + self.mask
        out = (torch.softmax(s, dim=-1) @ v).transpose(1, 2).reshape(n, L, W)
        return self.proj(out)


class Block(nn.Module):
    """Pre-norm transformer block: h + attention(LayerNorm h), then h + MLP(LayerNorm h) (GELU, 4× width)."""

    def __init__(self, seq_len: int, width: int, heads: int, causal: bool):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(width), Attention(seq_len, width, heads, causal)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, h):
        h = h + self.attn(self.norm1(h))
        return h + self.mlp(self.norm2(h))


class Transformer(nn.Module):
    """A small transformer classifier of int64 token ids (n, L): token embedding + learned
    positions, ``depth`` pre-norm blocks, a final LayerNorm, and a linear layer from the last
    position (``causal``: next-token prediction) or the mean over positions (an encoder)."""

    def __init__(self, seq_len: int, vocab: int, num_classes: int, width: int = 64, depth: int = 2,
                 heads: int = 4, causal: bool = True):
        super().__init__()
        self.causal = causal
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(0.02 * torch.randn(seq_len, width))
        self.blocks = nn.Sequential(*[Block(seq_len, width, heads, causal) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, num_classes)

    def forward(self, x):
        h = self.norm(self.blocks(self.embed(x) + self.pos))
        return self.head(h[:, -1] if self.causal else h.mean(1))


def _build_linear(in_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...] | None) -> nn.Module:
    return Linear(int(math.prod(in_shape)), num_classes)


def _build_mlp(in_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...] | None) -> nn.Module:
    return MLP(int(math.prod(in_shape)), num_classes, tuple(hidden) if hidden is not None else (80, 60))


def _build_cnn(in_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...] | None) -> nn.Module:
    if len(in_shape) not in (2, 3):
        raise ValueError(f"model.name = 'cnn' needs image inputs (C, H, W) or (H, W), got feature shape {tuple(in_shape)}")
    if min(in_shape[-2:]) < 4:
        raise ValueError(f"model.name = 'cnn' needs images of at least 4×4 pixels (two 2×2 poolings), got {tuple(in_shape)}")
    return CNN(tuple(in_shape), num_classes, tuple(hidden) if hidden is not None else (128,))


def _sequence_length(name: str, in_shape: tuple[int, ...]) -> int:
    if len(in_shape) != 1:
        raise ValueError(f"model.name = {name!r} needs sequences of int64 token ids (L,) per sample, got feature "
                         f"shape {tuple(in_shape)}")
    return int(in_shape[0])


def _vocab(vocab: int, num_classes: int) -> int:
    """model.vocab, 0 = the number of classes (next-token prediction: the ids are the classes)."""
    return int(vocab) or num_classes


def _build_char_lstm(in_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...] | None,
                     embedding: int = 8, vocab: int = 0) -> nn.Module:
    _sequence_length("char-lstm", in_shape)
    return CharLSTM(_vocab(vocab, num_classes), num_classes, int(embedding),
                    tuple(hidden) if hidden is not None else (256, 256))


def _build_transformer(in_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...] | None,
                       width: int = 64, depth: int = 2, heads: int = 4, causal: bool = True, vocab: int = 0) -> nn.Module:
    seq_len = _sequence_length("transformer", in_shape)
    if width % heads:
        raise ValueError(f"model.width = {width} must be a multiple of model.heads = {heads}")
    return Transformer(seq_len, _vocab(vocab, num_classes), num_classes, int(width), int(depth), int(heads), bool(causal))


Builder = Callable[..., nn.Module]
#: Model name → builder(in_shape, num_classes, hidden, **keys): the keys of the config's [model]
#: section that the builder names as keyword arguments (e.g. ``width``) are passed to it.
#: Adding a model = one builder + one entry here.
MODELS: dict[str, Builder] = {"linear": _build_linear, "mlp": _build_mlp, "cnn": _build_cnn,
                              "char-lstm": _build_char_lstm, "transformer": _build_transformer}


def build_model(name: str, in_shape: tuple[int, ...], num_classes: int,
                hidden: tuple[int, ...] | None = None, options: dict | None = None) -> nn.Module:
    """Build the model ``name`` for inputs of shape ``in_shape`` (without the batch dimension);
    ``options``: the config's [model] keys (a built-in builder gets those it names)."""
    if userfile.is_spec(name):
        model = _build_user(name, tuple(in_shape), num_classes, hidden)
    elif name not in MODELS:
        raise ValueError(f"model.name = {name!r} is not one of {', '.join(MODELS)}")
    else:
        builder = MODELS[name]
        named = inspect.signature(builder).parameters
        extra = {k: v for k, v in (options or {}).items() if k in named and k not in ("in_shape", "num_classes", "hidden")}
        model = builder(tuple(in_shape), num_classes, hidden, **extra)
    return accept_float_ids(model)


def _float_ids_to_long(module, args):
    x = args[0]
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return (x.long(),) + tuple(args[1:])
    return None


def accept_float_ids(model: nn.Module) -> nn.Module:
    """Let every ``nn.Embedding`` of ``model`` take its ids in a floating dtype (a forward pre-hook
    converts them to int64).

    A run keeps every dataset's features in its floating dtype, token ids too (exact: integers up
    to 2^24 in float32, 2^53 in float64; lift.py refuses a larger vocabulary in float32), so the
    per-agent strategies (vmap, chunked, loop) meet them as floats; the stacked form converts in
    its lifted embedding. Called by :func:`build_model` on every model, built-in or the user's."""
    for m in model.modules():
        if isinstance(m, nn.Embedding) and not getattr(m, "_mpifedmeta_float_ids", False):
            m.register_forward_pre_hook(_float_ids_to_long)
            m._mpifedmeta_float_ids = True
    return model


def _build_user(spec: str, in_shape: tuple, num_classes: int, hidden) -> nn.Module:
    model = userfile.call(spec, "model.name", in_shape, num_classes, None if hidden is None else tuple(hidden))
    if not isinstance(model, nn.Module):
        raise userfile.UserFileError("model.name", spec, f"the builder returned a {type(model).__name__}, "
                                                         "not a torch.nn.Module")
    if not any(True for _ in model.parameters()):
        raise userfile.UserFileError("model.name", spec, "the model has no parameters")
    return model


def build_shapes(name: str, in_shape: tuple[int, ...], num_classes: int,
                 hidden: tuple[int, ...] | None = None, options: dict | None = None) -> nn.Module:
    """The model on the meta device (parameter shapes, nothing allocated: an absurd size is refused
    before it exists); a user's builder that cannot run there (e.g. it reads a file) is built for real."""
    try:
        with torch.device("meta"):
            return build_model(name, in_shape, num_classes, hidden, options)
    except userfile.UserFileError:
        return build_model(name, in_shape, num_classes, hidden, options)


def param_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters as a plain (detached) dict, named as in ``named_parameters()``."""
    return {k: v.detach().clone() for k, v in model.named_parameters()}
