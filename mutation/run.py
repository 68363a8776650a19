"""
Mutation testing of the security core (``tox -e mutation``).

mutmut 3 runs pytest several times in one process (statistics, clean run,
forced failure, then forks of that process for every mutant); pytest-twisted's
reactor cannot be started twice in a process, so all but the first run fail
with ``ReactorNotRestartable`` and the results mean nothing.  This driver
runs each mutant in a fresh pytest process instead:

1. copy the checkout (package, plugin, tests and the files tests read) to
   one scratch directory per job, put it first on ``PYTHONPATH`` (so neither
   an installed package nor a ``twistd`` subprocess sees anything else);
2. run the whole suite once under coverage, one context per test, to learn
   which tests execute each line of the target functions;
3. make mutants of the functions listed in ``mutation/targets.ini`` (one
   change each, spliced into the source at the node's position);
4. for each mutant, rewrite the module in a job's copy and run only the
   tests covering the mutated lines (the module's own test files first, then
   the fastest; ``-x``, with a timeout);
5. print the score per module and the survivors, and write them to
   ``mutation/report.txt``.

Killed mutants are cached (``mutation/.cache``) while their module is
unchanged; survivors are rerun whenever the package or the tests changed.
"""

from __future__ import annotations

import argparse
import ast
import configparser
import contextlib
import copy
import fnmatch
import hashlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple

ROOT = Path(__file__).resolve().parent.parent
HERE = ROOT / "mutation"
CACHE = HERE / ".cache"
#: What a test run needs from the checkout.
COPIED = (
    "twisted_socks5",
    "twisted",
    "mutation",
    "tests",
    "docs",
    "stress",
    "bench",
    "README.md",
    "tox.ini",
    "setup.cfg",
    "pyproject.toml",
)
#: Calls whose arguments are not mutated and whose removal is not a mutant.
LOG_METHODS = {"debug", "info", "warn", "warning", "error", "failure", "critical"}
SKIPPED_FUNCTIONS = {"__repr__", "__str__"}
PYTEST = ["-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--tb=no"]


# ----------------------------------------------------------------------
# Mutants


@dataclass
class Mutant:
    path: str  # relative to the checkout
    line: int
    end_line: int
    kind: str
    description: str
    source: bytes  # the whole mutated module

    @property
    def key(self) -> str:
        digest = hashlib.sha256(self.path.encode() + b"\0" + self.source)
        return digest.hexdigest()[:24]


def _is_log_call(node: ast.AST) -> bool:
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    if isinstance(func, ast.Attribute):
        owner = ast.unparse(func.value)
        return func.attr in LOG_METHODS and "log" in owner.lower()
    return False


_NEGATED_OPS: Dict[type, Tuple[type, ...]] = {
    ast.Eq: (ast.NotEq,),
    ast.NotEq: (ast.Eq,),
    ast.Lt: (ast.GtE, ast.LtE),
    ast.LtE: (ast.Gt, ast.Lt),
    ast.Gt: (ast.LtE, ast.GtE),
    ast.GtE: (ast.Lt, ast.Gt),
    ast.Is: (ast.IsNot,),
    ast.IsNot: (ast.Is,),
    ast.In: (ast.NotIn,),
    ast.NotIn: (ast.In,),
}
_BINOPS: Dict[type, type] = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.BitAnd: ast.BitOr,
    ast.BitOr: ast.BitAnd,
    ast.LShift: ast.RShift,
    ast.RShift: ast.LShift,
    ast.Mult: ast.FloorDiv,
}
_OP_TEXT = {
    ast.Eq: "==",
    ast.NotEq: "!=",
    ast.Lt: "<",
    ast.LtE: "<=",
    ast.Gt: ">",
    ast.GtE: ">=",
    ast.Is: "is",
    ast.IsNot: "is not",
    ast.In: "in",
    ast.NotIn: "not in",
    ast.Add: "+",
    ast.Sub: "-",
    ast.BitAnd: "&",
    ast.BitOr: "|",
    ast.LShift: "<<",
    ast.RShift: ">>",
    ast.Mult: "*",
    ast.FloorDiv: "//",
}


