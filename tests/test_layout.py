"""The package's shape: layers that import one way (``lint-imports``), no import cycle between modules, no
import hidden inside a function to dodge one, small modules, a torch-free ``import kagglecmr``."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "kagglecmr"
# api.py is the facade the CLI and ``import kagglecmr`` load: it imports the engine when a verb is called so that
# ``kagglecmr --help`` and ``kagglecmr score`` start without torch.  Nowhere else.
LAZY_FACADES = {"kagglecmr/api.py"}
MAX_LINES = 420  # "under ~400 lines, one concept each"


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_lint_imports_layers_contract_is_kept():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if exe is None:
        pytest.skip("import-linter not installed (pip install -e '.[dev]')")
    proc = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout and "layers" in proc.stdout


def test_no_kagglecmr_import_inside_a_function():
    found = []
    for path in _modules():
        rel = path.relative_to(ROOT).as_posix()
        if rel in LAZY_FACADES:
            continue
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("kagglecmr")):
                        found.append(f"{rel}:{node.lineno} from {node.module}")
                    if isinstance(node, ast.Import) and any(a.name.startswith("kagglecmr") for a in node.names):
                        found.append(f"{rel}:{node.lineno} import")
    assert not found, "imports inside functions (move them to the top; a cycle means a module is misplaced): " + \
        ", ".join(found)


def test_module_import_graph_has_no_cycle():
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("kagglecmr")
    modules = sorted(m for m in graph.modules if m.startswith("kagglecmr"))
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.find_modules_directly_imported_by(m)):
            if not n.startswith("kagglecmr") or n == "kagglecmr":
                continue
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in modules:
        if m not in state and (cycle := visit(m)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_modules_are_small():
    big = {p.relative_to(ROOT).as_posix(): n for p in _modules() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines (split them by concept): {big}"


def test_subpackages_import_without_torch():
    code = ("import sys, kagglecmr, kagglecmr.formats.metric, kagglecmr.formats.submission_csv, kagglecmr.cfg.config, "
            "kagglecmr.engine.rundir, kagglecmr.engine.evaluator, kagglecmr.reports.leaderboard, kagglecmr.cli; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_wheel_holds_the_shipped_configs_and_dataset_files(tmp_path):
    """The wheel a user installs carries every YAML recipe and dataset file (package data), so ``--config demo``
    works outside a clone; CI's ``make wheel-check`` then installs that wheel into a fresh venv and runs the job."""
    import zipfile

    pytest.importorskip("setuptools")
    src = tmp_path / "src"  # a copy: setuptools' build/ folder must not be left in (or reused from) the checkout
    shutil.copytree(PACKAGE, src / "kagglecmr", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "--wheel-dir", str(tmp_path), str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = next(tmp_path.glob("kagglecmr-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.relative_to(ROOT).as_posix() for p in (PACKAGE / "cfg").rglob("*.yaml")}
    assert {"kagglecmr/cfg/default.yaml", "kagglecmr/cfg/demo.yaml", "kagglecmr/cfg/datasets/cmr.yaml"} <= shipped
    assert shipped <= names, f"missing from the wheel: {sorted(shipped - names)}"
    modules = {p.relative_to(ROOT).as_posix() for p in _modules()}
    assert modules <= names, f"modules missing from the wheel: {sorted(modules - names)}"
