"""The layer rules of docs/architecture.md, checked on the source: imports point down only, and no
module reaches into another object's private attributes."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = ROOT / "gateway"
# The only modules outside gateway/http that may import it: they sit on top of everything.
ON_TOP = {"gateway.bootstrap", "gateway.cli", "gateway.__main__"}


def _modules() -> Iterator[tuple[str, Path, ast.Module]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, path, ast.parse(path.read_text(), str(path))


def _imports(module: str, tree: ast.Module) -> Iterator[tuple[int, str]]:
    """Every module name imported anywhere in the file (function-level imports included)."""
    package = module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base])
            yield node.lineno, base
            for alias in node.names:  # `from gateway import http` imports a module too
                yield node.lineno, f"{base}.{alias.name}"


def _is_http(name: str) -> bool:
    return name == "gateway.http" or name.startswith("gateway.http.")


def test_nothing_below_the_http_front_imports_it() -> None:
    offenders = [f"{path.relative_to(ROOT)}:{line} imports {target}"
                 for module, path, tree in _modules()
                 if not _is_http(module) and module not in ON_TOP
                 for line, target in _imports(module, tree) if _is_http(target)]
    assert not offenders, "layers import upward:\n" + "\n".join(offenders)


def test_the_checker_sees_an_upward_import() -> None:
    # The rule above must be able to fail: a module below http importing it is found, in any form.
    for source in ("import gateway.http.errors", "from gateway.http import appkeys",
                   "def f():\n    from gateway.http.errors import error_response"):
        tree = ast.parse(source)
        assert any(_is_http(t) for _, t in _imports("gateway.batch.jobs", tree)), source


# Private by convention, public in practice.
_STDLIB = {"os._exit", "sys._getframe"}


def _own_privates(tree: ast.Module) -> set[str]:
    """Private names a module defines itself (methods, and attributes set on self): classes of one module
    may share them, as a module-private protocol."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name.startswith("_"):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self" \
                and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)  # dataclass and slots fields
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def _private_reaches(tree: ast.Module) -> Iterator[tuple[int, str]]:
    """`other._name` where `other` is not self/cls and `_name` is not the module's own: reading or
    writing another module's private state."""
    own = _own_privates(tree)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        name = node.attr
        if not name.startswith("_") or name.startswith("__") or name in own:
            continue
        owner = node.value
        if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
            continue
        if isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and owner.func.id == "super":
            continue
        if ast.unparse(node) not in _STDLIB:
            yield node.lineno, ast.unparse(node)


def test_no_module_reaches_into_private_attributes_of_another_object() -> None:
    offenders = [f"{path.relative_to(ROOT)}:{line} {expr}"
                 for _, path, tree in _modules() for line, expr in _private_reaches(tree)]
    assert not offenders, "private attributes read from outside their object:\n" + "\n".join(offenders)


def test_tests_use_public_apis_not_private_attributes() -> None:
    offenders = [f"{path.relative_to(ROOT)}:{line} {expr}"
                 for directory in (ROOT / "tests", ROOT / "tests_vllm")
                 for path in sorted(p for p in directory.rglob("*.py") if "node_modules" not in p.parts)
                 for line, expr in _private_reaches(ast.parse(path.read_text(), str(path)))]
    assert not offenders, ("tests read private attributes (ask for a public snapshot or query instead):\n"
                           + "\n".join(offenders))


def test_the_private_checker_sees_a_reach() -> None:
    tree = ast.parse("def f(dispatcher):\n    return dispatcher._inflight\n")
    assert [expr for _, expr in _private_reaches(tree)] == ["dispatcher._inflight"]
    assert not list(_private_reaches(ast.parse("class A:\n    def f(self):\n        return self._x\n")))
    # A class of the same module may use a sibling's private attribute; another module may not.
    sibling = ("class A:\n    def __init__(self):\n        self._x = 1\n"
               "class B:\n    def f(self, a):\n        return a._x\n")
    assert not list(_private_reaches(ast.parse(sibling)))


# --- the tests themselves: shared fixtures and helpers live in conftest.py or helper modules
TEST_DIRS = (ROOT / "tests", ROOT / "tests_vllm")


