"""CUDA checks (``@pytest.mark.cuda``): skipped without a GPU.

- every flavour (exact / fo / hf) of every model (linear / mlp / cnn) on the GPU against the CPU
  float64 per-agent autograd reference;
- rank-count invariance: P = 1 and 2 ranks sharing one GPU give bit-identical checkpoints
  (fixed agent chunk);
- repeatability: the same run twice gives bit-identical checkpoints.

``MPIFEDMETA_CUDA_TESTS_ON_CPU=1`` runs them on the CPU (a dry run of the tests' own logic, used by
``benchmarks/gpu_check.sh --device cpu``). Run on a GPU node: ``python -m pytest -m cuda tests/test_cuda.py``.
"""

import copy
import os

import pytest
import torch

from helpers import (assert_models_identical, arrays_identical, cli_env, describe, final_model, read_metrics,
                     sets, write_tiny_config)
from mpifedmeta.core import metagrad, reference
from mpifedmeta.engine import backends
from mpifedmeta.parallel import devices
from mpifedmeta.models import build_model, param_dict

pytestmark = pytest.mark.cuda

B, NU, ALPHA, DELTA = 5, 2, 0.05, 1e-3


def _problem(model_name, seed=0):
    """A tiny federated problem on 8×8 one-channel images, float64 on the CPU: (model, stacked params, X, Y, idx, mask)."""
    g = torch.Generator().manual_seed(seed)
    n_per, b = 12, 6
    X = torch.randn(B * n_per, 1, 8, 8, generator=g, dtype=torch.float64)
    Y = torch.randint(0, 10, (B * n_per,), generator=g)
    torch.manual_seed(seed)
    model = build_model(model_name, (1, 8, 8), 10, [16] if model_name == "mlp" else [12]).double()
    model.requires_grad_(False)
    p0 = param_dict(model)
    stacked = {k: (v.unsqueeze(0) + 0.01 * torch.randn((B,) + v.shape, generator=g, dtype=torch.float64))
               for k, v in p0.items()}
    slots = metagrad.num_slots(NU, "exact")
    idx = torch.arange(B).view(B, 1, 1) * n_per + torch.randint(0, n_per, (B, slots, b), generator=g)
    mask = torch.ones(B, slots, b, dtype=torch.float64)
    return model, stacked, X, Y, idx, mask


def _reference(model, stacked, X, Y, idx, mask, method):
    loss = reference.make_loss(model)
    out = []
    for a in range(B):
        g, _ = reference.agent_meta_gradient_autograd(loss, {k: v[a] for k, v in stacked.items()}, X, Y, idx[a],
                                                     mask[a], NU, ALPHA, method, DELTA)
        out.append(torch.cat([t.reshape(-1) for t in g.values()]))
    return torch.stack(out)


def _on(device, dtype, model, stacked, X, Y, idx, mask, method, strategy):
    """The engine's batched meta-gradients (backend ``strategy``) on ``device`` in ``dtype``."""
    m = copy.deepcopy(model).to(device=device, dtype=dtype)
    backend = backends.make(m, strategy)
    theta = [stacked[n].to(device, dtype) for n in backend.layout.names]
    g, _ = metagrad.block_meta_gradients(backend, theta, X.to(device, dtype), Y.to(device), idx.to(device),
                                         mask.to(device, dtype), metagrad.MetaSpec(NU, ALPHA, method, DELTA))
    return torch.cat([t.reshape(B, -1) for t in g], dim=1).double().cpu()


def _rel(a, b):
    return float(((a - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-300)).max())


@pytest.mark.parametrize("model_name", ["linear", "mlp", "cnn"])
@pytest.mark.parametrize("method", ["exact", "fo", "hf"])
@pytest.mark.parametrize("strategy", ["default", "vmap"])
def test_flavour_on_gpu_matches_cpu_float64_reference(gpu, model_name, method, strategy, monkeypatch):
    devices.set_tf32(False)
    if gpu.type == "cuda":
        monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
        monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    model, stacked, X, Y, idx, mask = _problem(model_name)
    ref = _reference(model, stacked, X, Y, idx, mask, method)
    strategy = backends.default_strategy(model) if strategy == "default" else strategy
    err64 = _rel(_on(gpu, torch.float64, model, stacked, X, Y, idx, mask, method, strategy), ref)
    assert err64 < 1e-9, f"{model_name} {method} {strategy} float64 on {gpu}: max rel. error {err64:.2e}"
    # float32: the HF difference quotient of a ReLU net in float32 is far from its float64 value
    # (REFERENCES.md), so HF in float32 is only compared on the smooth models
    if method != "hf" or model_name != "cnn":
        tol = 1e-2 if method == "hf" else 1e-4
        err32 = _rel(_on(gpu, torch.float32, model, stacked, X, Y, idx, mask, method, strategy), ref)
        assert err32 < tol, f"{model_name} {method} {strategy} float32 on {gpu}: max rel. error {err32:.2e}"
        print(f"\n{model_name} {method} {strategy}: rel. error float64 {err64:.1e}, float32 {err32:.1e}")


