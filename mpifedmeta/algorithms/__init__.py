"""Algorithms as plug-ins: one file each, one registration (:data:`ALGORITHMS`).

``algorithm.name`` names a built-in (``meta``, ``pfedme``, ``ditto``, ``fedrep``) or the user's own
factory, ``"path/file.py:NAME"`` / ``"package.module:NAME"``. A factory is a function
``NAME(train, *, key=default, ...)`` returning an :class:`~mpifedmeta.algorithms.base.Algorithm`: its
keyword arguments ARE the algorithm's keys in ``[algorithm]`` (type from the default, or from the
annotation when the default is None; ``Annotated[type, "doc"]`` documents the key), and it raises
ConfigError for an impossible value (``base.require``).
"""

from __future__ import annotations

import inspect
import types
import typing

from mpifedmeta import userfile
from mpifedmeta.algorithms import ditto, fedrep, meta, pfedme
from mpifedmeta.algorithms.base import Algorithm, Train
from mpifedmeta.errors import ConfigError

#: algorithm.name → factory
ALGORITHMS = {"meta": meta.build, "pfedme": pfedme.build, "ditto": ditto.build, "fedrep": fedrep.build}
KEY = "algorithm.name"


def factory(name: str):
    """The factory ``name`` names (a built-in, or the user's FILE.py:NAME); ConfigError otherwise."""
    if name in ALGORITHMS:
        return ALGORITHMS[name]
    if userfile.is_spec(name):
        return userfile.resolve(name, KEY)
    raise ConfigError(f"{KEY} = {name!r}: must be one of {', '.join(ALGORITHMS)} or FILE.py:NAME")


def _types(hint) -> tuple[type, ...]:
    """The accepted Python types of an annotation (int also for float; None dropped)."""
    if typing.get_origin(hint) is typing.Annotated:
        hint = typing.get_args(hint)[0]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        out = ()
        for a in typing.get_args(hint):
            out += _types(a) if a is not type(None) else ()
        return out
    hint = typing.get_origin(hint) or hint
    return (float, int) if hint is float else (hint,) if isinstance(hint, type) else (object,)


def keys(fn) -> dict[str, tuple[object, tuple[type, ...], str]]:
    """The algorithm's keys: {name: (default, accepted types, doc)} from the factory's signature."""
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except Exception:               # noqa: BLE001 - unresolvable annotations: types from the defaults
        hints = {}
    out = {}
    params = list(inspect.signature(fn).parameters.values())[1:]       # the first one is ``train``
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is p.empty:
            raise ConfigError(f"{KEY}: the factory's argument {p.name!r} has no default (every key needs one)")
        hint = hints.get(p.name)
        doc = typing.get_args(hint)[1] if typing.get_origin(hint) is typing.Annotated else ""
        accepted = _types(hint) if hint is not None else ()
        if p.default is not None and (not accepted or accepted == (object,)):
            accepted = (float, int) if isinstance(p.default, float) else (type(p.default),)
        out[p.name] = (p.default, accepted or (object,), doc)
    return out


def check_section(given: dict, train: dict) -> dict:
    """``[algorithm]`` validated: the name, unknown keys, types, defaults filled, and the factory's
    own checks (it is called once). Returns the resolved section (every key, defaults filled)."""
    name = given.get("name", "meta")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{KEY} = {name!r}: must be a non-empty string")
    fn = factory(name)
    spec = keys(fn)
    for k in given:
        if k != "name" and k not in spec:
            raise ConfigError(f"unknown key algorithm.{k} for algorithm {name!r} (valid: {', '.join(['name', *spec])})")
    out = {"name": name}
    for k, (default, accepted, _) in spec.items():
        v = given.get(k, default)
        ok = v is None and default is None or object in accepted or (
            isinstance(v, accepted) and not (isinstance(v, bool) and bool not in accepted))
        if not ok:
            raise ConfigError(f"algorithm.{k} = {v!r}: must be of type {' or '.join(t.__name__ for t in accepted)}")
        out[k] = float(v) if isinstance(v, int) and not isinstance(v, bool) and accepted[:1] == (float,) else v
    make(out, train)
    return out


def make(section: dict, train: dict) -> Algorithm:
    """The algorithm of a validated ``[algorithm]`` section and ``[train]`` (a plain dict each)."""
    fn = factory(section["name"])
    kwargs = {k: v for k, v in section.items() if k != "name"}
    try:
        algo = fn(Train.of(train), **kwargs)
    except ConfigError:
        raise
    except Exception as e:                      # noqa: BLE001 - the user's code: any error is bad input
        raise ConfigError(f"{KEY} = {section['name']!r}: building it raised {type(e).__name__}: "
                          f"{' '.join(str(e).split())[:200]}") from None
    if not isinstance(algo, Algorithm):
        raise ConfigError(f"{KEY} = {section['name']!r}: the factory returned a {type(algo).__name__}, "
                          "not an mpifedmeta.algorithms.Algorithm")
    return algo


def describe() -> str:
    """Every built-in algorithm's keys, for `mpifedmeta config`."""
    lines = []
    for name, fn in ALGORITHMS.items():
        ks = keys(fn)
        lines.append(f"# name = \"{name}\"" + ("" if ks else "    (no keys of its own; [train]'s nu, alpha, metagrad, hf_delta)"))
        for k, (default, _, doc) in ks.items():
            lines.append(f"#   {k} = {'(default)' if default is None else repr(default)}    # {doc}")
    return "\n".join(lines)


__all__ = ["ALGORITHMS", "Algorithm", "Train", "factory", "keys", "check_section", "make", "describe"]