def _changes(node: ast.AST, returns_bool: bool) -> Iterator[Tuple[str, str, str]]:
    """(kind, description, replacement text) for one node."""

    def variant(change: Callable[[Any], None]) -> str:
        new = copy.deepcopy(node)
        change(new)
        return ast.unparse(new)

    if isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            for other in _NEGATED_OPS.get(type(op), ()):

                def set_op(n: Any, i: int = i, other: type = other) -> None:
                    n.ops[i] = other()

                yield (
                    "compare",
                    f"{_OP_TEXT[type(op)]} -> {_OP_TEXT[other]}",
                    f"({variant(set_op)})",
                )
    elif isinstance(node, ast.BoolOp):
        other = ast.Or if isinstance(node.op, ast.And) else ast.And
        before, after = ("and", "or") if other is ast.Or else ("or", "and")

        def set_boolop(n: Any) -> None:
            n.op = other()

        yield "boolop", f"{before} -> {after}", f"({variant(set_boolop)})"
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        yield "not", "removed not", f"({ast.unparse(node.operand)})"
    elif isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in _BINOPS:
        new_op = _BINOPS[type(node.op)]

        def set_binop(n: Any) -> None:
            n.op = new_op()

        text = variant(set_binop)
        if isinstance(node, ast.BinOp):
            before, after, text = _OP_TEXT[type(node.op)], _OP_TEXT[new_op], f"({text})"
        else:
            before, after = f"{_OP_TEXT[type(node.op)]}=", f"{_OP_TEXT[new_op]}="
        yield "arith", f"{before} -> {after}", text
    elif isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, bool):
            yield "bool", f"{value} -> {not value}", repr(not value)
        elif isinstance(value, int):
            yield "number", f"{value} -> {value + 1}", repr(value + 1)
            yield "number", f"{value} -> {value - 1}", f"({value - 1})"
    elif isinstance(node, (ast.If, ast.While)):
        test = node.test
        if not isinstance(test, (ast.Compare, ast.BoolOp, ast.UnaryOp)):
            yield "condition", "condition negated", ""
    elif isinstance(node, ast.Return) and node.value is not None:
        is_none = isinstance(node.value, ast.Constant) and node.value.value is None
        if returns_bool:
            yield "return", "return negated", ""
        elif not is_none:
            yield "return", "return None", "return None"
    elif isinstance(node, ast.Raise):
        yield "statement", "raise removed", "pass"
    elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
        yield "statement", "call removed", "pass"
    elif isinstance(node, ast.Break):
        yield "loop", "break -> continue", "continue"
    elif isinstance(node, ast.Continue):
        yield "loop", "continue -> break", "break"


def _children(node: ast.AST) -> Iterator[ast.AST]:
    """The nodes worth mutating below ``node``: no annotations, no docstrings."""
    for name, value in ast.iter_fields(node):
        if name in ("annotation", "returns", "type_comment", "decorator_list"):
            continue
        if name == "args" and isinstance(node, (ast.FunctionDef, ast.Lambda)):
            continue
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            if not isinstance(item, ast.AST):
                continue
            if (
                name == "body"
                and i == 0
                and isinstance(item, ast.Expr)
                and isinstance(item.value, ast.Constant)
                and isinstance(item.value.value, str)
            ):
                continue  # docstring
            yield item


def _walk(node: ast.AST, lines: List[bytes]) -> Iterator[ast.AST]:
    for child in _children(node):
        if _is_log_call(child) or (
            isinstance(child, ast.Expr) and _is_log_call(child.value)
        ):
            continue
        if isinstance(child, ast.JoinedStr):
            continue
        if (
            isinstance(child, (ast.stmt, ast.excepthandler))
            and b"pragma: no cover" in lines[child.lineno - 1]
        ):
            continue  # what the suite deliberately leaves alone
        yield child
        yield from _walk(child, lines)


