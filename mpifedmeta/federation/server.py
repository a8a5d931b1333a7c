"""Server optimizers (Reddi et al., ICLR 2021, Alg. 2), as pure functions on the host, in float64.

The server step gets the weighted mean update Δ = Σ c_i·(w_i − w) / Σ c_i over the shared
parameters (exactly summed, identical on every rank) and applies, with m = v = 0 at the start and
no bias correction:

    sgd       w ← w + lr·Δ
    momentum  m ← μ·m + Δ;                          w ← w + lr·m
    adagrad   v ← v + Δ²;  m = Δ;                   w ← w + lr·m / (√v + eps)
    adam      m ← β1·m + (1−β1)·Δ;  v ← β2·v + (1−β2)·Δ²;          w ← w + lr·m / (√v + eps)
    yogi      the same m;  v ← v − (1−β2)·Δ²·sign(v − Δ²);        w ← w + lr·m / (√v + eps)

Every rank computes the same state from the same sums; it is saved in every checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

OPTIMIZERS = ("sgd", "momentum", "adagrad", "adam", "yogi")


@dataclass(frozen=True)
class ServerSpec:
    optimizer: str = "sgd"
    lr: float = 1.0
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-3

    def state_names(self) -> tuple[str, ...]:
        """The float64 (d,) arrays the optimizer keeps between rounds."""
        return {"sgd": (), "momentum": ("m",), "adagrad": ("v",)}.get(self.optimizer, ("m", "v"))


def initial_state(spec: ServerSpec, d: int) -> dict[str, np.ndarray]:
    return {k: np.zeros(d, dtype=np.float64) for k in spec.state_names()}


def step(spec: ServerSpec, w: np.ndarray, delta: np.ndarray, state: dict) -> tuple[np.ndarray, dict]:
    """(the new global model, the new state) from the float64 model ``w`` (d,) and update ``delta``;
    ``state`` is not modified."""
    o, lr = spec.optimizer, spec.lr
    if o == "sgd":
        return w + lr * delta, state
    if o == "momentum":
        m = spec.momentum * state["m"] + delta
        return w + lr * m, {"m": m}
    sq = delta * delta
    if o == "adagrad":
        m, v = delta, state["v"] + sq
        new_state = {"v": v}
    else:
        m = spec.beta1 * state["m"] + (1 - spec.beta1) * delta
        if o == "adam":
            v = spec.beta2 * state["v"] + (1 - spec.beta2) * sq
        elif o == "yogi":
            v = state["v"] - (1 - spec.beta2) * sq * np.sign(state["v"] - sq)
        else:
            raise ValueError(f"server.optimizer must be one of {', '.join(OPTIMIZERS)}, got {o!r}")
        new_state = {"m": m, "v": v}
    return w + lr * m / (np.sqrt(v) + spec.eps), new_state
