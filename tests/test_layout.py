"""The code map's import rules (README "Code map"), read from every Python file's imports with ``ast``.

- ``layerdiff_model`` (pure PyTorch) <- ``nodes/host`` (the only code that imports ComfyUI's model code) <-
  the node classes in ``nodes/``; never the other way round.
- Product code (the root ``__init__.py``, ``nodes``, ``layerdiff_model``) never imports the toy package
  (``layerdiff_toy``) or the headless library (``comfy_headless``), and imports itself only relatively.
- Everything else takes product modules from the one copy ComfyUI loaded (``comfy_headless.product``): no
  top-level ``import layerdiff_model`` / ``nodes.*`` of this repository, so the package is loaded once per process.
- Scripts and benchmarks never import ``tests/``.
"""
from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from comfy_headless.boot import REPO_ROOT

TEST_HELPERS = {p.stem for p in (REPO_ROOT / "tests").glob("*.py")} | {"tests"}
COMFYUI_MODULES = ("comfy", "comfy_extras", "comfy_execution", "comfy_api", "folder_paths", "execution", "server",
                   "latent_preview", "node_helpers", "nodes")  # top-level `nodes` is ComfyUI's nodes.py


def python_files() -> list[Path]:
    skip = {".venv", ".cache", ".git", "runs", "output", "layerdiff_output"}
    return sorted(p for p in REPO_ROOT.rglob("*.py") if not skip & set(p.relative_to(REPO_ROOT).parts))


def dotted(path: Path) -> str:
    """Repository-relative module name: ``nodes/host/inference.py`` -> ``nodes.host.inference``."""
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, source: str | None = None) -> list[tuple[str, bool, int]]:
    """(module, is_relative, line) for every import statement; relative ones resolved to repository names."""
    tree = ast.parse(path.read_text() if source is None else source, filename=str(path))
    package = dotted(path) if path.name == "__init__.py" else dotted(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, False, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                found.append((node.module or "", False, node.lineno))
                continue
            base = package.split(".") if package else []
            base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
            target = ".".join([*base, node.module] if node.module else base)
            found.append((target, True, node.lineno))
            found += [(f"{target}.{alias.name}" if target else alias.name, True, node.lineno) for alias in node.names]
    return found


def starts(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def rule_breaks(path: Path, source: str | None = None) -> list[str]:
    """What ``path``'s imports (or ``source`` as if it were that file) break, one line each."""
    me = dotted(path)
    product = me == "" or starts(me, "layerdiff_model", "nodes")
    breaks = []
    for module, relative, line in imports_of(path, source):
        where = f"{path.relative_to(REPO_ROOT)}:{line} imports {module or '(root)'}"
        if relative and not product:
            continue  # e.g. inside comfy_headless or layerdiff_toy
        if starts(me, "layerdiff_model"):
            if relative and not starts(module, "layerdiff_model"):
                breaks.append(f"{where}: the model package reaches outside itself")
            if not relative and starts(module, *COMFYUI_MODULES):
                breaks.append(f"{where}: the model package imports ComfyUI")
        if starts(me, "nodes.host") and relative and starts(module, "nodes") and not starts(module, "nodes.host"):
            breaks.append(f"{where}: host code imports the node classes")
        if product and not relative and starts(module, "layerdiff_toy", "comfy_headless", "layerdiff_model"):
            breaks.append(f"{where}: product code imports a non-product package (or itself absolutely)")
        if not product and not relative and starts(module, "layerdiff_model"):
            breaks.append(f"{where}: a second copy of layerdiff_model; use comfy_headless.product")
        if starts(me, "scripts", "benchmarks") and not relative and module.split(".")[0] in TEST_HELPERS:
            breaks.append(f"{where}: scripts and benchmarks never import tests/")
    return breaks


def test_every_file_keeps_the_import_rules():
    files = python_files()
    assert len(files) > 60 and any(p.parent.name == "host" for p in files)
    breaks = [line for path in files for line in rule_breaks(path)]
    assert not breaks, "\n".join(breaks)


def sys_path_edits(path: Path) -> int:
    """How many ``sys.path.insert`` / ``append`` / ``remove`` calls the file's code makes (strings excluded)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return sum(1 for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
               and ast.unparse(node.func.value) == "sys.path")


def test_sys_path_is_edited_once_per_script_and_never_elsewhere():
    """Scripts and benchmarks put the repository root first with one documented line; only the headless library
    puts ComfyUI on the path (booting it); product code, the toy package and the tests never edit it."""
    counts = {str(p.relative_to(REPO_ROOT)): sys_path_edits(p) for p in python_files()}
    too_many = {f: n for f, n in counts.items() if n > (1 if f.startswith(("scripts/", "benchmarks/")) else 0)
                and not f.startswith("comfy_headless/")}
    assert not too_many, too_many
    assert counts["scripts/train_layerdiff.py"] == 1


@pytest.mark.parametrize("file, source, expected", [
    ("layerdiff_model/sampling/x.py", "import comfy.samplers\n", "imports ComfyUI"),
    ("layerdiff_model/sampling/x.py", "from ...nodes.host import inference\n", "reaches outside"),
    ("nodes/host/x.py", "from ..nodes_layers import LayerDiffSaveLayers\n", "host code imports the node classes"),
    ("nodes/host/x.py", "from layerdiff_toy import toy_model\n", "non-product package"),
    ("nodes/x.py", "import comfy_headless.product\n", "non-product package"),
    ("tests/x.py", "from layerdiff_model.errors import LayoutError\n", "second copy"),
    ("benchmarks/x.py", "import comfy_host\n", "never import tests/"),
    ("scripts/x.py", "from layerdiff_host import adapter\n", "never import tests/"),
])
def test_a_forbidden_import_is_caught(file, source, expected):
    """The checker itself: each rule, broken once in a file's source, is reported."""
    breaks = rule_breaks(REPO_ROOT / file, source)
    assert any(expected in line for line in breaks), breaks


def test_one_copy_of_the_package_in_this_process():
    """The tests take product modules from ComfyUI's loaded copy only: one module object per product file."""
    from comfy_headless.product import product_module

    product_module("nodes.host.inference")
    errors_file = (REPO_ROOT / "layerdiff_model" / "errors.py").resolve()
    copies = [m.__name__ for m in list(sys.modules.values())
              if getattr(m, "__file__", None) and Path(m.__file__).resolve() == errors_file]
    assert len(copies) == 1, copies
    assert "layerdiff_model" not in sys.modules


def test_boot_refuses_a_second_copy(comfyui):
    """A process that imported layerdiff_model at the top level cannot then boot ComfyUI and load a second copy."""
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO_ROOT)!r})
        import layerdiff_model.errors
        from comfy_headless.boot import HarnessError, boot
        try:
            boot(comfy_root={str(comfyui.comfy_root)!r})
        except HarnessError as exc:
            print(exc)
            sys.exit(3)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, result.stderr
    assert "imported as a top-level package" in result.stdout and "comfy_headless.product" in result.stdout
