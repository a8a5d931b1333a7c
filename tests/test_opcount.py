"""The number of aten operations of one local round (≈ kernel launches on a GPU) stays within a
stated budget, so that no change quietly brings back extra passes over parameter-sized tensors.

Counted with a TorchDispatchMode below autograd (forward, backward and double-backward ops alike),
views excluded (they move no data). A local step of the stacked backend costs at most

    ops ≤ 4 + L·(GRAD·G + HVP·H)

for a model with L parametrised layers, G gradients and H Hessian-vector products per meta-step
(ν inner steps, one outer gradient, ν HVPs for exact, 2ν extra gradients for hf). The 4 are the
step's update (one multi-tensor op), the batch gathers and the loss bookkeeping; GRAD and HVP are
the per-layer costs below (a dense layer's forward GEMM, its two backward GEMMs, the bias sum, the
activation and its backward; the HVP's double backward about three times that).
"""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mpifedmeta.core import metagrad
from mpifedmeta.engine import backends, chunks
from mpifedmeta.models import build_model, param_dict

GRAD_MLP, HVP_MLP = 11, 31        # ops per dense layer and gradient / HVP
GRAD_CNN, HVP_CNN = 17, 42        # ops per layer of the conv net (grouped conv, channels-last, pools)


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count_local_round(model_name: str, nu: int, method: str, tau: int = 3, B: int = 4) -> collections.Counter:
    torch.manual_seed(0)
    shape = (1, 8, 8)
    model = build_model(model_name, shape, 10, None)
    model.requires_grad_(False)
    X, Y = torch.randn((40,) + shape), torch.randint(0, 10, (40,))
    idx = torch.randint(0, 40, (B, tau, metagrad.num_slots(nu, method), 8))
    backend = backends.make(model, "stacked")
    theta = chunks.broadcast(backend.layout.flatten(param_dict(model)), B)
    with OpCounter() as counter:
        metagrad.local_update(backend, theta, X, Y, idx, torch.ones(idx.shape), metagrad.MetaSpec(nu, 0.1, method), 0.1)
    return counter.ops


def budget(layers: int, nu: int, method: str, grad: int, hvp: int) -> int:
    G = nu + 1 + (2 * nu if method == "hf" else 0)
    H = nu if method == "exact" else 0
    return 4 + layers * (grad * G + hvp * H)


CASES = [(0, "fo"), (1, "fo"), (3, "fo"), (1, "exact"), (2, "exact"), (1, "hf"), (2, "hf")]


@pytest.mark.parametrize("nu,method", CASES)
@pytest.mark.parametrize("model_name,layers,grad,hvp", [("mlp", 3, GRAD_MLP, HVP_MLP), ("cnn", 3, GRAD_CNN, HVP_CNN)])
def test_local_round_op_count_within_budget(model_name, layers, grad, hvp, nu, method):
    tau = 3
    ops = count_local_round(model_name, nu, method, tau)
    per_step = sum(ops.values()) / tau
    limit = budget(layers, nu, method, grad, hvp)
    print(f"\n{model_name} nu={nu} {method}: {per_step:.1f} aten ops per local step (budget {limit})")
    assert per_step <= limit, f"{per_step:.1f} ops per step > budget {limit}: {dict(ops.most_common(12))}"
    # one update per step, every update one multi-tensor op; no flatten/cat copies of the models
    # (the double backward of a convolution concatenates inside autograd: not ours)
    assert ops["_foreach_add_"] >= tau
    assert ops["cat"] == 0 or (model_name == "cnn" and method == "exact")


def test_the_counter_sees_backward_and_double_backward_ops():
    fo, exact = count_local_round("mlp", 1, "fo"), count_local_round("mlp", 1, "exact")
    assert fo["bmm"] > 0 and exact["bmm"] > 2 * fo["bmm"]
