"""The house rules of src/lowshot, read from the source (issue 39): imports point one way (no cycle, config
at the bottom, no import of lowshot inside a function), at most MAX_LAYERS layers, no module over
MAX_LINES lines, thin entry scripts that import the library and not the CLI, no private name imported
across modules, and a docstring on every module saying what it holds."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
SCRIPTS = [REPO / "ssl" / "pretrain.py", REPO / "finetune" / "train.py", REPO / "fewshot" / "evaluate.py"]
MAX_LINES = 450
MAX_SCRIPT_LINES = 220
MAX_LAYERS = 8


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted((SRC / "lowshot").rglob("*.py")):
        parts = list(p.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def _absolute(module: str | None, level: int, here: str, is_package: bool) -> str:
    if not level:
        return module or ""
    base = here.split(".") if is_package else here.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _imports(name: str) -> list[tuple[str, str, ast.stmt, bool]]:
    """(imported module, imported name or "", node, inside a function) for every lowshot import of a module."""
    path = MODULES[name]
    tree = ast.parse(path.read_text())
    inner = {
        id(n)
        for f in ast.walk(tree)
        if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
        for n in ast.walk(f)
    }
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, "", node, id(node) in inner) for a in node.names if a.name.startswith("lowshot")]
        elif isinstance(node, ast.ImportFrom):
            mod = _absolute(node.module, node.level, name, path.name == "__init__.py")
            if mod.startswith("lowshot"):
                out += [(mod, a.name, node, id(node) in inner) for a in node.names]
    return out


@cache
def _defined_in(module: str, name: str) -> str:
    """The module that defines ``name`` when it is imported from ``module`` (a package re-exports its
    submodules' names: the import depends on the submodule, not on the whole package)."""
    if f"{module}.{name}" in MODULES:
        return f"{module}.{name}"
    if module in MODULES and MODULES[module].name == "__init__.py":
        for mod, n, _, _ in _imports(module):
            if n == name:
                return _defined_in(mod, n)
    return module


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for m in MODULES:
        targets = {_defined_in(mod, n) if n else mod for mod, n, _, _ in _imports(m)}
        edges[m] = {t for t in targets if t in MODULES and t != m and t != "lowshot"}
    return edges


def _layers(edges: dict[str, set[str]]) -> dict[str, int]:
    depth: dict[str, int] = {}

    def d(v: str, seen: tuple[str, ...]) -> int:
        assert v not in seen, f"import cycle: {' -> '.join((*seen, v))}"
        if v not in depth:
            depth[v] = 1 + max((d(w, (*seen, v)) for w in edges[v]), default=0)
        return depth[v]

    for v in edges:
        d(v, ())
    return depth


PACKAGES = ("lowshot.config", "lowshot.data", "lowshot.augment")  # one room each: settings, data, views


def room(module: str) -> str:
    return next((p for p in PACKAGES if module == p or module.startswith(p + ".")), module)


def rooms() -> dict[str, set[str]]:
    """The graph between rooms: the top-level modules and the two packages, each package one room (its
    own modules are layered inside it, checked separately)."""
    out: dict[str, set[str]] = {}
    for m, targets in graph().items():
        out.setdefault(room(m), set()).update(room(t) for t in targets if room(t) != room(m))
    return out


def test_imports_point_one_way_without_cycles_in_at_most_eight_layers() -> None:
    edges = graph()
    _layers(edges)  # module by module, packages included: raises on a cycle, naming it
    depth = _layers(rooms())
    assert max(depth.values()) <= MAX_LAYERS, sorted(depth.items(), key=lambda kv: -kv[1])[:6]
    # config is the bottom layer: it imports nothing of lowshot outside itself
    for m, targets in edges.items():
        if m.startswith("lowshot.config"):
            assert all(t.startswith("lowshot.config") for t in targets), (m, targets)
    # the data layer imports only itself and config (never training, tracking, evaluation or the CLI)
    for m, targets in edges.items():
        if m.startswith("lowshot.data"):
            assert all(t.startswith(("lowshot.data", "lowshot.config")) for t in targets), (m, targets)
    # the CLI is the top: no module of the library imports it or a subcommand's dispatcher
    assert not [m for m, targets in edges.items() if "lowshot.cli" in targets]


def test_no_lowshot_import_hides_in_a_function() -> None:
    hidden = [
        f"{MODULES[m].relative_to(REPO)}:{node.lineno} imports {mod}"
        for m in MODULES
        for mod, _, node, inner in _imports(m)
        if inner
    ]
    assert not hidden, hidden


def test_no_private_name_is_imported_across_modules() -> None:
    private = [
        f"{MODULES[m].relative_to(REPO)}:{node.lineno} imports {mod}.{n}"
        for m in MODULES
        for mod, n, node, _ in _imports(m)
        if n.startswith("_") and n != "__version__"
    ]
    assert not private, private


def test_modules_are_small_and_say_what_they_hold() -> None:
    for p in MODULES.values():
        lines = p.read_text().count("\n")
        assert lines <= MAX_LINES, f"{p.relative_to(REPO)}: {lines} lines (split it by concept)"
        doc = ast.get_docstring(ast.parse(p.read_text()))
        assert doc and len(doc.split("\n")[0]) > 10, (
            f"{p.relative_to(REPO)}: no docstring saying what it holds"
        )
    assert not (SRC / "lowshot" / "utils.py").exists()


def test_entry_scripts_are_thin_and_import_the_library_not_the_cli() -> None:
    for p in SCRIPTS:
        text = p.read_text()
        tree = ast.parse(text)
        assert text.count("\n") <= MAX_SCRIPT_LINES, f"{p.relative_to(REPO)}: {text.count(chr(10))} lines"
        assert not [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)], f"{p}: defines a class"
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert "lowshot.cli" not in imported and "lowshot.quickstart" not in imported, p
        assert not (p.parent / "__init__.py").exists(), (
            f"{p.parent}: a package named like the stdlib shadows it"
        )


def test_no_two_public_functions_share_a_name() -> None:
    seen: dict[str, str] = {}
    clashes = []
    for m, p in MODULES.items():
        for node in ast.parse(p.read_text()).body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_") and node.name != "main":
                if node.name in seen:
                    clashes.append(f"{node.name}: {seen[node.name]} and {m}")
                seen[node.name] = m
    assert not clashes, clashes


def test_the_readmes_layout_names_every_room() -> None:
    """The README's layout section is the newcomer's map: every room of src/lowshot is in it."""
    text = (REPO / "README.md").read_text()
    layout = text[text.index("## Layout") :]
    names = {room(m).removeprefix("lowshot.").split(".")[0] for m in MODULES if m != "lowshot"}
    missing = sorted(n for n in names if f"`{n}`" not in layout and f"`{n}/`" not in layout)
    assert not missing, f"README.md's Layout section does not name {missing}"
