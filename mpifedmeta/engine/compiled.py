"""``train.compile``: the whole local round compiled by torch.compile or recorded as a CUDA graph.

Never needed for correctness or to run: shapes are fixed per (block size, τ, slots, batch), and
wherever compilation is not possible (no CUDA for "cudagraphs", a transform torch.compile cannot
trace, ...) the round runs eagerly after a one-line notice, once per reason.

- "compile": ``torch.compile(dynamic=False)`` of the eager local round (mode "reduce-overhead",
  i.e. CUDA graphs under inductor, on CUDA), with the backend's torch.func form
  (``backend.traceable()``): torch.compile traces torch.func transforms correctly but, measured
  with torch 2.13, miscompiles a create_graph double backward of torch.autograd. The ``loop``
  backend has no traceable form and runs eagerly.
- "cudagraphs": the eager local round recorded once into a ``torch.cuda.CUDAGraph`` with static
  input/output buffers, then replayed (inputs copied in, outputs cloned out). CUDA only.
"""

from __future__ import annotations

import sys

import torch

from mpifedmeta.core import metagrad

MODES = ("off", "compile", "cudagraphs")
_compiled: dict = {}
_graphs: dict = {}
_failed: dict = {}
ANNOUNCE = True     # set-up sets False on ranks other than 0: the notice is printed once per job


def _notice(key, text: str) -> None:
    if key not in _failed:
        _failed[key] = text
        if ANNOUNCE:
            print(f"mpifedmeta: train.compile: {text}; running the local round eagerly", file=sys.stderr, flush=True)


def _signature(backend, theta, X, idx, mask, meta, beta):
    return (id(backend), meta, beta, tuple(theta.shape), theta.dtype, tuple(X.shape), X.dtype, X.device,
            tuple(idx.shape), tuple(idx.stride()), tuple(mask.stride()))


def mode(value) -> str:
    """train.compile as a mode: false → "off", true → "compile", or the string itself."""
    if value is True:
        return "compile"
    if value is False or value is None:
        return "off"
    if value not in MODES:
        raise ValueError(f"train.compile must be true, false or one of {', '.join(MODES)}, got {value!r}")
    return value


def local_update(mode_: str, backend, theta, X, Y, idx, mask, meta, beta):
    """metagrad.local_update compiled according to ``mode_`` ("off": eagerly), in place on ``theta``
    like it; where compilation is not possible, eagerly after a one-line notice (once per reason)."""
    if mode_ != "off":
        out = _compiled_update(mode_, backend, theta, X, Y, idx, mask, meta, beta)
        if out is not None:
            return out
    return metagrad.local_update(backend, theta, X, Y, idx, mask, meta, beta)


def _compiled_update(mode, backend, theta, X, Y, idx, mask, meta, beta):
    """The captured round, or None where it cannot be captured."""
    key = (mode,) + _signature(backend, theta, X, idx, mask, meta, beta)
    if key in _failed:
        return None
    if mode == "cudagraphs":
        if X.device.type != "cuda":
            _notice(key, '"cudagraphs" needs a CUDA device')
            return None
        try:
            return _replay(key, backend, theta, X, Y, idx, mask, meta, beta)
        except Exception as e:   # capture rejects some operations; never needed
            _graphs.pop(key, None)
            _notice(key, f"CUDA graph capture failed ({_first_line(e)})")
            return None
    traceable = getattr(backend, "traceable", lambda: None)()
    if traceable is None:
        _notice(key, f"the {backend.name} backend cannot be compiled")
        return None
    try:
        fn = _compiled.get(key)
        if fn is None:
            def round_(p, X_, Y_, i, m):
                return metagrad.local_update(traceable, p, X_, Y_, i, m, meta, beta)
            fn = _compiled[key] = torch.compile(round_, dynamic=False,
                                                mode="reduce-overhead" if X.device.type == "cuda" else None)
        out, losses = fn(theta, X, Y, idx, mask)
        if out is not theta:         # the compiled function may return a new tensor
            theta.copy_(out)
        return theta, losses
    except Exception as e:        # torch.compile cannot handle every transform combination
        _compiled.pop(key, None)
        _notice(key, f"torch.compile failed ({_first_line(e)})")
        return None


def _first_line(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text[:200]


def _replay(key, backend, theta, X, Y, idx, mask, meta, beta):
    entry = _graphs.get(key)
    if entry is None:
        static = (theta.clone(), idx.clone(), mask.clone())

        def run():
            return metagrad.local_update(backend, static[0], X, Y, static[1], static[2], meta, beta)

        side = torch.cuda.Stream(device=X.device)
        side.wait_stream(torch.cuda.current_stream(X.device))
        with torch.cuda.stream(side):          # warm-up outside the capture (allocations, kernels)
            for _ in range(2):
                run()
        torch.cuda.current_stream(X.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run()
        entry = _graphs[key] = (graph, static, out)
    graph, static, out = entry
    static[0].copy_(theta)
    static[1].copy_(idx)
    static[2].copy_(mask)
    graph.replay()
    theta.copy_(out[0])
    return theta, out[1].clone()
