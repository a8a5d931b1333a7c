"""No import cycles between mpifedmeta modules (static: nothing is imported).

Every module under mpifedmeta/ is parsed; its edges are the mpifedmeta modules it imports anywhere
(module level and inside functions, ``import_module("mpifedmeta....")`` string literals too, and
any string literal naming an mpifedmeta module handed to a call, such as the registries that
run/config.py's ``Registered("mpifedmeta.models", "MODELS")`` imports at validation time), except
under ``if TYPE_CHECKING:``. ``from mpifedmeta.x import y`` is an edge to mpifedmeta.x, and to
mpifedmeta.x.y when that is a module. Importing a module also runs its parent packages' __init__,
which counts as an edge, except for the importer's own packages: Python runs those first anyway, so
a package importing its submodules is no cycle unless a submodule imports names of that package's
__init__ back (``from mpifedmeta.data import DataError`` inside mpifedmeta/data/).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "mpifedmeta"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE


def _modules() -> dict[str, tuple[Path, bool]]:
    """Module name → (file, is a package __init__)."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
           (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _nodes(tree: ast.AST):
    """Every node of ``tree`` except the bodies of ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            stack.append(node.test)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _imports_by_name(call: ast.Call) -> bool:
    fn = call.func
    return (fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else "") \
        in ("import_module", "__import__")


def _imports(name: str, path: Path, is_package: bool, modules) -> set[str]:
    """The mpifedmeta modules that module ``name`` imports (see the module docstring)."""
    package = name if is_package else name.rpartition(".")[0]
    own = set(_ancestors(name)) | {name}          # packages Python has run before this module's code
    targets: set[str] = set()

    def add(target: str):                          # a module and the parent packages it runs
        if target in modules:
            targets.add(target)
        targets.update(p for p in _ancestors(target) if p in modules and p not in own)

    for node in _nodes(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source not in own:                  # own packages: only a name of their __init__ counts
                add(source)
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                if sub in modules:
                    add(sub)
                elif source in own and source in modules:
                    targets.add(source)            # names of an own package's __init__: a real edge
        elif isinstance(node, ast.Call):         # import_module("mpifedmeta.x"), Registered("mpifedmeta.x", ...)
            for arg in node.args + [k.value for k in node.keywords]:
                for const in ast.walk(arg):
                    if isinstance(const, ast.Constant) and isinstance(const.value, str) \
                            and const.value.startswith(PACKAGE + ".") and (const.value in modules or _imports_by_name(node)):
                        add(const.value)
    targets.discard(name)
    return targets


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, is_package, modules) for name, (path, is_package) in modules.items()}


def components(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (each sorted): the cycles' modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def strongconnect(v: str):                     # Tarjan; the graph is small, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return components


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component of more than one module."""
    return [_cycle_in(graph, set(c)) for c in components(graph)]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the first module of ``component`` (breadth-first inside it)."""
    start = min(component)
    parent = {start: None}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & component):
            if w == start:
                path = [v]
                while parent[path[-1]] is not None:
                    path.append(parent[path[-1]])
                return path[::-1] + [start]
            if w not in parent:
                parent[w] = v
                queue.append(w)
    raise AssertionError(f"no cycle found in component {sorted(component)}")


def test_the_scan_finds_the_modules_and_their_imports():
    graph = import_graph()
    assert len(graph) > 20 and "mpifedmeta.run.config" in graph and "mpifedmeta.errors" in graph
    assert "mpifedmeta.errors" in graph["mpifedmeta.userfile"]          # module-level import
    assert "mpifedmeta.userfile" in graph["mpifedmeta.run.config"]      # import_module("...") literal
    assert "mpifedmeta.models" in graph["mpifedmeta.run.config"]        # Registered("mpifedmeta.models", ...)
    assert "mpifedmeta.data.user" in graph["mpifedmeta.data.loaders"]   # import inside a function
    assert graph["mpifedmeta.errors"] == set(), "mpifedmeta.errors must stay a leaf"


def test_the_cycle_finder_reports_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert cycles(graph) == [["a", "b", "c", "a"]]


def test_no_import_cycles():
    graph = import_graph()
    report = []
    for component in components(graph):
        inside = set(component)
        report.append("  cycle: " + " -> ".join(_cycle_in(graph, inside)))
        report.append("    all imports among its modules: " + "; ".join(
            f"{v} -> {', '.join(sorted(graph[v] & inside))}" for v in component))
    assert not report, "import cycles between mpifedmeta modules:\n" + "\n".join(report)
