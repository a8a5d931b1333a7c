"""The block's stacked forward, derived from a model's structure.

``lift(model)`` traces ``model.forward`` with torch.fx once and lifts every operation to the agent
axis (mpifedmeta/models/liftops.py: how each one is lifted, the two activation layouts). The result's
``forward(params, x)`` runs the whole block as one model: ``params`` {name: (B, *global shape)}
under the model's ``named_parameters()`` names, ``x`` (B, n, *features) → logits (B, n, classes).
Agents share no parameter, so one backward of Σ_agents loss gives every agent's own gradient.

The graph is walked once, at lift time, into a list of closures (one per kept operation, with the
slots to release after it): a call does no dispatch on names. What cannot be lifted gives a
``reason`` instead (the first operation, e.g. "torch.sort at node 'sort'"); the run then uses vmap.
BatchNorm and random dropout (also an RNN's or attention's) are refused (:class:`Refused`) for every
strategy. Pure: torch only.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch import fx, nn

from mpifedmeta.models import liftnn, liftops, liftseq
from mpifedmeta.models.liftops import C, G, S, T, NotLiftable, Val


class Refused(ValueError):
    """A model the meta-objective cannot use, whatever the strategy (the message is one line)."""


@dataclass(frozen=True)
class LiftResult:
    """Either the block's ``forward(params, x)`` or the ``reason`` there is none."""
    forward: Callable | None = None
    reason: str | None = None


