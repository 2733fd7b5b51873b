"""The package's shape, checked from its source: imports point down the layers and never
form a cycle; the environment is read in one module; no module reaches into another's
private names or llama-cpp-python's; backends are asked through their protocol, not
probed."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Where each importable part of the package lives (pyproject maps convert/ and benchmarks/).
PARTS = {
    "verm_local": ROOT / "verm_local",
    "verm_local.convert": ROOT / "convert",
    "verm_local.benchmarks": ROOT / "benchmarks",
}

# Layers, bottom first (docs/architecture.md): a module imports only from its own layer or
# the ones below. The CLI is on top.
LAYERS = [
    {
        "constants",
        "errors",
        "settings",
        "decoding",
        "events",
        "stdio",
        "paths",
        "fileio",
        "memory",
        "net",
        "sandbox",
    },
    {
        "tasks",
        "reward",
        "images",
        "schema",
        "answer",
        "prompts",
        "gguf_meta",
        "modelref",
        "catalog",
        "report",
        "render",
        "rows",
        "pixels",
    },
    {"hardware", "select", "crash", "runtime"},
    {"backends", "vision_onnx"},
    {"judge", "pairs"},
    {
        "client",
        "server",
        "benchmarks",
        "convert",
        "store",
        "hub",
        "hub_gguf",
        "doctor",
        "refine",
        "integrations",
        "raydata",
        "mcp_server",
    },
    {"cli", "__init__"},
]


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, root in PARTS.items():
        for path in root.rglob("*.py"):
            rel = path.relative_to(root).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([pkg, *parts])
            if pkg == "verm_local" and parts[:1] in (["convert"], ["benchmarks"]):
                continue
            out[name] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules `name` imports, at module level or inside functions."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")
                up = up[: len(up) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            # `from pkg import mod` imports pkg.mod; `from mod import name` imports mod.
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names
            ]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {n: _imports(n, p, set(mods)) for n, p in mods.items()}


def _layer(module: str) -> int:
    part = module.split(".")[1] if module.count(".") else "__init__"
    for i, names in enumerate(LAYERS):
        if part in names:
            return i
    raise AssertionError(f"{module} is in no layer; add it to LAYERS and the architecture doc")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph = _graph()
    assert len(graph) > 40
    cycles = _cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_imports_point_down_the_layers():
    wrong = []
    for module, targets in _graph().items():
        for t in targets:
            if module.startswith(t + ".") or t == "verm_local":
                continue  # a package's own __init__
            if _layer(t) > _layer(module):
                wrong.append(f"{module} (layer {_layer(module)}) imports {t} (layer {_layer(t)})")
    assert not wrong, "\n".join(wrong)


def _sources() -> list[tuple[str, str]]:
    return [(str(p.relative_to(ROOT)), p.read_text(encoding="utf-8")) for p in _modules().values()]


def test_the_environment_is_read_in_one_module():
    offenders = [
        f
        for f, text in _sources()
        if re.search(r"os\.environ|os\.getenv|getenv\(", text)
        and not f.endswith("verm_local/settings.py")
    ]
    assert not offenders, offenders


@pytest.mark.parametrize(
    "pattern,what",
    [
        (r"\bllama_cpp(\.[a-z_]+)?\._[a-z]", "llama-cpp-python's private names"),
        (r"getattr\(\s*(self\.)?(judge\.)?backend\b", "probing a backend instead of its protocol"),
        (
            r"\b(?!self\b)[a-z_]+\.(llama|_ctx|_model|_batch|_llama_cpp|_mtmd)\.[a-z_]",
            "private members of another object",
        ),
    ],
)
def test_no_reaching_into_private_names(pattern, what):
    offenders = [f for f, text in _sources() if re.search(pattern, text)]
    assert not offenders, f"{what}: {offenders}"


def test_no_module_uses_another_modules_private_names():
    offenders = []
    for f, text in _sources():
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        offenders.append(f"{f}: from {node.module} import {a.name}")
    assert not offenders, offenders
