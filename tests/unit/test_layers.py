"""The package stays layered: few function-local imports of our own modules (each with a reason),
one way to become a Ray driver, one home for storage paths, and a light ``modelfleet --help``.
(The layer contracts themselves are `.importlinter`, run by `make test` before pytest.)"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "modelfleet"
MAX_LOCAL_IMPORTS = 15


def _sources() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def _own_module(node: ast.AST) -> str | None:
    """The modelfleet module an import statement or ``importlib.import_module`` call loads."""
    if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("modelfleet"):
        return node.module
    if isinstance(node, ast.ImportFrom) and node.level > 0:
        return f"(relative) {node.module}"
    if isinstance(node, ast.Import):
        own = [a.name for a in node.names if a.name.split(".")[0] == "modelfleet"]
        return own[0] if own else None
    if (
        isinstance(node, ast.Call)
        and getattr(node.func, "attr", getattr(node.func, "id", "")) in ("import_module", "__import__")
        and node.args
    ):
        arg = node.args[0]
        text = arg.value if isinstance(arg, ast.Constant) else ast.unparse(arg)
        return text if "modelfleet" in str(text) else None
    return None


def local_imports() -> list[tuple[Path, int, str]]:
    found = []
    for path in _sources():
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    mod = _own_module(node)
                    if mod:
                        found.append((path, node.lineno, mod))
    return found


def test_function_local_imports_of_our_modules_are_few_and_explained():
    found = local_imports()
    where = "\n".join(f"{p.relative_to(ROOT)}:{n}: {m}" for p, n, m in found)
    assert len(found) <= MAX_LOCAL_IMPORTS, f"{len(found)} function-local imports of modelfleet:\n{where}"
    for path, line, mod in found:
        lines = path.read_text().splitlines()
        context = " ".join(lines[max(0, line - 3) : line])  # the statement's line and the two above
        assert "#" in context, f"{path.relative_to(ROOT)}:{line}: local import of {mod} needs a one-line reason"


def test_no_relative_imports_anywhere():
    assert not [x for x in local_imports() if x[2].startswith("(relative)")]


def test_the_counter_sees_every_form_of_import(tmp_path):
    """The count above cannot be fooled by spelling: from, import and importlib all count."""
    code = (
        "import importlib\n"
        "def a():\n    from modelfleet.errors import ConfigError\n"
        "def b():\n    import modelfleet.storage\n"
        "def c():\n    return importlib.import_module('modelfleet.metrics')\n"
        "def d():\n    return importlib.import_module(f'modelfleet.cli.{x}')\n"
        "def e():\n    import json\n"
    )
    mods = [_own_module(n) for fn in ast.walk(ast.parse(code)) if isinstance(fn, ast.FunctionDef) for n in ast.walk(fn)]
    assert [m for m in mods if m] == [
        "modelfleet.errors",
        "modelfleet.storage",
        "modelfleet.metrics",
        "f'modelfleet.cli.{x}'",
    ]


def test_only_the_cluster_package_starts_or_joins_ray():
    offenders = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in _sources()
        if "cluster" not in p.parts
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if re.search(r"\bray\.init\(", line)
    ]
    assert not offenders, f"ray.init outside modelfleet.cluster (use cluster.connect): {offenders}"


def test_storage_layout_is_spelled_only_in_storage_py():
    """Path names under storage.path and the remote-URI test live in storage.py alone."""
    patterns = [r'"://"', r'"(runs|evaluations|kfold|LATEST)"', r'\}/(runs|models|evaluations|kfold)["/]']
    offenders = [
        f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
        for p in _sources()
        if p.name != "storage.py"
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if any(re.search(pat, line) for pat in patterns) and not line.strip().startswith(("#", '"""'))
    ]
    assert not offenders, "\n".join(offenders)


def test_errors_and_storage_import_nothing_of_ours():
    for leaf in ("errors.py", "storage.py", "metrics.py", "config/schema.py"):
        tree = ast.parse((SRC / leaf).read_text())
        own = {_own_module(n) for n in ast.walk(tree)} - {None}
        allowed = (
            {"modelfleet.errors", "modelfleet.config.coerce", "modelfleet.config.serve"}
            if leaf == "config/schema.py"
            else {"modelfleet.errors"}  # the floor: storage raises StorageError from it
            if leaf == "storage.py"
            else set()
        )
        assert own <= allowed, f"{leaf} imports {own - allowed}"


def test_help_is_light():
    """`modelfleet --help` loads neither torch nor Ray (each command imports its body when chosen)."""
    code = (
        "import sys, contextlib, io\nfrom modelfleet.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    try:\n        main(['--help'])\n    except SystemExit:\n        pass\n"
        "assert 'prepare' in out.getvalue(), out.getvalue()\n"
        "heavy = sorted(m for m in ('torch', 'ray', 'deepspeed', 'transformers') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"modelfleet --help imported {r.stdout.strip()}"