class Ctx:
    """What the lifters build on: the lifted values of the nodes and the steps emitted so far."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.names = {id(p): name for name, p in model.named_parameters()}
        self.vals: dict[fx.Node, Val] = {}
        self.steps: list[tuple] = []          # (output slot, run(env, params), input slots)
        self.nslots = 2                       # slot 0: B (the number of agents), slot 1: x
        self._converted: dict[tuple[int, str], Val] = {}

    def emit(self, run, inputs, kind: str = S, acts: bool = True, shape=None, param=None) -> Val:
        """A new step ``env[out] = run(env, params)`` reading the slots ``inputs``."""
        out = self.nslots
        self.nslots += 1
        self.steps.append((out, run, tuple(inputs)))
        return Val(out, kind, acts, shape, param=param)

    def val(self, arg) -> Val:
        """The lifted value of a node argument (a literal becomes a constant)."""
        if isinstance(arg, fx.Node):
            return self.vals[arg]
        if _has_node(arg):
            raise NotLiftable("a computed argument")
        return Val(None, C, False, const=arg)

    def static(self, arg):
        """An argument known at lift time (nodes that are lift-time constants resolved), else NotLiftable."""
        def one(a):
            v = self.vals[a]
            if v.slot is not None:
                raise NotLiftable("an argument computed from the input")
            return v.const
        return fx.node.map_aggregate(arg, lambda a: one(a) if isinstance(a, fx.Node) else a)

    def dyn(self, arg):
        """(getter env → the argument's value, the slots it reads): sizes computed at run time."""
        if not _has_node(arg):
            return (lambda env: arg), ()
        slots = []

        def build(a):
            if isinstance(a, fx.Node):
                v = self.vals[a]
                if v.kind != C:
                    raise NotLiftable("a tensor where a size is expected")
                if v.slot is None:
                    return lambda env: v.const
                slots.append(v.slot)
                return lambda env, s=v.slot: env[s]
            if isinstance(a, (tuple, list)):
                parts = [build(p) for p in a]
                return lambda env: tuple(p(env) for p in parts)
            if isinstance(a, dict):
                items = [(k, build(p)) for k, p in a.items()]
                return lambda env: {k: p(env) for k, p in items}
            return lambda env: a
        return build(arg), tuple(slots)

    def need(self, v: Val, kind: str) -> Val:
        """``v`` in layout ``kind`` (S or G), converted once per value where needed."""
        if v.kind == kind:
            return v
        if v.kind == T:
            raise NotLiftable("a tuple where a tensor is expected")
        if v.kind == C or (kind == G and not v.acts):
            raise NotLiftable("a constant or parameter where an activation is expected")
        key = (v.slot, kind)
        if key not in self._converted:
            s = v.slot
            run = (lambda env, P: liftops.to_grouped(env[s], env[0])) if kind == G else \
                (lambda env, P: liftops.to_stacked(env[s], env[0]))
            self._converted[key] = self.emit(run, (s,), kind)
        return self._converted[key]

    def pname(self, p: torch.Tensor | None) -> str | None:
        """The ``named_parameters()`` name of a parameter (tied ones: the first name)."""
        if p is None:
            return None
        if id(p) not in self.names:
            raise NotLiftable("a tensor attribute that is not a registered parameter")
        return self.names[id(p)]


def _has_node(arg) -> bool:
    found = []
    fx.node.map_arg(arg, found.append)
    return bool(found)


def _inputs(node: fx.Node) -> list[fx.Node]:
    found = []
    fx.node.map_arg((node.args, node.kwargs), found.append)
    return found


# --------------------------------------------------------------------------- refusals

_NORM_HINT = "use GroupNorm or LayerNorm"
_DROPOUT_HINT = "makes every gradient random; use p = 0 or remove it"


def _refuse_modules(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) or \
                (isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.track_running_stats):
            what = "keeps running statistics, which are not part of the meta-objective" if m.track_running_stats \
                else "normalizes with batch statistics, which mix an agent's samples (padding included)"
            raise Refused(f"{type(m).__name__} at '{name}' {what}; {_NORM_HINT}")
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            raise Refused(f"{type(m).__name__}(p={m.p}) at '{name}' {_DROPOUT_HINT}")
        random = liftseq.refusal(m)
        if random:
            raise Refused(f"{random} at '{name}' {_DROPOUT_HINT}")
        ids = liftseq.ids_refusal(m)
        if ids:
            raise Refused(f"{ids} (at '{name}')")


_F = torch.nn.functional
_BATCH_NORMS = {_F.batch_norm, torch.batch_norm}
_DROPOUTS = {_F.dropout, _F.dropout1d, _F.dropout2d, _F.dropout3d, _F.alpha_dropout, _F.feature_alpha_dropout,
             torch.dropout}


def _refuse_graph(graph: fx.Graph) -> None:
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in _BATCH_NORMS:
            raise Refused(f"{liftops.fn_name(node.target)} at node '{node.name}' normalizes with batch statistics "
                          f"(running statistics are not part of the meta-objective); {_NORM_HINT}")
        if node.target in _DROPOUTS:
            p, training = liftops.dropout_args(node)
            if training and not (isinstance(p, (int, float)) and p == 0):
                raise Refused(f"{liftops.fn_name(node.target)}(p={p}) at node '{node.name}' {_DROPOUT_HINT}")
        if node.target is _F.scaled_dot_product_attention:
            p = liftseq.sdpa_dropout(node)
            if not (isinstance(p, (int, float)) and p == 0):
                raise Refused(f"F.scaled_dot_product_attention(dropout_p={p}) at node '{node.name}' {_DROPOUT_HINT}")


# --------------------------------------------------------------------------- the walk

def _lift_node(ctx: Ctx, node: fx.Node) -> Val:
    if node.op == "placeholder":
        if not ctx.vals:
            return Val(1, S, True)
        if node.args:                                   # a further input with a default
            return Val(None, C, False, const=node.args[0])
        raise NotLiftable("a second input")
    if node.op == "get_attr":
        return liftops.attribute_of_model(ctx, node)
    if node.op == "call_module":
        m = ctx.model.get_submodule(node.target)
        lifter = liftnn.MODULES.get(type(m))
        if lifter is None:
            raise NotLiftable()
        return lifter(ctx, node, m)
    table = liftnn.FUNCTIONS if node.op == "call_function" else liftnn.METHODS
    lifter = table.get(node.target)
    if all(ctx.vals[a].kind == C for a in _inputs(node)) and liftnn.computes_constants(node):
        return liftops.constant(ctx, node)
    if lifter is None:
        raise NotLiftable()
    return lifter(ctx, node)


def _describe(ctx: Ctx, node: fx.Node, detail: str) -> str:
    if node.op == "call_module":
        what = f"{liftops.class_name(type(ctx.model.get_submodule(node.target)))} at '{node.target}'"
    elif node.op == "call_function":
        what = f"{liftops.fn_name(node.target)} at node '{node.name}'"
    elif node.op == "call_method":
        what = f"Tensor.{node.target} at node '{node.name}'"
    else:
        what = f"the {node.op} '{node.target}'"
    return what + (f" ({detail})" if detail else "")


def _lift(model: nn.Module) -> LiftResult:
    _refuse_modules(model)
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as e:                      # noqa: BLE001 - any trace failure means: use vmap
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return LiftResult(reason=f"torch.fx cannot trace {type(model).__name__}.forward: {first}")
    _refuse_graph(graph)
    ctx = Ctx(model)
    for node in graph.nodes:
        try:
            if node.op == "output":
                return _finish(ctx, node)
            ctx.vals[node] = _lift_node(ctx, node)
        except NotLiftable as e:
            return LiftResult(reason=_describe(ctx, node, e.detail))
    return LiftResult(reason="the traced graph has no output")


def _finish(ctx: Ctx, node: fx.Node) -> LiftResult:
    out = node.args[0]
    if not isinstance(out, fx.Node):
        raise NotLiftable("the output is not a single tensor")
    v = ctx.vals[out]
    if v.kind == C or not v.acts:
        raise NotLiftable("the output does not depend on the input")
    return LiftResult(forward=_assemble(ctx.steps, ctx.nslots, ctx.need(v, S).slot))


def _assemble(steps: list[tuple], nslots: int, out: int):
    """The forward: only the steps the output needs, each slot released after its last reader."""
    needed, kept = {out}, []
    for o, run, ins in reversed(steps):
        if o in needed:
            kept.append((o, run, ins))
            needed.update(ins)
    kept.reverse()
    last = {s: i for i, (_, _, ins) in enumerate(kept) for s in ins}
    free = [[] for _ in kept]
    for s, i in last.items():
        if s != out:
            free[i].append(s)
    program = [(o, run, tuple(f)) for (o, run, _), f in zip(kept, free)]

    def forward(params: dict, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:     # one agent: bmm and conv take other kernels (other bits) than for B >= 2
            return forward({k: torch.cat((p, p)) for k, p in params.items()}, torch.cat((x, x)))[:1]
        env = [None] * nslots
        env[0], env[1] = x.shape[0], x
        for o, run, release in program:
            env[o] = run(env, params)
            for s in release:
                env[s] = None
        return env[out]

    forward.steps = len(program)
    return forward


_CACHE: "weakref.WeakKeyDictionary[nn.Module, object]" = weakref.WeakKeyDictionary()


def lift(model: nn.Module) -> LiftResult:
    """The model's stacked form (cached per model object); raises :class:`Refused` for BatchNorm or
    dropout with p > 0."""
    hit = _CACHE.get(model)
    if hit is None:
        try:
            hit = _lift(model)
        except Refused as e:
            hit = e
        _CACHE[model] = hit
    if isinstance(hit, Refused):
        raise Refused(str(hit))
    return hit
