"""The package's layering, read from the source: every import of every module (lazy ones inside functions and
`if TYPE_CHECKING:` blocks included, since a deferred import is still a dependency) points to the same layer or a
lower one, and no modules import each other in a circle. ARCHITECTURE.md draws the same order."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lit_ft"

LAYERS = ("errors", "validation", "losses", "models", "train", "data", "online", "stages", "callbacks", "plan", "cli")
"""Bottom to top; `lit_ft/__init__.py` (the public surface, lazy) and `lit_ft/__main__.py` sit above them all."""


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ("lit_ft", *path.relative_to(PACKAGE).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The lit_ft modules `name` imports: each `from X import y` counts as X.y where that is a module, else X."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target.startswith("lit_ft") and target != name:
                out.add(target)
    return out


def layer(name: str) -> int | None:
    parts = name.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def where(name: str) -> str:
    return str(modules()[name].relative_to(PACKAGE.parent))


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_every_module_belongs_to_a_layer():
    stray = [n for n in graph() if n not in ("lit_ft", "lit_ft.__main__") and layer(n) is None]
    assert not stray, f"modules outside the layers {LAYERS}: {stray}"


def test_imports_only_point_down():
    upward = [f"{where(a)} imports {where(b)} ({LAYERS[layer(a)]} is below {LAYERS[layer(b)]})"
              for a, targets in graph().items() if layer(a) is not None
              for b in targets if layer(b) is not None and layer(b) > layer(a)]
    assert not upward, "\n".join(upward)


def test_no_import_circles():
    g = graph()
    circles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(g.get(node, ())):
            if state.get(nxt) == "open":
                circles.append(" -> ".join(where(m) for m in (stack[stack.index(nxt):] if nxt in stack else []) + [node, nxt]))
            elif nxt not in state:
                visit(nxt, stack + [node])
        state[node] = "done"

    for node in sorted(g):
        if node not in state:
            visit(node, [])
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_a_subpackage_never_imports_its_own_package_init():
    """`from lit_ft.models import X` inside lit_ft/models/ would run the package's __init__ half-way: a circle."""
    bad = [f"{where(a)} imports {where(b)}" for a, targets in graph().items() for b in targets
           if b != "lit_ft" and modules()[b].name == "__init__.py" and a.startswith(b + ".")]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("name", [n for n in LAYERS if (PACKAGE / n).is_dir()])
def test_each_subpackage_says_what_it_is(name):
    doc = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text()))
    assert doc and "May import" in doc, f"lit_ft/{name}/__init__.py needs a docstring saying what lives there and what it may import"


def test_the_architecture_page_draws_the_same_order():
    text = (PACKAGE.parent / "ARCHITECTURE.md").read_text()
    assert " < ".join(LAYERS) in text
