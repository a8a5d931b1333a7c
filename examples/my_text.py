"""A user's own text data and sequence models for mpifedmeta, in the user's own file: generated
character windows from 20 "writers" (each with its own bigram style), the task is the next
character; nothing to download. The models are plain PyTorch layers — an LSTM and a
TransformerEncoderLayer — that the default ``stacked`` strategy lifts (docs/extending.md):

    mpifedmeta run configs/quickstart.toml --set data.dataset='"examples/my_text.py:load"' \\
        --set model.name='"examples/my_text.py:lstm"' --set model.hidden='[32]' --set output.dir='"runs/text"'

(``:encoder`` for the transformer layer; ``data.partition = "natural"`` with ``data.num_agents = 0``
gives every writer to one agent.)

``load(path, dtype)``: ``data.path`` = the number of windows (default 2000); returns int64 ids ``x``
(n, 16), the next character ``y`` (n,), the writer ``agent`` (n,) and ``num_classes`` (the
vocabulary, 24). The run carries the ids in its floating dtype (exact) and an ``nn.Embedding`` takes
them as they come.
"""

import numpy as np
import torch
from torch import nn

VOCAB, LENGTH, WRITERS = 24, 16, 20


def load(path: str, dtype: np.dtype) -> dict:
    n = int(path) if path else 2000
    rng = np.random.default_rng(7)
    shared = rng.dirichlet(np.full(VOCAB, 0.3), size=VOCAB)            # a bigram model every writer mixes in
    agent = np.sort(rng.integers(0, WRITERS, n))
    text = np.empty((n, LENGTH + 1), dtype=np.int64)
    for w in range(WRITERS):
        style = 0.5 * shared + 0.5 * rng.dirichlet(np.full(VOCAB, 0.3), size=VOCAB)
        rows = np.flatnonzero(agent == w)
        cur = rng.integers(0, VOCAB, len(rows))
        for t in range(LENGTH + 1):
            text[rows, t] = cur
            cur = np.minimum((rng.random((len(rows), 1)) > style[cur].cumsum(1)).sum(1), VOCAB - 1)
    return {"x": text[:, :LENGTH], "y": text[:, LENGTH], "agent": agent, "num_classes": VOCAB}


class LSTMNet(nn.Module):
    """Embedding 16, an LSTM of len(hidden) layers of hidden[0], a linear layer from the last step."""

    def __init__(self, num_classes: int, hidden: tuple[int, ...]):
        super().__init__()
        self.embed = nn.Embedding(num_classes, 16)
        self.rnn = nn.LSTM(16, hidden[0], num_layers=len(hidden), batch_first=True)
        self.out = nn.Linear(hidden[0], num_classes)

    def forward(self, x):
        h, _ = self.rnn(self.embed(x))
        return self.out(h[:, -1])


def lstm(in_shape, num_classes, hidden):
    return LSTMNet(num_classes, tuple(hidden or (32,)))


class EncoderNet(nn.Module):
    """Embedding + learned positions, one causal nn.TransformerEncoderLayer (pre-norm, dropout 0),
    a linear layer from the last position. ``hidden[0]``: the width (a multiple of 4 heads)."""

    def __init__(self, length: int, num_classes: int, width: int):
        super().__init__()
        self.embed = nn.Embedding(num_classes, width)
        self.pos = nn.Parameter(0.02 * torch.randn(length, width))
        self.layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.register_buffer("causal", torch.ones(length, length, dtype=torch.bool).triu(1), persistent=False)
        self.out = nn.Linear(width, num_classes)

    def forward(self, x):
        h = self.layer(self.embed(x) + self.pos, src_mask=self.causal)
        return self.out(h[:, -1])


def encoder(in_shape, num_classes, hidden):
    return EncoderNet(int(in_shape[0]), num_classes, (hidden or (32,))[0])
