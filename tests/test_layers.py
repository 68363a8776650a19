"""
The package's layers, as docs/architecture.rst draws them: no module import
circle (imports made only for type checking do not count, imports inside
functions do), and the wire format and handshake free of Twisted.
"""

from __future__ import annotations

import ast
import pathlib
from typing import Dict, List, Optional, Set

import twisted_socks5

PACKAGE = pathlib.Path(twisted_socks5.__file__).parent

#: Sans-IO: they parse and decide, the Twisted layer moves the bytes.
SANS_IO = ("codec", "handshake", "addresses", "socks4", "resp")


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: pathlib.Path) -> List[str]:
    """Every absolute module name ``path`` imports at run time."""
    package = _module_name(path)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    return _imports_of(path.read_text(encoding="utf-8"), package)


def _imports_of(source: str, package: str) -> List[str]:
    """What ``source``, a module of the subpackage ``package``, imports."""
    found: List[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                stem = ".".join(["twisted_socks5", *base, *filter(None, [node.module])])
                if node.module:
                    found.append(stem)
                # "from . import x" imports the module x (the package is
                # the one being imported already).
                found.extend(f"{stem}.{alias.name}" for alias in node.names)
            elif node.module:
                found.append(node.module)
                found.extend(f"{node.module}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return found


def _graph() -> Dict[str, Set[str]]:
    modules = {
        "twisted_socks5" + (("." + _module_name(p)) if _module_name(p) else ""): p
        for p in PACKAGE.rglob("*.py")
    }
    return {
        name: {i for i in _imports(path) if i in modules and i != name}
        for name, path in modules.items()
    }


def _cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    done: Set[str] = set()
    stack: List[str] = []

    def walk(node: str) -> Optional[List[str]]:
        if node in stack:
            return stack[stack.index(node) :] + [node]
        if node in done:
            return None
        stack.append(node)
        for after in sorted(graph[node]):
            # A package's __init__ re-exporting its modules is not a circle.
            if after == node.rpartition(".")[0]:
                continue
            found = walk(after)
            if found:
                return found
        stack.pop()
        done.add(node)
        return None

    for node in sorted(graph):
        found = walk(node)
        if found:
            return found
    return None


def test_no_module_import_circle() -> None:
    assert _cycle(_graph()) is None


def test_the_circle_finder_finds_one() -> None:
    """The check above can fail: a planted circle is found."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert _cycle(graph) == ["a", "b", "c", "a"]


def test_type_checking_imports_do_not_count() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from .server import X\n"
        "else:\n    from .codec import Y\n"
        "def f():\n    from .rules import Z\n"
    )
    found = _imports_of(source, "")
    assert "twisted_socks5.server" not in found
    assert "twisted_socks5.codec" in found
    assert "twisted_socks5.rules" in found


def test_sans_io_modules_do_not_import_twisted() -> None:
    for name in SANS_IO:
        imported = _imports(PACKAGE / f"{name}.py")
        assert imported, name
        assert not [i for i in imported if i.split(".")[0] == "twisted"], name