def _gpu_env(gpu):
    """CLI environment that lets the child see the GPU(s) (the suite hides them by default)."""
    env = cli_env()
    if gpu.type == "cuda":
        if "CUDA_VISIBLE_DEVICES" in os.environ:
            env["CUDA_VISIBLE_DEVICES"] = os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _run(tmp_path, gpu, name, P, model="mlp", chunk=4):
    import subprocess
    from helpers import mpifedmeta_cmd, TIMEOUT
    cfg = write_tiny_config(tmp_path)
    out = str(tmp_path / name)
    args = ["run", cfg] + sets(train__rounds=3, train__device=gpu.type, train__agent_chunk=chunk, model__name=model,
                               eval__stationarity=True, output__dir=out)
    proc = subprocess.run(mpifedmeta_cmd(args, P), capture_output=True, text=True, timeout=3 * TIMEOUT, env=_gpu_env(gpu))
    assert proc.returncode == 0, describe(proc)
    assert f"device {gpu.type}" in proc.stdout, describe(proc)
    return out


COMPARED = ("train/train_loss", "eval/train_agent_loss", "eval/train_agent_acc", "eval/holdout_agent_loss",
            "eval/grad_norm_sq", "eval/meta_loss_full")


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_one_and_two_ranks_on_one_gpu_are_bit_identical(gpu, tmp_path, model):
    a, b = _run(tmp_path, gpu, "P1", 1, model), _run(tmp_path, gpu, "P2", 2, model)
    assert_models_identical(final_model(a), final_model(b), f"{model}: P=1 vs P=2 on {gpu}")
    ma, mb = read_metrics(a), read_metrics(b)
    for name in COMPARED:
        assert arrays_identical(ma[name], mb[name]), f"{name} differs for P=1 vs P=2 ({model} on {gpu})"


def test_same_run_twice_is_bit_identical(gpu, tmp_path):
    a, b = _run(tmp_path, gpu, "first", 1), _run(tmp_path, gpu, "second", 1)
    assert_models_identical(final_model(a), final_model(b), f"run twice on {gpu}")
    ma, mb = read_metrics(a), read_metrics(b)
    for name in COMPARED:
        assert arrays_identical(ma[name], mb[name]), name


@pytest.mark.parametrize("algorithm_name", ["meta", "ditto"])
def test_cudagraphs_replays_the_data_of_each_call(gpu, algorithm_name):
    """train.compile = "cudagraphs" copies every input into the recording's buffers: two blocks of the same
    shapes but different data (a generated population builds one per round) give the eager results of each."""
    from mpifedmeta import algorithms
    from mpifedmeta.core.layout import ParamLayout
    from mpifedmeta.engine import compiled
    from mpifedmeta.federation import algorithm as fa
    model, stacked, X, Y, idx, mask = _problem("mlp")
    model = model.to(gpu)
    layout = ParamLayout.of(dict(model.named_parameters()))
    train = {"local_steps": 2, "beta": 0.1, "nu": 1, "alpha": 0.05, "metagrad": "exact", "hf_delta": 1e-3,
             "recompute": False}
    algo = algorithms.make({"name": algorithm_name}, train).prepare(model, layout)
    backend = backends.make(model, "stacked")
    w = layout.flatten({k: v[0] for k, v in stacked.items()}).to(gpu)
    i = idx[:, None, :algo.slots].expand(B, algo.steps, algo.slots, idx.shape[-1]).contiguous().to(gpu)
    m = mask[:, None, :algo.slots].expand(i.shape).contiguous().to(gpu)
    for seed in (1, 2):                     # two "rounds": new data tensors, same shapes
        g = torch.Generator().manual_seed(seed)
        Xs, Ys = (torch.randn(X.shape, generator=g, dtype=X.dtype).to(gpu),
                  torch.randint(0, 10, Y.shape, generator=g).to(gpu))
        state = None if not algo.stateful else fa.initial_state(algo, layout, w).expand(B, -1).clone()
        eager = compiled.run("off", algo, backend, w.expand(B, -1).clone(), None if state is None else state.clone(),
                             w, Xs, Ys, i, m)
        graph = compiled.run("cudagraphs", algo, backend, w.expand(B, -1).clone(),
                             None if state is None else state.clone(), w, Xs, Ys, i, m)
        for a, b in zip(eager, graph):
            if a is not None:
                torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
