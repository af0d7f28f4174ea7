"""The layers of the package, checked on its source: which module may import which.

    models/ (pgexport.models)      stdlib, torch, numpy, safetensors, pgexport.errors, pgexport.vocab
    torch-free core                errors, vocab, files, bundled, machine, runtime.*, processing.*, engine.*:
                                   no torch, models, exporters, eager, train, bench, batch, serve, api, cli
    pgexport.exporters             no api, cli, eager, train, bench
    pgexport.bench                 imported by pgexport.cli only

plus: no `from pgexport.x import _private` (or `module._private`) across modules, and the base
dependencies (numpy, onnx, onnxruntime) are imported at module top level, never inside a function.

`check_layers` reads the source with `ast` (every import statement, at any depth, absolute or
relative, and `importlib.import_module("literal")`), so it needs none of the packages installed.
"""

from __future__ import annotations

import ast
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Source folder (relative to the repository root) -> the package it is installed as; the same
# mapping as `package-dir` in pyproject.toml.
PACKAGE_DIRS = {"pgexport": "pgexport", "models": "pgexport.models", "exporters": "pgexport.exporters"}

MODELS_MAY_IMPORT = ("torch", "numpy", "safetensors", "pgexport.errors", "pgexport.vocab", "pgexport.models")
CORE = ("pgexport.errors", "pgexport.vocab", "pgexport.files", "pgexport.bundled", "pgexport.machine",
        "pgexport.runtime", "pgexport.processing", "pgexport.engine")
APP = ("pgexport.eager", "pgexport.train", "pgexport.bench", "pgexport.batch", "pgexport.serve", "pgexport.api",
       "pgexport.cli")
CORE_MUST_NOT_IMPORT = ("torch", "pgexport.models", "pgexport.exporters", *APP)
EXPORTERS_MUST_NOT_IMPORT = APP
TOP_LEVEL_ONLY = ("numpy", "onnx", "onnxruntime")


@dataclass(frozen=True)
class Import:
    module: str      # the importing module, e.g. "pgexport.runtime.session"
    path: str        # its source file, relative to the root
    line: int
    target: str      # the imported module, e.g. "pgexport.models.config"
    name: str | None  # for `from target import name`: the name
    in_function: bool


def under(module: str, prefixes) -> bool:
    """Whether `module` is one of `prefixes` or inside one of them."""
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def module_files(root: Path, package_dirs: dict[str, str]) -> dict[str, Path]:
    """Module name -> source file for every .py file under the mapped folders."""
    found = {}
    for folder, package in package_dirs.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = list(path.relative_to(root / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def _resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, target] if target else base)


def imports_of(module: str, path: Path, root: Path, known: set[str]) -> list[Import]:
    """Every import in one module's source, with whether it sits inside a function."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    rel = path.relative_to(root).as_posix()
    is_package = path.name == "__init__.py"
    found: list[Import] = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    found.append(Import(module, rel, child.lineno, alias.name, None, inside))
            elif isinstance(child, ast.ImportFrom):
                target = child.module or ""
                if child.level:
                    target = _resolve_relative(module, is_package, child.level, child.module)
                for alias in child.names:
                    # `from pgexport import errors` imports the module pgexport.errors.
                    sub = f"{target}.{alias.name}"
                    if sub in known:
                        found.append(Import(module, rel, child.lineno, sub, None, inside))
                    else:
                        found.append(Import(module, rel, child.lineno, target, alias.name, inside))
            elif (isinstance(child, ast.Call) and isinstance(child.func, (ast.Attribute, ast.Name))
                  and (child.func.attr if isinstance(child.func, ast.Attribute) else child.func.id)
                  in ("import_module", "__import__")
                  and child.args and isinstance(child.args[0], ast.Constant)
                  and isinstance(child.args[0].value, str) and not child.args[0].value.startswith(".")):
                found.append(Import(module, rel, child.lineno, child.args[0].value, None, inside))
            visit(child, inside)

    visit(tree, False)
    return found


def private_attribute_uses(module: str, path: Path, root: Path, known: set[str]) -> list[tuple[int, str, str]]:
    """`alias._name`, and `setattr/getattr/delattr(alias, "_name", ...)` (monkeypatch's too), where
    `alias` is bound to another pgexport module by an import: (line, that module, name)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname and a.name in known:
                    aliases[a.asname] = a.name
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                if f"{node.module}.{a.name}" in known:
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    aliases = {k: v for k, v in aliases.items() if v != module}
    uses = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and is_private(node.attr)):
            uses.append((node.lineno, aliases[node.value.id], node.attr))
        elif isinstance(node, ast.Call) and len(node.args) >= 2:
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            target, attr = node.args[0], node.args[1]
            if (name in ("setattr", "getattr", "delattr") and isinstance(target, ast.Name) and target.id in aliases
                    and isinstance(attr, ast.Constant) and isinstance(attr.value, str) and is_private(attr.value)):
                uses.append((node.lineno, aliases[target.id], attr.value))
    return uses


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def top_package(name: str) -> str:
    return name.split(".")[0]


