"""A user's own function named in the configuration (``model.name``, ``data.dataset``):
``"path/to/file.py:function"`` or ``"package.module:function"``.

A ``.py`` path is relative to the current directory (mpiexec starts every rank in the directory it
was started in; the configuration stores the string as given) and is imported once per process,
under a module name made from its absolute path, with its own directory on ``sys.path`` while it
is imported (so it can import modules next to it). A module path is imported with importlib. Every
problem is one line naming the key, the file and what is wrong (:class:`UserFileError`: exit 2).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import sys

from mpifedmeta.errors import ConfigError


class UserFileError(ConfigError):
    """``key = 'spec': problem`` (``problem`` alone is what config validation reports after the key)."""

    def __init__(self, key: str, spec: str, problem: str):
        super().__init__(f"{key} = {spec!r}: {problem}")
        self.problem = problem


def is_spec(value) -> bool:
    """Whether a model.name / data.dataset value names a user's function rather than a registry entry."""
    return isinstance(value, str) and ":" in value


def _oneline(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


_LOADED: dict[tuple, object] = {}


def _load_file(path: str, spec: str, key: str):
    if not path.endswith(".py"):
        raise UserFileError(key, spec, f"{path} is not a .py file")
    full = os.path.abspath(path)
    if not os.path.exists(full):
        raise UserFileError(key, spec, f"file {path} not found (relative paths are relative to the current "
                                       f"directory, {os.getcwd()})")
    if not os.path.isfile(full):
        raise UserFileError(key, spec, f"{path} is not a regular file")
    st = os.stat(full)
    cache_key = (full, st.st_mtime_ns, st.st_size)
    if cache_key in _LOADED:
        return _LOADED[cache_key]
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(full))[0])
    name = f"mpifedmeta_user_{hashlib.sha1(full.encode()).hexdigest()[:10]}_{stem}"
    module_spec = importlib.util.spec_from_file_location(name, full)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module          # dataclasses and pickling look their module up here
    sys.path.insert(0, os.path.dirname(full))
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as e:
        sys.modules.pop(name, None)
        raise UserFileError(key, spec, f"cannot import {path}: SyntaxError: {e.msg} (line {e.lineno})") from None
    except (Exception, SystemExit) as e:
        sys.modules.pop(name, None)
        raise UserFileError(key, spec, f"importing {path} raised {type(e).__name__}: {_oneline(e)}") from None
    finally:
        sys.path.remove(os.path.dirname(full))
    _LOADED[cache_key] = module
    return module


def _load_module(where: str, spec: str, key: str):
    try:
        return importlib.import_module(where)
    except (Exception, SystemExit) as e:
        raise UserFileError(key, spec, f"cannot import module {where!r}: {type(e).__name__}: {_oneline(e)}") from None


def resolve(spec: str, key: str):
    """The callable that ``spec`` names; UserFileError (one line) for every problem."""
    where, _, name = spec.rpartition(":")
    if not where or not name.strip():
        raise UserFileError(key, spec, "expected FILE.py:FUNCTION or package.module:FUNCTION")
    is_file = where.endswith(".py") or "/" in where or os.sep in where or os.path.exists(where)
    obj = module = _load_file(where, spec, key) if is_file else _load_module(where, spec, key)
    for part in name.split("."):
        if not hasattr(obj, part):
            defined = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                             and getattr(v, "__module__", None) == module.__name__)
            hint = f" (it defines: {', '.join(defined[:8])})" if defined else ""
            raise UserFileError(key, spec, f"{where} has no function {name!r}{hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserFileError(key, spec, f"{name!r} in {where} is a {type(obj).__name__}, not a function")
    return obj


def call(spec: str, key: str, *args):
    """``resolve(spec)(*args)``; an exception inside the user's function becomes one line too."""
    fn = resolve(spec, key)
    try:
        return fn(*args)
    except ConfigError:
        raise
    except Exception as e:                      # noqa: BLE001 - the user's code: any error is bad input
        raise UserFileError(key, spec, f"{spec.rpartition(':')[2]}{_short(args)} raised {type(e).__name__}: "
                                       f"{_oneline(e)}") from None


def _short(args: tuple) -> str:
    text = "(" + ", ".join(repr(a) for a in args) + ")"
    return text if len(text) <= 80 else text[:70] + "...)"
