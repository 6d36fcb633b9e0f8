"""The core does not know the synthetic world: it plugs in through the dataset registry like any dataset."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).parents[1] / "src" / "lens"
WORLD = ("lens.data.synthetic", "lens.world")
# the world itself, and the front-ends that show it on purpose (`lens demo`, `lens export-world`, the web app's
# one-click example scenes)
OUTSIDE_CORE = ("data/synthetic/", "world/", "demo.py", "cli.py", "serve/web.py")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_no_core_module_imports_the_world():
    core = [p for p in SRC.rglob("*.py") if not p.relative_to(SRC).as_posix().startswith(OUTSIDE_CORE)]
    assert len(core) > 20
    found = {
        p.relative_to(SRC).as_posix(): sorted(n for n in _imports(p) if n.startswith(WORLD)) for p in core
    }
    assert {p: names for p, names in found.items() if names} == {}


def test_the_core_runs_with_the_world_removed():
    """Block ``lens.data.synthetic`` and ``lens.world`` entirely: training, evaluation and the cache still
    import, and a config naming only real datasets builds its data."""
    script = """
import sys
for name in ("lens.data.synthetic", "lens.world"):
    sys.modules[name] = None  # any import of them now raises ImportError
import lens.cache, lens.evaluation, lens.reporting, lens.training
from lens.config import LensConfig
from lens.data.registry import configured_datasets
from lens.evaluation import default_splits
config = LensConfig()
config.data.reason_seg_root = "somewhere"
assert [s.name for s in configured_datasets(config.data)] == ["reason_seg"]
assert default_splits(config) == [("reason_seg", "val"), ("reason_seg", "test")]
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=None)
    assert done.returncode == 0, done.stderr