def _functions(tree: ast.Module, patterns: List[str]) -> Iterator[ast.FunctionDef]:
    def matches(name: str, short: str) -> bool:
        if short in SKIPPED_FUNCTIONS:
            return False
        return any(fnmatch.fnmatchcase(name, p) for p in patterns)

    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and matches(node.name, node.name):
            yield node
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                qualified = f"{node.name}.{getattr(item, 'name', '')}"
                if isinstance(item, ast.FunctionDef) and matches(qualified, item.name):
                    yield item


def _returns_bool(func: ast.FunctionDef) -> bool:
    return isinstance(func.returns, ast.Name) and func.returns.id == "bool"


def _splice(
    lines: List[bytes], node: ast.AST, replace: Callable[[bytes], bytes]
) -> bytes:
    """The source with ``node``'s span (byte offsets) replaced."""
    first, last = node.lineno - 1, node.end_lineno - 1  # type: ignore[attr-defined]
    start, end = node.col_offset, node.end_col_offset  # type: ignore[attr-defined]
    head = lines[first][:start]
    tail = lines[last][end:]
    segment = b"".join(lines[first : last + 1])
    segment = segment[start : len(segment) - len(lines[last]) + end]
    return b"".join(
        lines[:first] + [head + replace(segment) + tail] + lines[last + 1 :]
    )


def mutants_of(path: str, patterns: List[str], source: bytes) -> List[Mutant]:
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    original = ast.dump(tree)
    found: List[Mutant] = []
    for func in _functions(tree, patterns):
        returns_bool = _returns_bool(func)
        for node in _walk(func, lines):
            for kind, description, text in _changes(node, returns_bool):
                if kind == "condition":
                    assert isinstance(node, (ast.If, ast.While))  # noqa: S101
                    test = node.test

                    def negate(seg: bytes) -> bytes:
                        return b"not (" + seg + b")"

                    new = _splice(lines, test, negate)
                elif kind == "return" and text == "":
                    assert isinstance(node, ast.Return)  # noqa: S101
                    value = node.value
                    assert value is not None  # noqa: S101
                    new = _splice(lines, value, lambda seg: b"not (" + seg + b")")
                else:
                    replacement = text.encode()
                    new = _splice(lines, node, lambda seg, r=replacement: r)
                try:
                    mutated = ast.parse(new)
                except SyntaxError:
                    continue
                if ast.dump(mutated) == original:
                    continue
                found.append(
                    Mutant(
                        path,
                        node.lineno,
                        node.end_lineno or node.lineno,
                        kind,
                        description,
                        new,
                    )
                )
    return found


# ----------------------------------------------------------------------
# The copies and the coverage map


def tree_hash() -> str:
    digest = hashlib.sha256()
    for top in ("twisted_socks5", "twisted", "tests"):
        for path in sorted((ROOT / top).rglob("*.py")):
            digest.update(str(path.relative_to(ROOT)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:24]


def make_copy(destination: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "_build", "dropin.cache")
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, destination / name, ignore=ignore)
        elif source.exists():
            shutil.copy2(source, destination / name)


