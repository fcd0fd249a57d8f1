"""The package's layers point one way (DESIGN §1): kernels know nothing of ops, layers or
models; ops know kernels; layers know ops; models know layers; the workflow knows models.

Checked by parsing every module's imports (including imports inside functions), so a lazy
import that breaks the layering fails as well as a top-level one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "llm_adapters"

# layer -> the package parts it may not import (its own layer and those below are allowed)
_WORKFLOW = ("train", "evaluate", "data", "cli", "demo", "answers", "selfcheck", "bench")
FORBIDDEN = {
    "_numerics": ("ops", "triton_kernels", "layers", "models", *_WORKFLOW),
    "triton_kernels": ("ops", "layers", "models", *_WORKFLOW),
    "ops": ("layers", "models", *_WORKFLOW),
    "layers": ("models", *_WORKFLOW),
    "models": _WORKFLOW,
}


def _layer(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0].removesuffix(".py")


def _imported_parts(path: Path, root: Path = PKG) -> list[tuple[int, str]]:
    """(line, first package part under llm_adapters) for every import of our own package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    pkg_parts = path.relative_to(root).parts[:-1]  # the module's own package, for relative imports
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "llm_adapters" and len(parts) > 1:
                    out.append((node.lineno, parts[1]))
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                parts = (node.module or "").split(".")
                if parts[0] != "llm_adapters":
                    continue
                parts = parts[1:]
            else:
                base = list(pkg_parts[: len(pkg_parts) - (node.level - 1)])
                if node.level - 1 > len(pkg_parts):
                    raise AssertionError(f"{path}: relative import above the package")
                parts = base + (node.module.split(".") if node.module else [])
            if parts:
                out.append((node.lineno, parts[0]))
            else:  # `from .. import x`: each name is a part of the package
                out.extend((node.lineno, alias.name) for alias in node.names)
    return out


def _modules() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if _layer(p) in FORBIDDEN)


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_imports_point_down(path):
    layer = _layer(path)
    bad = [
        f"line {line}: imports llm_adapters.{part}"
        for line, part in _imported_parts(path)
        if part.removesuffix(".py") in FORBIDDEN[layer]
    ]
    assert not bad, f"{path.relative_to(PKG)} ({layer} layer) breaks the layering: {bad}"


def test_checker_sees_relative_and_lazy_imports(tmp_path):
    # the parser itself: a lazy relative import of ops from a kernel module is found
    fake = tmp_path / "triton_kernels" / "probe.py"
    fake.parent.mkdir()
    fake.write_text(
        "import torch\nfrom .dropout import keep_bits\n"
        "def f():\n    from ..ops import torch_backend\n    import llm_adapters.models\n"
        "    from .. import layers\n"
    )
    parts = [part for _, part in _imported_parts(fake, root=tmp_path)]
    assert parts == ["triton_kernels", "ops", "models", "layers"]


def test_no_module_far_over_700_lines():
    long = {
        str(p.relative_to(PKG)): n
        for p in PKG.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 800
    }
    assert not long, f"modules over 800 lines (aim for about 700: split them): {long}"
