"""What an algorithm is: the contract between one algorithm file and the shared round.

An algorithm is a frozen dataclass (hashable: the compiled round is cached on it) that says

- ``steps`` and ``slots``: the independent batches one local round draws per agent, (steps, slots);
- :meth:`Algorithm.local_update`: its batched local update — a block of B agents' models (B, d) in,
  their uploads out, plus (B, τ) training losses and the new per-agent state;
- :meth:`Algorithm.state_params`: which of the model's parameters it keeps per agent between rounds
  (None: nothing), and :meth:`Algorithm.shared_params`: which it shares with the server (None: all);
- :meth:`Algorithm.personalize`: its personalized model for evaluation (``personalized = True``).

Everything around it — cohort, batches, chunks, exact sums, the Allreduce, the server optimizer,
per-agent state storage, checkpoints, metrics — is shared (federation/algorithm.py). Models are lists
of (B, *shape) parameter tensors, batches (x, y, mask) as in core/metagrad.py; every update is one
multi-tensor ``torch._foreach_*`` call over the whole block (no loop over agents).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from mpifedmeta.core import metagrad
from mpifedmeta.errors import ConfigError

Tensors = list[torch.Tensor]


@dataclass(frozen=True)
class Train:
    """The ``[train]`` settings an algorithm may use (τ, β and the ν-family's keys)."""
    local_steps: int
    beta: float
    nu: int = 1
    alpha: float = 0.01
    metagrad: str = "exact"
    hf_delta: float = 1e-3
    recompute: bool = False

    @classmethod
    def of(cls, train: dict) -> "Train":
        return cls(int(train["local_steps"]), float(train["beta"]), int(train["nu"]), float(train["alpha"]),
                   str(train["metagrad"]), float(train["hf_delta"]), bool(train["recompute"]))


def require(ok: bool, key: str, value, problem: str) -> None:
    """ConfigError ``algorithm.KEY = VALUE: PROBLEM`` unless ``ok`` (for the factories' checks)."""
    if not ok:
        raise ConfigError(f"algorithm.{key} = {value!r}: {problem}")


class Algorithm:
    """The base of every algorithm (see the module docstring); subclasses are frozen dataclasses."""
    name: ClassVar[str] = "?"
    personalized: ClassVar[bool] = False      # has a personalized model (metrics.h5 eval/personal_*)
    stateful: ClassVar[bool] = False          # keeps state per agent (state_params is not None)

    @property
    def steps(self) -> int:
        return self.tau

    @property
    def slots(self) -> int:
        return 1

    @property
    def models_at_once(self) -> int:
        """How many (B, d) models a local update holds at once (the memory budget's lower bound)."""
        return 3

    def one_step(self) -> "Algorithm":
        """This algorithm with one local step of each kind (what the start-up timings run)."""
        return one_step(self)

    def prepare(self, model: torch.nn.Module, layout) -> "Algorithm":
        """This algorithm bound to the run's model (e.g. a default that names parameters)."""
        return self

    def state_params(self, layout) -> tuple[int, ...] | None:
        """The positions (in the layout) of the parameters kept per agent; None when ``stateful`` is False."""
        return None

    def shared_params(self, layout) -> tuple[int, ...] | None:
        return None

    def local_update(self, backend, theta: torch.Tensor, state: torch.Tensor | None, w: torch.Tensor,
                     X, Y, idx, mask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """τ local steps of B agents: ``theta`` (B, d) the agents' copies of the global model ``w``
        (d,), updated in place and returned; ``state`` (B, state size) each agent's stored state
        (the initial value for first-time agents); idx/mask (B, steps, slots, b). Returns (the
        uploads, training losses (B, τ), the new state or None)."""
        raise NotImplementedError

    def personalize(self, backend, w: torch.Tensor, state: torch.Tensor | None, has: torch.Tensor | None,
                    x, y, mask) -> torch.Tensor:
        """The personalized models (n, d) of n agents from the global model ``w`` and their stored
        state (``has``: which agents have one); full batches x (n, b, ...), y, mask (n, b)."""
        raise NotImplementedError


# --------------------------------------------------------------------------- shared helpers

def batch(batches, s: int):
    """Slot ``s`` of gathered batches (slots, B, b, ...); a single slot serves every purpose."""
    xs, ys, ms = batches
    s = 0 if xs.shape[0] == 1 else s
    return xs[s], ys[s], ms[s]


def select(params: Tensors, which) -> Tensors:
    return params if which is None else [params[i] for i in which]


def concat(params: Tensors, which) -> torch.Tensor:
    """The parameters ``which`` of a block's models as one flat (B, size) tensor (a copy)."""
    chosen = select(params, which)
    return torch.cat([p.reshape(p.shape[0], -1) for p in chosen], dim=1)


def state_views(state: torch.Tensor, layout, which) -> Tensors:
    """Views of a flat (B, size) state as the parameters ``which`` ((B, *shape) each)."""
    shapes = [layout.shapes[i] for i in which]
    sizes = [layout.sizes[i] for i in which]
    return [p.view((state.shape[0],) + s) for p, s in zip(state.split(sizes, dim=1), shapes)]


def prox_step(backend, theta: Tensors, anchor: Tensors, lam: float, lr: float, x, y, mask) -> torch.Tensor:
    """θ ← θ − lr·(∇f(θ; x, y) + λ·(θ − anchor)) in place (fused); returns the losses f(θ) (B,)."""
    g, value = backend.grad(theta, x, y, mask)
    if lam:
        torch._foreach_add_(g, torch._foreach_sub(theta, anchor), alpha=lam)
    torch._foreach_add_(theta, g, alpha=-lr)
    return value


def sgd_step(backend, theta: Tensors, lr: float, x, y, mask, only=None) -> torch.Tensor:
    """θ ← θ − lr·∇f(θ) in place, on the parameters ``only`` (None: all); returns f(θ) (B,)."""
    g, value = backend.grad(theta, x, y, mask)
    torch._foreach_add_(select(theta, only), select(g, only), alpha=-lr)
    return value


def round_batches(X, Y, idx, mask):
    """``steps(t)`` → local step t's gathered batches (slots, B, b, ...) (metagrad.round_steps)."""
    return metagrad.round_steps(X, Y, idx, mask)


STEP_FIELDS = ("tau", "personal_steps", "head_steps")


def one_step(algo: Algorithm) -> Algorithm:
    """The algorithm with at most one step of each kind (what the start-up timings run)."""
    if not dataclasses.is_dataclass(algo):
        return algo
    names = {f.name for f in dataclasses.fields(algo)}
    return dataclasses.replace(algo, **{k: min(int(getattr(algo, k)), 1) for k in STEP_FIELDS if k in names})
