"""Imports run one way: cli -> tools -> passes / runtime_shim -> verify -> format -> errors.

Every module of the ``lazykv`` package (``lazykv/``, ``passes/``, ``runtime_shim/``,
``cli/``, ``examples/``) is parsed with ``ast``; every import of another lazykv module,
at the top or inside a function, must go to the same layer or a lower one, and the
import graph (all imports) must have no cycle. ``docs/architecture.md`` draws the same
layers.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

ROOT = Path(__file__).resolve().parents[1]
#: Source folder -> package (pyproject.toml's package-dir).
FOLDERS = {"lazykv": "lazykv", "passes": "lazykv.passes", "runtime_shim": "lazykv.runtime_shim",
           "cli": "lazykv.cli", "examples": "lazykv.examples"}
#: Module-name prefix -> layer (longest prefix wins); higher layers may import lower ones.
LAYERS = {
    "lazykv.errors": 0,
    "lazykv": 1,  # the package itself: __version__ only
    "lazykv.format": 1, "lazykv.manifest": 1, "lazykv._et_compat": 1,
    "lazykv.verify": 2, "lazykv.estimate": 2,
    "lazykv.passes": 3, "lazykv.runtime_shim": 3, "lazykv.models": 3, "lazykv.examples": 3,
    "lazykv.inspect": 4, "lazykv.check": 4, "lazykv.export": 4, "lazykv.llm_export": 4,
    "lazykv.llm_config": 4, "lazykv.support_table": 4,
    "lazykv.cli": 5,
}
#: Siblings that must not import each other.
SIBLINGS = ("lazykv.passes", "lazykv.runtime_shim")


def _modules() -> Dict[str, Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if folder == "lazykv" and parts and parts[0] in ("passes", "runtime_shim", "cli"):
                continue
            if "ci" in parts:  # examples/ci: a user's CI example, not part of the package
                continue
            out[".".join([package, *parts])] = path
    return out


def _layer(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def _imports(module: str, path: Path, known: Set[str]) -> Set[str]:
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module.split(".")
                parent = parent[: len(parent) - node.level + (1 if is_package else 0)]
                base = ".".join(parent + ([base] if base else []))
            # ``from x import y``: the submodule x.y if there is one, else a name in x.
            # (Importing x.y runs x's ``__init__`` first, as for every package; a
            # submodule reaching its own package that way is not counted as a cycle.)
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                     for a in node.names]
        for name in names:
            # The longest known module the name starts with (``from x import y``: y may
            # be a module or a name in x).
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def _graph() -> Dict[str, Set[str]]:
    mods = _modules()
    return {m: _imports(m, p, set(mods)) for m, p in mods.items()}


def test_every_import_goes_down_the_layers():
    bad = []
    for module, imports in _graph().items():
        for target in imports:
            if _layer(target) > _layer(module):
                bad.append(f"{module} (layer {_layer(module)}) imports {target} "
                           f"(layer {_layer(target)})")
            for a in SIBLINGS:
                for b in SIBLINGS:
                    if a != b and module.startswith(a) and target.startswith(b):
                        bad.append(f"{module} imports its sibling {target}")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycle():
    graph = _graph()
    state: Dict[str, int] = {}
    stack: List[str] = []
    cycles = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_format_layer_imports_no_torch_and_no_executorch():
    mods = _modules()
    bad = []
    for module, path in mods.items():
        if _layer(module) > 1 or module == "lazykv._et_compat":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad += [f"{module}: {n}" for n in names if n.split(".")[0] in ("torch", "executorch")]
    assert not bad, bad


def _private_reaches(path: Path) -> List[str]:
    """Imports of private torch/ExecuTorch modules or names, and ``torch._x`` attributes."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            root = node.module.split(".")[0]
            if root in ("torch", "executorch") and (
                    any(p.startswith("_") for p in node.module.split("."))
                    or any(a.name.startswith("_") for a in node.names)):
                found.append(f"line {node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in ("torch", "executorch") and any(
                        p.startswith("_") for p in a.name.split(".")):
                    found.append(f"line {node.lineno}: import {a.name}")
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in ("torch", "executorch"):
                found.append(f"line {node.lineno}: {base.id}...{node.attr}")
    return found


def test_private_torch_and_executorch_reaches_only_in_et_compat():
    """Every reach into a private ExecuTorch/torch module or name (``from torch.utils._pytree
    import ...``, ``torch._C...``) lives in ``lazykv/_et_compat.py`` (user-facing example
    scripts under ``examples/`` excepted: they show ExecuTorch's own recipe, as a user
    would copy it). Private attributes of ExecuTorch objects (``edge_manager.
    _named_data_store``) cannot be told apart from lazykv's own by the parser; they are
    in ``_et_compat`` too, by review."""
    bad = []
    for module, path in _modules().items():
        if module == "lazykv._et_compat" or module.startswith("lazykv.examples"):
            continue
        bad += [f"{module}: {r}" for r in _private_reaches(path)]
    assert not bad, "\n".join(bad)