def is_stdlib(name: str) -> bool:
    return top_package(name) in sys.stdlib_module_names or top_package(name) == "__future__"


def check_layers(root: Path, package_dirs: dict[str, str]) -> list[str]:
    """The layer rules' violations under `root`, one line each: "path:line: module ... (rule)"."""
    files = module_files(root, package_dirs)
    known = set(files)
    problems = []

    def report(imp: Import, rule: str):
        what = f"{imp.target}.{imp.name}" if imp.name else imp.target
        problems.append(f"{imp.path}:{imp.line}: {imp.module} imports {what} ({rule})")

    for module, path in files.items():
        for imp in imports_of(module, path, root, known):
            t = imp.target
            if under(module, ["pgexport.models"]) and not (is_stdlib(t) or under(t, MODELS_MAY_IMPORT)):
                report(imp, "models import only stdlib, torch, numpy, safetensors, pgexport.errors/vocab/models")
            if under(module, CORE) and under(t, CORE_MUST_NOT_IMPORT):
                report(imp, "the torch-free core imports no torch, models, exporters or application layer")
            if under(module, ["pgexport.exporters"]) and under(t, EXPORTERS_MUST_NOT_IMPORT):
                report(imp, "exporters import no api, cli, eager, train or bench")
            if (under(t, ["pgexport.bench"]) and module != "pgexport.cli"
                    and not under(module, ["pgexport.bench"])):
                report(imp, "only pgexport.cli imports pgexport.bench")
            if imp.name and is_private(imp.name) and t in known and t != module:
                report(imp, "private name imported from another module")
            if imp.in_function and top_package(t) in TOP_LEVEL_ONLY:
                report(imp, "base dependencies are imported at module top level")
        for line, target, attr in private_attribute_uses(module, path, root, known):
            problems.append(f"{path.relative_to(root).as_posix()}:{line}: {module} uses {target}.{attr} "
                            "(private name used from another module)")
    return sorted(problems)


def test_package_follows_its_layers():
    # Everything under the mapped folders is checked; an empty scan would pass vacuously.
    files = module_files(REPO, PACKAGE_DIRS)
    assert {"pgexport.cli", "pgexport.models.paligemma", "pgexport.exporters.pipeline",
            "pgexport.runtime.session", "pgexport.processing.processor"} <= set(files)
    problems = check_layers(REPO, PACKAGE_DIRS)
    assert not problems, "layer violations:\n" + "\n".join(problems)


def test_tests_use_public_names():
    """The tests exercise the package through public names only: no `from pgexport.x import _y`,
    no `module._y`, no monkeypatching of `module._y`."""
    known = set(module_files(REPO, PACKAGE_DIRS))
    problems = []
    for path in sorted((REPO / "tests").glob("*.py")):
        module = f"tests.{path.stem}"
        for imp in imports_of(module, path, REPO, known):
            if imp.name and is_private(imp.name) and imp.target in known:
                problems.append(f"tests/{path.name}:{imp.line}: imports {imp.target}.{imp.name}")
        for line, target, attr in private_attribute_uses(module, path, REPO, known):
            problems.append(f"tests/{path.name}:{line}: uses {target}.{attr}")
    assert not problems, "private names used by the tests:\n" + "\n".join(problems)


