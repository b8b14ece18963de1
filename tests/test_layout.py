"""The package layout shows the design: subpackages import downward only, with no cycles, and
no module borrows another module's private names."""

from __future__ import annotations

import ast
from pathlib import Path

import declora

ROOT = Path(declora.__file__).parent
#: Lowest first: a module may import from its own layer or any lower one.
LAYERS = [
    "errors",
    "config",
    "data",
    "model",
    "tasks",
    "network",
    "engine",
    "algorithms",
    "reporting",
    "runners",
    "cli",
]
#: Deliberate upward look-ups, each with its reason.
ALLOWED_UPWARD = {
    # the config's accepted algorithm names and combinations are the algorithm registry's
    ("declora.config.schema", "declora.algorithms.registry"),
}


def _modules() -> dict[str, Path]:
    out = {}
    for f in ROOT.rglob("*.py"):
        parts = f.relative_to(ROOT).with_suffix("").parts
        name = ".".join(("declora", *parts)).removesuffix(".__init__")
        out[name] = f
    return out


def _runtime_imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every `declora` import outside `if TYPE_CHECKING:` blocks."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("declora"):
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.startswith("declora")]
    return found


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else "errors"
    top = "cli" if top == "__main__" else top
    return LAYERS.index(top)


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        for target, names in _runtime_imports(f):
            for t in (target, *(f"{target}.{n}" for n in names)):
                if t in mods and t != m:
                    edges[m].add(t)
    return edges


def test_every_subpackage_is_a_known_layer():
    tops = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert tops <= set(LAYERS)


def test_modules_import_downward_only():
    upward = [
        (m, t)
        for m, targets in _graph().items()
        for t in targets
        if _layer(t) > _layer(m) and (m, t) not in ALLOWED_UPWARD
    ]
    assert upward == []


def test_no_import_cycles():
    edges = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(v: str, path: list[str]) -> None:
        state[v] = 1
        for w in sorted(edges[v]):
            if state.get(w) == 1:
                cycles.append([*path[path.index(w) :], w] if w in path else [v, w])
            elif w not in state:
                visit(w, [*path, w])
        state[v] = 2

    for v in sorted(edges):
        if v not in state:
            visit(v, [v])
    assert cycles == []


def test_no_module_imports_another_modules_private_names():
    borrowed = [
        (str(f.relative_to(ROOT)), target, n)
        for f in ROOT.rglob("*.py")
        for target, names in _runtime_imports(f)
        for n in names
        if n.startswith("_") and not n.startswith("__")
    ]
    assert borrowed == []


def test_tests_use_public_names_only():
    """Tests build jobs through the public API (the builder, the CLI), not private helpers."""
    tests = Path(__file__).parent
    borrowed = [
        (f.name, target, n)
        for f in sorted(tests.glob("*.py"))
        for target, names in _runtime_imports(f)
        for n in names
        if n.startswith("_") and not n.startswith("__")
    ]
    assert borrowed == []


def test_a_run_loads_peft_only_when_it_needs_it():
    """PEFT takes 2-3 s to import: a LoRA run on the batched engine, and a run refused for bad
    input, do not pay for it until they save their adapter in PEFT's format."""
    import subprocess
    import sys

    code = (
        "import sys, declora.runners.simulate, declora.runners.peer, declora.runners.build; "
        "print('peft' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
