"""The engine's block functions with per-name parameter dicts, for tests that build dicts.

The engine works on flat (B, d) local models and lists of parameter tensors (layout.py); these
wrappers convert at the boundary so that a test can compare dicts with the references."""

from __future__ import annotations

from mpifedmeta.core import metagrad


def as_list(backend, params: dict) -> list:
    return [params[n] for n in backend.layout.names]


def as_dict(backend, tensors) -> dict:
    return dict(zip(backend.layout.names, tensors))


def flat(backend, params: dict, batch_dims: int = 1):
    return backend.layout.flatten(params, batch_dims)


def grad(backend, params: dict, x, y, mask):
    g, value = backend.grad(as_list(backend, params), x, y, mask)
    return as_dict(backend, g), value


def hvp(backend, params: dict, v: dict, x, y, mask):
    return as_dict(backend, backend.hvp(as_list(backend, params), as_list(backend, v), x, y, mask))


def block_meta_gradients(backend, params: dict, X, Y, idx, mask, meta):
    g, value = metagrad.block_meta_gradients(backend, as_list(backend, params), X, Y, idx, mask, meta)
    return as_dict(backend, g), value


def local_update(backend, params: dict, X, Y, idx, mask, meta, beta, compile_mode="off"):
    from mpifedmeta.engine import compiled
    theta, losses = compiled.local_update(compile_mode, backend, flat(backend, params), X, Y, idx, mask, meta, beta)
    return backend.layout.split(theta), losses


def personalized_metrics(backend, w: dict, train, test, ks, alpha, chunk=0):
    """metagrad.personalized_metrics over chunks of ``chunk`` agents (0 = all at once)."""
    import torch
    from mpifedmeta.engine import chunks
    wf = flat(backend, w, 0)
    out = [metagrad.personalized_metrics(backend, wf, metagrad.Split(train.X, train.Y, ti, tm),
                                         metagrad.Split(test.X, test.Y, si, sm), ks, alpha)
           for _, _, (ti, si), (tm, sm) in chunks.each(train.idx.shape[0], chunk, (train.idx, test.idx),
                                                        (train.mask, test.mask), fixed=False)]
    return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])


def logits(backend, params: dict, x):
    return backend.logits(as_list(backend, params), x)