def test_checker_reports_each_rule(tmp_path):
    def write(rel, source):
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))

    for package in ("pgexport", "pgexport/runtime", "pgexport/processing", "pgexport/bench", "pgexport/eager",
                    "models", "exporters"):
        write(f"{package}/__init__.py", "")
    write("pgexport/errors.py", "class PgExportError(Exception): pass\n_hidden = 1\n")
    write("pgexport/cli.py", "from pgexport.bench import run\n")          # allowed
    write("pgexport/bench/run.py", "from . import worker\n")              # allowed: bench -> bench
    write("pgexport/bench/worker.py", "import os\n")
    write("pgexport/eager/loading.py", "import torch\nfrom pgexport.models import gemma\n")  # allowed
    write("pgexport/runtime/clean.py", """\
        import json
        import numpy as np
        import onnxruntime
        from pgexport.errors import PgExportError
        from pgexport.processing import image
        """)
    write("pgexport/processing/image.py", "import numpy as np\n")
    write("pgexport/runtime/x.py", """\
        import torch
        """)
    write("pgexport/processing/lazy.py", """\
        def to_tensor(a):
            import torch.nn
            from ..eager import loading
            return a
        """)
    write("pgexport/runtime/dynamic.py", """\
        import importlib
        def get():
            return importlib.import_module("pgexport.exporters.graphs")
        """)
    write("models/gemma.py", """\
        import math
        import torch
        from safetensors.torch import save_file
        from pgexport.errors import PgExportError
        from pgexport.exporters import graphs
        import transformers
        """)
    write("exporters/graphs.py", """\
        import onnx
        from pgexport.models import gemma
        from pgexport.api import export
        """)
    write("exporters/private.py", """\
        from pgexport.errors import _hidden
        from pgexport import errors
        import pgexport.runtime.clean as clean
        print(errors._hidden, clean._thing, errors.__doc__)
        def patch(monkeypatch):
            monkeypatch.setattr(clean, "_thing", None)
            monkeypatch.setattr(clean, "public", None)
        """)
    write("pgexport/api.py", """\
        from pgexport.bench import report
        def load():
            import numpy as np
            from onnx import helper
            return np
        """)

    problems = check_layers(tmp_path, PACKAGE_DIRS)
    located = sorted(p.split(" (")[0] for p in problems)
    assert located == sorted([
        "pgexport/runtime/x.py:1: pgexport.runtime.x imports torch",
        "pgexport/processing/lazy.py:2: pgexport.processing.lazy imports torch.nn",
        "pgexport/processing/lazy.py:3: pgexport.processing.lazy imports pgexport.eager.loading",
        "pgexport/runtime/dynamic.py:3: pgexport.runtime.dynamic imports pgexport.exporters.graphs",
        "models/gemma.py:5: pgexport.models.gemma imports pgexport.exporters.graphs",
        "models/gemma.py:6: pgexport.models.gemma imports transformers",
        "exporters/graphs.py:3: pgexport.exporters.graphs imports pgexport.api.export",
        "exporters/private.py:1: pgexport.exporters.private imports pgexport.errors._hidden",
        "exporters/private.py:4: pgexport.exporters.private uses pgexport.errors._hidden",
        "exporters/private.py:4: pgexport.exporters.private uses pgexport.runtime.clean._thing",
        "exporters/private.py:6: pgexport.exporters.private uses pgexport.runtime.clean._thing",
        "pgexport/api.py:1: pgexport.api imports pgexport.bench.report",
        "pgexport/api.py:3: pgexport.api imports numpy",
        "pgexport/api.py:4: pgexport.api imports onnx.helper",
    ]), "\n".join(problems)
