"""The project's import graph, read from the source (nothing is imported).

Run as a script to print the import cycles: ``python -m tests.layout.import_graph``.
Every import counts, also one inside a function (it runs when the function does),
except those under ``if TYPE_CHECKING:`` (annotations only, never executed).
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("nat", "proxy", "grpc_bridge")


@dataclass
class Module:
    name: str
    path: Path
    imports: set[str] = field(default_factory=set)  # project modules
    external: set[str] = field(default_factory=set)  # top-level names of everything else
    private_reaches: list[tuple[int, str]] = field(default_factory=list)  # (line, "obj._attr")
    private_defined: set[str] = field(default_factory=set)  # _names this module defines

    def foreign_private_reaches(self) -> list[tuple[int, str]]:
        """``obj._name`` whose ``_name`` this module does not define: another module's private."""
        return [(line, reach) for line, reach in self.private_reaches
                if reach.rpartition(".")[2] not in self.private_defined]


def module_name(path: Path, root: Path = REPO) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(tree: ast.AST, annotations: bool) -> Iterator[ast.AST]:
    """Every node, less those under ``if TYPE_CHECKING:`` unless ``annotations``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if not annotations and isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _reached_private(node: ast.Attribute) -> str | None:
    """``x._name`` where ``x`` is not ``self``/``cls``/a module: another object's private field."""
    attr = node.attr
    if not attr.startswith("_") or attr.startswith("__"):
        return None
    value = node.value
    if isinstance(value, ast.Name) and value.id in ("self", "cls"):
        return None
    if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "super":
        return None
    return f"{ast.unparse(value)}.{attr}"


def read_modules(
    root: Path = REPO, packages: Iterable[str] = PACKAGES, *, annotations: bool = False
) -> dict[str, Module]:
    """Modules and their imports; ``annotations`` counts ``if TYPE_CHECKING:`` imports too."""
    modules: dict[str, Module] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            modules[module_name(path, root)] = Module(module_name(path, root), path)
    for module in modules.values():
        tree = ast.parse(module.path.read_text(), str(module.path))
        package = module.name if module.path.name == "__init__.py" else module.name.rpartition(".")[0]
        imported_names: set[str] = set()
        for node in _runtime_nodes(tree, annotations):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    imported_names.add(alias.name)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                imported_names.add(base)
                # `from pkg import submodule` imports the submodule too
                imported_names.update(f"{base}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Attribute):
                reach = _reached_private(node)
                if reach is not None:
                    module.private_reaches.append((node.lineno, reach))
                elif isinstance(node.ctx, ast.Store) and node.attr.startswith("_"):
                    module.private_defined.add(node.attr)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                module.private_defined.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                module.private_defined.add(node.id)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("_"):
                module.private_defined.add(node.value)  # __slots__ entries, getattr names
        for name in imported_names:
            if name in modules:
                if name != module.name:
                    module.imports.add(name)
            elif name.split(".")[0] not in PACKAGES:
                module.external.add(name.split(".")[0])
    return modules


def cycles(modules: dict[str, Module]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0

    def visit(name: str) -> None:
        nonlocal counter
        index[name] = low[name] = counter
        counter += 1
        stack.append(name)
        on_stack.add(name)
        for target in sorted(modules[name].imports):
            if target not in index:
                visit(target)
                low[name] = min(low[name], low[target])
            elif target in on_stack:
                low[name] = min(low[name], index[target])
        if low[name] == index[name]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == name:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for name in sorted(modules):
        if name not in index:
            visit(name)
    return sorted(found)


def mutual_imports(modules: dict[str, Module]) -> list[tuple[str, str]]:
    """Pairs of modules that import each other directly."""
    return sorted(
        (a, b) for a in modules for b in modules[a].imports if a < b and a in modules.get(b, Module(b, Path())).imports
    )


def main(argv: list[str]) -> int:
    root = Path(argv[0]).resolve() if argv else REPO
    for with_annotations in (False, True):
        modules = read_modules(root, annotations=with_annotations)
        components = cycles(modules)
        kind = "runtime and annotation-only imports" if with_annotations else "runtime imports"
        print(f"{kind}: {len(modules)} modules, {sum(len(m.imports) for m in modules.values())} project imports, "
              f"{len(components)} cycles (strongly connected components), {len(mutual_imports(modules))} mutual pairs")
        for component in components:
            print("  cycle:", " <-> ".join(component))
        for a, b in mutual_imports(modules):
            print("  mutual:", a, "<->", b)
    reaches = [(m.name, line, r) for m in read_modules(root).values() for line, r in m.foreign_private_reaches()]
    print(f"{len(reaches)} reaches into another module's private names")
    for name, line, reach in reaches:
        print(f"  {name}:{line}: {reach}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
