"""The house rules that keep the code readable, checked on the source: data flows one way (the UI
renders what the library yields: it imports no sampler and draws no noise), no module is two
concepts (600 lines at most), app.py only composes, and train/ scripts need no sys.path edits."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UI = sorted((ROOT / "diffusion_core" / "ui").glob("*.py"))
SAMPLER_NAMES = {"samplers", "get_sampler", "get_sigmas", "restore", "restore_naive", "restore_improved", "COLD_SAMPLERS"}
NOISE_CALLS = {"randn", "randn_like", "rand", "randint", "normal", "Generator", "manual_seed", "multinomial"}


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


@pytest.mark.parametrize("path", UI, ids=lambda p: p.name)
def test_the_ui_imports_no_sampler_and_draws_no_noise(path):
    imported, called = set(), set()
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.ImportFrom):
            imported |= {(node.module or "").split(".")[-1]} | {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            imported |= {a.name.split(".")[-1] for a in node.names}
        elif isinstance(node, ast.Call):
            f = node.func
            called.add(f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", ""))
    assert not imported & SAMPLER_NAMES, f"{path.name} imports {sorted(imported & SAMPLER_NAMES)}"
    assert not called & NOISE_CALLS, f"{path.name} calls {sorted(called & NOISE_CALLS)}"


@pytest.mark.parametrize("path", sorted((ROOT / "diffusion_core").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_library_module_is_over_600_lines(path):
    assert len(path.read_text().splitlines()) <= 600


def test_app_only_composes_the_tabs():
    lines = (ROOT / "app.py").read_text().splitlines()
    assert len(lines) <= 150
    functions = [n for n in ast.walk(_tree(ROOT / "app.py")) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    assert not functions, f"app.py defines handlers: {[f.name for f in functions]}"


@pytest.mark.parametrize("path", sorted((ROOT / "train").glob("*.py")), ids=lambda p: p.name)
def test_training_scripts_do_not_edit_sys_path(path):
    assert "sys.path" not in path.read_text()


@pytest.mark.slow  # a subprocess over the whole repository
def test_ruff_finds_nothing():
    """The linter configuration of pyproject.toml holds for the whole repository."""
    import shutil
    import subprocess

    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (tests/requirements.txt installs it)")
    proc = subprocess.run([ruff, "check", "--quiet", str(ROOT)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:]
