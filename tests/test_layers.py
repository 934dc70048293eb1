"""The layers of docs/architecture.md, checked on every module's imports (lazy ones included).

config -> core (egm/) -> backend | worker -> cli. A module imports only its own layer and the ones
below; backend and worker never import each other; only the worker imports torch or vllm.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: folder -> (import name, the egm.* layers it must not import)
LAYERS = {
    "config": ("egm.config", ("egm.backend", "egm.worker", "egm.cli", "egm.")),
    "egm": ("egm", ("egm.backend", "egm.worker", "egm.cli")),
    "backend": ("egm.backend", ("egm.worker", "egm.cli")),
    "worker": ("egm.worker", ("egm.backend", "egm.cli")),
    "cli": ("egm.cli", ()),
}
GPU_LIBRARIES = ("torch", "vllm", "transformers")


def imported_modules(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def modules_of(folder: str) -> list[Path]:
    return sorted((REPO / folder).rglob("*.py"))


@pytest.mark.parametrize("folder", sorted(LAYERS))
def test_a_layer_imports_only_layers_below_it(folder: str) -> None:
    own, forbidden = LAYERS[folder]
    bad = []
    for path in modules_of(folder):
        for name in imported_modules(path):
            hit = next((f for f in forbidden if name == f.rstrip(".") or name.startswith(f.rstrip(".") + ".")), None)
            if folder == "config" and name.startswith("egm.config"):
                hit = None
            if hit:
                bad.append(f"{path.relative_to(REPO)} imports {name}")
    assert not bad, "layer violations:\n" + "\n".join(bad)


def test_no_top_level_names_outside_the_egm_namespace() -> None:
    """Installed code imports `egm.backend`, never a bare `backend` / `worker` / `config` / `cli`."""
    bad = [f"{p.relative_to(REPO)} imports {n}"
           for folder in LAYERS for p in modules_of(folder) for n in imported_modules(p)
           if n.split(".")[0] in {"backend", "worker", "config", "cli"}]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("folder", ["config", "egm", "backend", "cli"])
def test_only_the_worker_imports_gpu_libraries(folder: str) -> None:
    bad = [f"{p.relative_to(REPO)} imports {n}" for p in modules_of(folder) for n in imported_modules(p)
           if n.split(".")[0] in GPU_LIBRARIES]
    assert not bad, "\n".join(bad)