def _test_module_imports(package: str, tree: ast.Module) -> Iterator[tuple[int, str]]:
    # `package.conftest` as the module name makes `from .x import y` resolve inside `package`.
    for line, target in _imports(f"{package}.conftest", tree):
        if target.split(".")[0] in {d.name for d in TEST_DIRS} and target.rsplit(".", 1)[-1].startswith("test_"):
            yield line, target


def test_no_test_module_imports_another_test_module() -> None:
    offenders = [f"{path.relative_to(ROOT)}:{line} imports {target}"
                 for directory in TEST_DIRS for path in sorted(directory.rglob("*.py"))
                 for line, target in _test_module_imports(directory.name, ast.parse(path.read_text(), str(path)))]
    assert not offenders, ("fixtures and helpers shared between test modules belong in conftest.py or a helper "
                           "module (tests/api_helpers.py, tests/runtimes.py, ...):\n" + "\n".join(offenders))


def test_the_test_import_checker_sees_each_form() -> None:
    for source in ("from tests.test_batch_api import submit", "from .test_files import sdk",
                   "from tests import test_supervisor_docker as d", "import tests.test_evals",
                   "def f():\n    from tests.test_x import y"):
        assert list(_test_module_imports("tests", ast.parse(source))), source
    for source in ("from tests.conftest import auth", "from tests.api_helpers import submit", "import pytest",
                   "from aiohttp.test_utils import TestClient"):
        assert not list(_test_module_imports("tests", ast.parse(source))), source


# --- one owner per Redis schema: only the owning store builds a schema's key names (and so reads or
# writes those keys); everyone else asks the store through its typed methods.
_SCHEMA_OWNERS = {
    "job queue": (re.compile(r"^job(_\w+)?$"), "gateway.batch.queue"),
    "OpenAI batch records": (re.compile(r"^openai_batch\w*$"), "gateway.openai_batches.records"),
    "eval runs": (re.compile(r"^eval_run\w*$"), "gateway.evals.runs"),
    "usage": (re.compile(r"^(key_usage\w*|usage_flushes)$"), "gateway.usage_store"),
}
# Where the names are defined, the client is made, and the stores are wired together.
_SCHEMA_NEUTRAL = {"gateway.redis_keys", "gateway.redis_client", "gateway.bootstrap"}


def _schema_key_uses(module: str, tree: ast.Module) -> Iterator[tuple[int, str, str]]:
    """`<...keys>.<name>` where `name` belongs to a schema that `module` does not own."""
    if module in _SCHEMA_NEUTRAL:
        return
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or "keys" not in ast.unparse(node.value).lower():
            continue
        for schema, (names, owner) in _SCHEMA_OWNERS.items():
            if names.match(node.attr) and module != owner:
                yield node.lineno, ast.unparse(node), schema


def test_only_the_owning_store_builds_a_schemas_keys() -> None:
    offenders = [f"{path.relative_to(ROOT)}:{line} {expr} (the {schema} belong to "
                 f"{_SCHEMA_OWNERS[schema][1]}: add a method there)"
                 for module, path, tree in _modules() for line, expr, schema in _schema_key_uses(module, tree)]
    assert not offenders, "Redis keys built outside their owning store:\n" + "\n".join(offenders)


def test_the_schema_checker_sees_each_form() -> None:
    for source in ("self.keys.job(job_id)", "keys.job_events", "self.keys.openai_batch_jobs(b)",
                   "app[REDIS_KEYS].eval_runs_active", "redis_keys.key_usage_day(k, d)",
                   "def f(self):\n    return self.keys.usage_flushes(k)"):
        assert list(_schema_key_uses("gateway.openai_batches.manager", ast.parse(source))), source
    assert not list(_schema_key_uses("gateway.batch.queue", ast.parse("self.keys.job(job_id)")))
    assert not list(_schema_key_uses("gateway.evals.runs", ast.parse("self.keys.eval_run(r)")))
    assert not list(_schema_key_uses("gateway.monitor", ast.parse("self.keys.fleet_nodes")))
    assert list(_schema_key_uses("gateway.evals.runs", ast.parse("self.keys.job(j)")))
