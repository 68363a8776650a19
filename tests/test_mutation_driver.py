"""mutation/run.py makes the mutants it promises, each one change that compiles."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

SOURCE = b'''\
def check(a: int, b: int, log) -> bool:
    """Docstring."""
    log.info("checking {a}", a=a)
    if a < b and not a:
        raise ValueError("no")  # pragma: no cover
    for x in range(3):
        if x:
            break
    return a == b


class C:
    def __repr__(self) -> str:
        return "C" if 1 else "D"

    def ok(self) -> bool:
        return True
'''


@pytest.fixture(scope="module")
def driver() -> ModuleType:
    path = Path(__file__).resolve().parent.parent / "mutation" / "run.py"
    spec = importlib.util.spec_from_file_location("mutation_run", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # for its dataclasses
    spec.loader.exec_module(module)
    return module


def test_mutants_are_single_changes_that_compile(driver: ModuleType) -> None:
    mutants = driver.mutants_of("m.py", ["*"], SOURCE)
    original = SOURCE.splitlines()
    kinds = {(m.kind, m.description) for m in mutants}
    assert ("compare", "< -> >=") in kinds
    assert ("compare", "< -> <=") in kinds
    assert ("boolop", "and -> or") in kinds
    assert ("not", "removed not") in kinds
    assert ("loop", "break -> continue") in kinds
    assert ("return", "return negated") in kinds  # a bool function
    assert ("bool", "True -> False") in kinds
    assert ("number", "3 -> 4") in kinds
    for m in mutants:
        ast.parse(m.source)
        changed = [
            n for n, (a, b) in enumerate(zip(original, m.source.splitlines())) if a != b
        ]
        assert changed == [m.line - 1], m
    lines = {m.line for m in mutants}
    assert 3 not in lines  # logging
    assert 5 not in lines  # pragma: no cover
    assert 14 not in lines  # __repr__
    assert len({m.key for m in mutants}) == len(mutants)


def test_only_the_functions_asked_for(driver: ModuleType) -> None:
    mutants = driver.mutants_of("m.py", ["C.*"], SOURCE)
    assert {m.line for m in mutants} == {17}


def test_a_modules_own_tests_run_first(driver: ModuleType) -> None:
    """A budget spent on fast tests that merely build the object misses the
    module's own tests, which hold its edges."""
    mutant = driver.Mutant(
        path="twisted_socks5/rules/rule.py",
        line=3,
        end_line=3,
        kind="number",
        description="0 -> 1",
        source=b"",
    )
    cov = {
        "lines": {
            "twisted_socks5/rules/rule.py": {
                "3": [
                    "tests/test_fast.py::a",
                    "tests/test_rules_edges.py::slow",
                    "tests/test_server.py::b",
                ]
            }
        },
        "failed": [],
        "durations": {
            "tests/test_fast.py::a": 0.1,
            "tests/test_server.py::b": 0.2,
            "tests/test_rules_edges.py::slow": 5.0,
        },
    }
    assert driver.tests_for(mutant, cov, 1.0) == ["tests/test_rules_edges.py::slow"]
    assert driver.tests_for(mutant, cov, 0) == [
        "tests/test_rules_edges.py::slow",
        "tests/test_fast.py::a",
        "tests/test_server.py::b",
    ]


def test_test_files_a_target_names_count_as_its_own(driver: ModuleType) -> None:
    mutant = driver.Mutant(
        path="twisted_socks5/admission.py",
        line=3,
        end_line=3,
        kind="return",
        description="return negated",
        source=b"",
    )
    cov = {
        "lines": {
            "twisted_socks5/admission.py": {
                "3": ["tests/test_fast.py::a", "tests/test_auth.py::throttle"]
            }
        },
        "failed": [],
        "durations": {"tests/test_fast.py::a": 0.1, "tests/test_auth.py::throttle": 9},
    }
    assert driver.tests_for(mutant, cov, 1.0) == ["tests/test_fast.py::a"]
    own = ["tests/test_auth*.py"]
    assert driver.tests_for(mutant, cov, 1.0, own) == ["tests/test_auth.py::throttle"]
    assert driver.load_own_tests()["twisted_socks5/admission.py"]