def environment(copy_dir: Path) -> Dict[str, str]:
    env = dict(os.environ)
    # The copy first: neither an installed twisted-socks5 nor a twistd
    # subprocess started by a test may see anything else.
    env["PYTHONPATH"] = os.pathsep.join(
        [str(copy_dir)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    env.pop("MUTANT_UNDER_TEST", None)
    env["PYTHONHASHSEED"] = "0"
    return env


class _Contexts:
    """pytest plugin: one coverage context per test; records outcomes."""

    def __init__(self, cov: Any) -> None:
        self.cov = cov
        self.durations: Dict[str, float] = {}
        self.failed: Set[str] = set()

    def pytest_runtest_setup(self, item: Any) -> None:
        self.cov.switch_context(item.nodeid)

    def pytest_runtest_logreport(self, report: Any) -> None:
        self.durations[report.nodeid] = (
            self.durations.get(report.nodeid, 0.0) + report.duration
        )
        if report.failed:
            self.failed.add(report.nodeid)

    def pytest_runtest_logfinish(self, nodeid: str, location: Any) -> None:
        self.cov.switch_context("")


def collect(output: str, targets: List[str], tests: List[str]) -> int:
    """Run inside a copy: the whole suite under coverage, one context a test."""
    import coverage
    import pytest

    cov = coverage.Coverage(
        data_file=None,
        include=[str(Path(t).resolve()) for t in targets],
        concurrency=["greenlet", "thread"],
    )
    cov.start()
    plugin = _Contexts(cov)
    code = pytest.main(
        ["-q", "-p", "no:cacheprovider", "--tb=line", *tests], plugins=[plugin]
    )
    cov.stop()
    data = cov.get_data()
    lines: Dict[str, Dict[str, List[str]]] = {}
    here = Path.cwd().resolve()
    for measured in data.measured_files():
        relative = str(Path(measured).resolve().relative_to(here))
        by_line = data.contexts_by_lineno(measured)
        lines[relative] = {
            str(n): sorted(c for c in contexts if c) for n, contexts in by_line.items()
        }
    Path(output).write_text(
        json.dumps(
            {
                "lines": lines,
                "durations": plugin.durations,
                "failed": sorted(plugin.failed),
                "exit": int(code),
            }
        )
    )
    return 0


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """End a test run's session: pytest and any server a test left running."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def coverage_map(
    base: Path, targets: List[str], tests: List[str], fresh: bool
) -> Dict[str, Any]:
    selection = hashlib.sha256("\0".join(tests).encode()).hexdigest()[:8]
    cached = CACHE / f"coverage-{tree_hash()}-{selection}.json"
    if cached.exists() and not fresh:
        return json.loads(cached.read_text())  # type: ignore[no-any-return]
    print("collecting per-test coverage (the whole suite, once) ...", flush=True)
    started = time.monotonic()
    out = base / "coverage.json"
    process = subprocess.Popen(  # noqa: S603 - our own interpreter and script
        [sys.executable, str(Path(__file__).resolve()), "--_collect", str(out)]
        + ["--_targets", ",".join(targets), "--tests", *tests],
        cwd=base,
        env=environment(base),
        start_new_session=True,
    )
    try:
        if process.wait():
            raise SystemExit("the test suite could not run under coverage")
    finally:
        _kill_group(process)
    data: Dict[str, Any] = json.loads(out.read_text())
    print(
        f"coverage collected in {time.monotonic() - started:.0f}s "
        f"({len(data['durations'])} tests, {len(data['failed'])} failing)",
        flush=True,
    )
    CACHE.mkdir(exist_ok=True)
    for old in CACHE.glob("coverage-*.json"):
        old.unlink()
    cached.write_text(json.dumps(data))
    return data


# ----------------------------------------------------------------------
# Running mutants


@dataclass
class Result:
    mutant: Mutant
    status: str  # killed, timeout, survived, uncovered, error
    seconds: float
    tests: int


def _names_of(path: str) -> Tuple[str, ...]:
    """What a module's own tests are named after: ``rules/rule.py`` gives
    ``rule`` and ``rules``; ``htpasswd.py`` gives ``htpasswd``."""
    parts = Path(path).with_suffix("").parts[1:]  # without "twisted_socks5"
    return tuple(p for p in reversed(parts) if p != "__init__")


def _is_own_test(test: str, names: Tuple[str, ...], globs: Sequence[str] = ()) -> bool:
    path = test.split("::", 1)[0]
    stem = Path(path).stem
    return any(name in stem for name in names) or any(
        fnmatch.fnmatch(path, pattern) for pattern in globs
    )


def tests_for(
    mutant: Mutant, cov: Dict[str, Any], budget: float, own: Sequence[str] = ()
) -> List[str]:
    """
    The tests that run the mutated lines, as many as fit in ``budget``
    seconds (0: all): a line every connection runs is reached by hundreds of
    tests, and a survivor would run them all.  The module's own test files
    (named after it) come first, then the fastest: a constructor's edge is
    held by its module's tests, not by the hundred fast tests that merely
    build one.
    """
    by_line = cov["lines"].get(mutant.path, {})
    failing = set(cov["failed"])
    chosen: Set[str] = set()
    for line in range(mutant.line, mutant.end_line + 1):
        chosen.update(by_line.get(str(line), ()))
    durations = cov["durations"]
    names = _names_of(mutant.path)
    ordered = sorted(
        chosen - failing,
        key=lambda t: (not _is_own_test(t, names, own), durations.get(t, 0.0), t),
    )
    if not budget:
        return ordered
    taken: List[str] = []
    spent = 0.0
    for test in ordered:
        spent += durations.get(test, 0.0)
        if taken and spent > budget:
            break
        taken.append(test)
    return taken


def run_mutant(
    mutant: Mutant, tests: List[str], copy_dir: Path, cov: Dict[str, Any]
) -> Result:
    started = time.monotonic()
    if not tests:
        return Result(mutant, "uncovered", 0.0, 0)
    target = copy_dir / mutant.path
    original = target.read_bytes()
    budget = sum(cov["durations"].get(t, 1.0) for t in tests)
    timeout = 20 + 2 * budget  # an endless loop is a kill, found late
    args = copy_dir / "mutant-tests.txt"
    args.write_text("\n".join(tests) + "\n")
    try:
        target.write_bytes(mutant.source)
        process = subprocess.Popen(  # noqa: S603 - our interpreter, our tests
            [sys.executable, *PYTEST, f"@{args}"],
            cwd=copy_dir,
            env=dict(environment(copy_dir), PYTHONDONTWRITEBYTECODE="1"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return Result(mutant, "timeout", time.monotonic() - started, len(tests))
        finally:
            _kill_group(process)
    finally:
        target.write_bytes(original)
    # 1: a test failed; 2, 3 and signals: the run broke (an import error,
    # a crash in a plugin); 4 and 5: the selection itself was wrong.
    status = "survived" if code == 0 else "error" if code in (4, 5) else "killed"
    return Result(mutant, status, time.monotonic() - started, len(tests))


def prepare_copy(copy_dir: Path, targets: List[str]) -> None:
    """Compile everything but the mutated modules, so each run starts faster."""
    make_copy(copy_dir)
    env = environment(copy_dir)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    subprocess.run(  # noqa: S603
        [sys.executable, *PYTEST, "--collect-only"],
        cwd=copy_dir,
        env=env,
        stdout=subprocess.DEVNULL,
        check=False,
    )
    for target in targets:
        pycache = (copy_dir / target).parent / "__pycache__"
        for pyc in pycache.glob(Path(target).stem + ".*.pyc"):
            pyc.unlink()


def check_the_copy_runs(
    copy_dir: Path, targets: List[str], cov: Dict[str, Any]
) -> None:
    """
    Break each target module in the copy: its fastest test must fail, or
    the tests import the package from somewhere else (an installed copy)
    and every mutant would survive.
    """
    for target in targets:
        broken = Mutant(target, 0, 0, "check", "module broken", b"raise ImportError\n")
        covering = {t for tests in cov["lines"].get(target, {}).values() for t in tests}
        tests = sorted(covering, key=lambda t: cov["durations"].get(t, 0.0))[:1]
        # A module that cannot import fails collection (pytest exits 2 or 4).
        if tests and run_mutant(broken, tests, copy_dir, cov).status == "survived":
            raise SystemExit(f"the tests do not run the copy of {target}: {tests[0]}")


# ----------------------------------------------------------------------
# Selection, cache, report


def changed_lines(rev: str, path: str) -> Set[int]:
    diff = subprocess.run(  # noqa: S603
        ["git", "diff", "-U0", rev, "--", path],  # noqa: S607
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    lines: Set[int] = set()
    for line in diff.splitlines():
        if line.startswith("@@"):
            new = line.split()[2]  # +start[,count]
            start, _, count = new[1:].partition(",")
            n = int(count) if count else 1
            lines.update(range(int(start), int(start) + n))
    return lines


def load_targets() -> Dict[str, List[str]]:
    parser = configparser.ConfigParser()
    parser.read(HERE / "targets.ini")
    return {
        section: parser[section]["functions"].split() for section in parser.sections()
    }


def load_own_tests() -> Dict[str, List[str]]:
    """Each module's ``tests`` globs: the files that hold its behaviour when
    they are not named after it (run first, as its own)."""
    parser = configparser.ConfigParser()
    parser.read(HERE / "targets.ini")
    return {
        section: parser[section].get("tests", "").split()
        for section in parser.sections()
    }


def load_cache() -> Dict[str, Any]:
    path = CACHE / "results.json"
    return json.loads(path.read_text()) if path.exists() else {}  # type: ignore[no-any-return]


def save_cache(cache: Dict[str, Any]) -> None:
    CACHE.mkdir(exist_ok=True)
    (CACHE / "results.json").write_text(json.dumps(cache, indent=0, sort_keys=True))


def report(results: List[Result], seconds: float, path: Path) -> str:
    out: List[str] = []
    modules = sorted({r.mutant.path for r in results})
    total_killed = total_scored = 0
    out.append(f"{'module':34} {'mutants':>7} {'killed':>7} {'survived':>8} score")
    for module in modules:
        rs = [r for r in results if r.mutant.path == module]
        killed = sum(r.status in ("killed", "timeout") for r in rs)
        scored = sum(r.status != "error" for r in rs)
        total_killed += killed
        total_scored += scored
        score = 100.0 * killed / scored if scored else 100.0
        out.append(
            f"{module:34} {len(rs):7} {killed:7} {scored - killed:8} {score:5.1f} %"
        )
    overall = 100.0 * total_killed / total_scored if total_scored else 100.0
    errors = sum(r.status == "error" for r in results)
    out.append(
        f"{'overall':34} {len(results):7} {total_killed:7} "
        f"{total_scored - total_killed:8} {overall:5.1f} %"
    )
    out.append(
        f"({errors} unscored: the tests could not run; {seconds:.0f}s wall time)"
    )
    survivors = [r for r in results if r.status in ("survived", "uncovered")]
    out.append("")
    out.append(f"survivors ({len(survivors)}):")
    sources: Dict[str, List[str]] = {}
    for r in sorted(survivors, key=lambda r: (r.mutant.path, r.mutant.line)):
        m = r.mutant
        lines = sources.setdefault(
            m.path, (ROOT / m.path).read_text(encoding="utf-8").splitlines()
        )
        note = " (no test runs this line)" if r.status == "uncovered" else ""
        out.append(f"{m.path}:{m.line}: [{m.kind}] {m.description}{note}")
        out.append(f"    {lines[m.line - 1].strip()}")
    text = "\n".join(out) + "\n"
    path.write_text(text)
    return text


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--module",
        action="append",
        default=[],
        metavar="NAME",
        help="only this module (auth, rules, ...); may be repeated",
    )
    parser.add_argument(
        "--since",
        metavar="REV",
        help="only mutants on lines changed since this git revision",
    )
    parser.add_argument("--max", type=int, metavar="N", help="at most N mutants")
    parser.add_argument("--jobs", type=int, default=2, help="parallel runs (2)")
    parser.add_argument(
        "--budget",
        type=float,
        default=20.0,
        metavar="S",
        help="run a mutant's fastest covering tests up to S seconds (20; 0: all)",
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="ignore the cache: recollect coverage, rerun every mutant",
    )
    parser.add_argument(
        "--list", action="store_true", help="list the mutants, run none"
    )
    parser.add_argument("--report", default=str(HERE / "report.txt"), metavar="FILE")
    parser.add_argument("--_collect", help=argparse.SUPPRESS)
    parser.add_argument("--_targets", default="", help=argparse.SUPPRESS)
    parser.add_argument(
        "--tests",
        nargs="*",
        default=[],
        metavar="PATH",
        help="learn coverage from these tests only (default: the whole suite)",
    )
    options = parser.parse_args(argv)
    if options._collect:
        return collect(options._collect, options._targets.split(","), options.tests)

    started = time.monotonic()
    # Stopped (kill PID): leave no test process and no scratch copy behind.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    targets = load_targets()
    own_tests = load_own_tests()
    all_targets = list(targets)
    if options.module:
        wanted = {m.removesuffix(".py") for m in options.module}
        targets = {p: f for p, f in targets.items() if Path(p).stem in wanted}
    mutants: List[Mutant] = []
    for path, patterns in targets.items():
        found = mutants_of(path, patterns, (ROOT / path).read_bytes())
        if options.since:
            changed = changed_lines(options.since, path)
            found = [m for m in found if changed & set(range(m.line, m.end_line + 1))]
        mutants.extend(found)
    if options.max is not None:
        mutants = mutants[: options.max]
    if options.list:
        for m in mutants:
            print(f"{m.path}:{m.line}: [{m.kind}] {m.description}")
        print(f"{len(mutants)} mutants")
        return 0
    print(f"{len(mutants)} mutants in {len(targets)} modules", flush=True)

    tree = tree_hash()
    cache = {} if options.fresh else load_cache()
    scratch = Path(tempfile.mkdtemp(prefix="socks5-mutation-"))
    try:
        base = scratch / "job0"
        make_copy(base)
        cov = coverage_map(base, all_targets, options.tests, options.fresh)
        shutil.rmtree(base)
        jobs = max(1, options.jobs)
        copies: queue.Queue[Path] = queue.Queue()
        for i in range(jobs):
            copy_dir = scratch / f"job{i}"
            prepare_copy(copy_dir, all_targets)
            copies.put(copy_dir)
        check_the_copy_runs(scratch / "job0", all_targets, cov)
        results: List[Result] = []
        lock = threading.Lock()

        def one(mutant: Mutant) -> Result:
            entry = cache.get(mutant.key)
            if entry and (
                entry["status"] in ("killed", "timeout") or entry["tree"] == tree
            ):
                result = Result(mutant, entry["status"], 0.0, entry["tests"])
            else:
                copy_dir = copies.get()
                try:
                    tests = tests_for(
                        mutant, cov, options.budget, own_tests.get(mutant.path, ())
                    )
                    result = run_mutant(mutant, tests, copy_dir, cov)
                finally:
                    copies.put(copy_dir)
            with lock:
                results.append(result)
                cache[mutant.key] = {
                    "status": result.status,
                    "tree": tree,
                    "tests": result.tests,
                }
                done = len(results)
                if result.status in ("survived", "uncovered", "error"):
                    m = result.mutant
                    print(
                        f"[{done}/{len(mutants)}] {result.status}: "
                        f"{m.path}:{m.line} {m.description}",
                        flush=True,
                    )
                elif done % 25 == 0:
                    print(f"[{done}/{len(mutants)}]", flush=True)
                    save_cache(cache)
            return result

        pool = ThreadPoolExecutor(max_workers=jobs)
        try:
            list(pool.map(one, mutants))
        finally:  # stopped: finish the runs under way, start no other
            pool.shutdown(wait=True, cancel_futures=True)
        save_cache(cache)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    order = {id(m): i for i, m in enumerate(mutants)}
    results.sort(key=lambda r: order[id(r.mutant)])
    print()
    print(report(results, time.monotonic() - started, Path(options.report)), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
