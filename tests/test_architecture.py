"""The package's layers (docs/architecture.md), read from its own imports: no arrow from a lower layer to a higher
one, no import cycle, the model library only inside its host, `print` only where a command prints."""

from __future__ import annotations

import ast
import os
import re

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ppt_fast")

# Low to high. A module belongs to the layer of the longest prefix that names it. Imports within a layer are allowed
# (no cycles); imports of a higher layer are not.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("ppt_fast._version", "ppt_fast._env", "ppt_fast._io", "ppt_fast._ext", "ppt_fast._backend",
              "ppt_fast.ops._errors", "ppt_fast._errors", "ppt_fast.assets")),
    ("pivot sets", ("ppt_fast.pivots",)),
    ("kernels", ("ppt_fast.kernels",)),
    ("ops", ("ppt_fast.ops",)),
    ("scopes, row gradients, audio", ("ppt_fast.scope", "ppt_fast.rowgrad", "ppt_fast.audio", "ppt_fast.reference",
                                      "ppt_fast.report_html")),
    ("optimizer and sensitivity", ("ppt_fast.sensitivity", "ppt_fast.optim", "ppt_fast.distributed")),
    ("concepts", ("ppt_fast.recipes", "ppt_fast.concept", "ppt_fast.identifiers", "ppt_fast.synth")),
    ("hosts", ("ppt_fast.hosts",)),
    ("default model", ("ppt_fast.tiny",)),
    ("model resolution", ("ppt_fast.models",)),
    ("tune and generate", ("ppt_fast.tuning", "ppt_fast.generation")),
    ("evaluation", ("ppt_fast.eval",)),
    ("commands and the public surface", ("ppt_fast.cli", "ppt_fast.__main__", "ppt_fast.eval.cli",
                                         "ppt_fast.eval.default_model", "ppt_fast.app")),
]
# The package root is the public surface: it re-exports the public names lazily (PEP 562) and imports only _version
# eagerly. The evaluation and the commands use the product through it, as a user does; nothing lower may.
ROOT_PACKAGE = "ppt_fast"
PUBLIC_USERS_FROM = "evaluation"
# Modules that may import the model library they host (nothing above them does).
LIBRARY_IMPORTS = {
    "audiocraft": ("ppt_fast.hosts.audiocraft", "ppt_fast.tiny"),
    "transformers": ("ppt_fast.hosts.transformers",),
    "peft": ("ppt_fast.eval.peers",),
    "gradio": ("ppt_fast.app.ui",),  # the app's page; ppt_fast.app.core (its logic) never imports it
}
# Modules that are commands: they print what the user asked for.
PRINTERS = ("ppt_fast.cli", "ppt_fast.eval.cli", "ppt_fast.eval.default_model")


def _modules() -> dict[str, str]:
    out = {}
    for d, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return out


MODULES = _modules()


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                skip.update(id(n) for n in ast.walk(sub))
    return skip


def _imports(module: str) -> tuple[set[str], set[str], ast.AST]:
    """(ppt_fast modules `module` imports, at any depth and at run time; external top-level packages; the tree)."""
    path = MODULES[module]
    tree = ast.parse(open(path).read())
    skip = _type_checking_nodes(tree)
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    inner, outer = set(), set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for a in node.names:
                (inner if a.name.startswith("ppt_fast") else outer).add(a.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                target = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("ppt_fast"):
                outer.add(target)
                continue
            for a in node.names:
                child = f"{target}.{a.name}"
                inner.add(child if child in MODULES else target)
    inner = {m for m in inner if m in MODULES and m != module}
    return inner, {m.split(".")[0] for m in outer if m}, tree


GRAPH = {m: _imports(m) for m in MODULES}


def _layer(module: str) -> int:
    best, layer = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, layer = len(p), i
    assert layer is not None, f"{module} is in no layer: add it to LAYERS (and docs/architecture.md)"
    return layer


def test_every_module_has_a_layer():
    for m in MODULES:
        if m != ROOT_PACKAGE:
            _layer(m)


def test_no_arrow_points_up():
    bad = []
    for m, (inner, _, _) in GRAPH.items():
        if m == ROOT_PACKAGE:
            continue
        for t in inner:
            if t == ROOT_PACKAGE:
                if _layer(m) < [n for n, _ in LAYERS].index(PUBLIC_USERS_FROM):
                    bad.append(f"{m} imports the package root (import from the module that defines the name)")
            elif _layer(t) > _layer(m):
                bad.append(f"{m} ({LAYERS[_layer(m)][0]}) imports {t} ({LAYERS[_layer(t)][0]})")
    assert not bad, "\n".join(sorted(bad))


def test_root_imports_only_the_low_layers_eagerly():
    """The root imports only `_version` eagerly; every public name, the ops and pivot sets included, is lazy (PEP 562),
    so `import ppt_fast` (and `ppt-fast --help`) imports no torch (issue 29)."""
    inner, _, tree = GRAPH[ROOT_PACKAGE]
    top = {n.module for n in tree.body if isinstance(n, ast.ImportFrom) and n.level}
    assert top <= {"_version"}, top


def test_no_import_cycle():
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in sorted(GRAPH[m][0]):
            if t == ROOT_PACKAGE:
                continue
            if state.get(t) == 1:
                cycle = path[path.index(t) :] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state and m != ROOT_PACKAGE:
            visit(m)


def test_model_libraries_stay_inside_their_hosts():
    for lib, allowed in LIBRARY_IMPORTS.items():
        users = sorted(m for m, (_, outer, _) in GRAPH.items() if lib in outer)
        strays = [m for m in users if not any(m == a or m.startswith(a + ".") for a in allowed)]
        assert not strays, f"{lib} is imported outside its host: {strays}"
        assert users, f"nothing imports {lib}: LIBRARY_IMPORTS is stale"
    for m in ("ppt_fast.tuning", "ppt_fast.generation", "ppt_fast.models"):
        assert not (GRAPH[m][1] & set(LIBRARY_IMPORTS)), m


def test_print_only_in_commands():
    bad = []
    for m, (_, _, tree) in GRAPH.items():
        if m in PRINTERS:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                bad.append(f"{m}:{node.lineno}")
    assert not bad, f"print() outside the commands (log, or return it to the command): {bad}"


def test_layers_documented():
    doc = open(os.path.join(os.path.dirname(ROOT), "docs", "architecture.md")).read()
    for name, _ in LAYERS:
        assert re.search(rf"^#+ .*{re.escape(name)}", doc, re.I | re.M), f"docs/architecture.md has no section {name!r}"


def test_version_is_stated_once():
    from ppt_fast import __version__

    pyproject = open(os.path.join(os.path.dirname(ROOT), "pyproject.toml")).read()
    assert re.search(rf'^version = "{re.escape(__version__)}"$', pyproject, re.M)
