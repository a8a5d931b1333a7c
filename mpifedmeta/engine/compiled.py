"""``train.compile``: the whole local round (any algorithm) compiled by torch.compile or recorded as a CUDA graph.

Never needed for correctness or to run: shapes are fixed per (block size, τ, slots, batch), and
wherever compilation is not possible (no CUDA for "cudagraphs", a transform torch.compile cannot
trace, ...) the round runs eagerly after a one-line notice, once per reason.

- "compile": ``torch.compile(dynamic=False)`` of the eager local round (mode "reduce-overhead",
  i.e. CUDA graphs under inductor, on CUDA), with the backend's torch.func form
  (``backend.traceable()``): torch.compile traces torch.func transforms correctly but, measured
  with torch 2.13, miscompiles a create_graph double backward of torch.autograd. The ``loop``
  backend has no traceable form and runs eagerly.
- "cudagraphs": the eager local round recorded once into a ``torch.cuda.CUDAGraph`` with static
  input/output buffers, then replayed (every input copied in — the data too unless it is the very
  tensor recorded —, outputs cloned out). CUDA only.
"""

from __future__ import annotations

import sys

import torch


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


def _signature(algo, backend, theta, state, X, idx, mask):
    try:
        hash(algo)
    except TypeError:            # a user's algorithm that is not a frozen dataclass: keyed by identity
        algo = ("id", id(algo))
    return (id(backend), algo, tuple(theta.shape), theta.dtype, None if state is None else tuple(state.shape),
            tuple(X.shape), X.dtype, X.device, tuple(idx.shape), tuple(idx.stride()), tuple(mask.stride()))


def mode(value) -> str:
    """train.compile as a mode: false → "off", true → "compile", or the string itself."""
    if value is True:
        return "compile"
    if value is False or value is None:
        return "off"
    if value not in MODES:
        raise ValueError(f"train.compile must be true, false or one of {', '.join(MODES)}, got {value!r}")
    return value


def run(mode_: str, algo, backend, theta, state, w, X, Y, idx, mask):
    """``algo.local_update`` compiled according to ``mode_`` ("off": eagerly), in place on ``theta``
    like it; where compilation is not possible, eagerly after a one-line notice (once per reason).
    Returns (the uploads, the training losses (B, τ), the new state or None)."""
    if mode_ != "off":
        out = _compiled_update(mode_, algo, backend, theta, state, w, X, Y, idx, mask)
        if out is not None:
            return out
    return algo.local_update(backend, theta, state, w, X, Y, idx, mask)


def local_update(mode_: str, backend, theta, X, Y, idx, mask, meta, beta):
    """The ν-family's local round (metagrad.local_update) through :func:`run`: (models, losses)."""
    from mpifedmeta.algorithms.meta import Meta
    out, losses, _ = run(mode_, Meta(meta, beta, idx.shape[1]), backend, theta, None, theta[0], X, Y, idx, mask)
    return out, losses


def _compiled_update(mode, algo, backend, theta, state, w, X, Y, idx, mask):
    """The captured round, or None where it cannot be captured."""
    key = (mode,) + _signature(algo, backend, theta, state, X, idx, mask)
    if key in _failed:
        return None
    if mode == "cudagraphs":
        if X.device.type != "cuda":
            _notice(key, '"cudagraphs" needs a CUDA device')
            return None
        try:
            return _replay(key, algo, backend, theta, state, w, X, Y, idx, mask)
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
            def round_(p, s, w_, X_, Y_, i, m):
                return algo.local_update(traceable, p, s, w_, X_, Y_, i, m)
            fn = _compiled[key] = torch.compile(round_, dynamic=False,
                                                mode="reduce-overhead" if X.device.type == "cuda" else None)
        out, losses, new_state = fn(theta, state, w, X, Y, idx, mask)
        if out is not theta:         # the compiled function may return a new tensor
            theta.copy_(out)
        return theta, losses, new_state
    except Exception as e:        # torch.compile cannot handle every transform combination
        _compiled.pop(key, None)
        _notice(key, f"torch.compile failed ({_first_line(e)})")
        return None


def _first_line(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text[:200]


def _replay(key, algo, backend, theta, state, w, X, Y, idx, mask):
    """Replay the recorded round after copying EVERY input into its static buffer: the data too (a
    generated population builds new blocks of the same shapes every round), skipped only when the
    caller passes the very tensor recorded (a resident block's data)."""
    inputs = (theta, state, w, X, Y, idx, mask)
    entry = _graphs.get(key)
    if entry is None:
        static = tuple(None if t is None else t.clone() for t in inputs)

        def run_():
            return algo.local_update(backend, *static)

        side = torch.cuda.Stream(device=X.device)
        side.wait_stream(torch.cuda.current_stream(X.device))
        with torch.cuda.stream(side):          # warm-up outside the capture (allocations, kernels)
            for _ in range(2):
                for buf, t in zip(static, inputs):
                    if buf is not None:
                        buf.copy_(t)
                run_()
        torch.cuda.current_stream(X.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run_()
        entry = _graphs[key] = (graph, static, out, [None] * len(inputs))
    graph, static, out, last = entry
    for j, (buf, t) in enumerate(zip(static, inputs)):
        if buf is not None and not (j in (3, 4) and last[j] is t):   # X, Y: the same tensor object, same data
            buf.copy_(t)
        last[j] = t if j in (3, 4) else None
    graph.replay()
    theta.copy_(out[0])
    return theta, out[1].clone(), None if out[2] is None else out[2].clone()
