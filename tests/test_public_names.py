"""Every public name of DESIGN.md works whatever was imported or touched first.

Python binds an imported submodule over a package attribute of the same name, so a lazy
``mps.search`` would turn into a module once ``mpsearch.search`` (a package) was imported.
Each order below runs in a fresh interpreter (its own ``python -c``): it touches the public
names and imports mpsearch's modules in that order, then checks that every name resolves, that
the functions are still functions, and that each is the object its defining module holds.
"""
from __future__ import annotations

import json
import os
import pkgutil
import random
import subprocess
import sys
from pathlib import Path

import pytest

import mpsearch

ROOT = Path(mpsearch.__file__).resolve().parent
_DESIGN = ["load_vlm", "discover_layers", "Layer", "SearchSpace", "load_benchmark", "profile", "SensitivityReport",
           "LatencyTable", "Workload", "measure_latency_table", "measure_model_latency", "search", "solve_ilp",
           "Candidate", "refine", "Policy", "apply_policy", "evaluate", "Result", "mmmu", "sensitivity"]
_BEING_ADDED = ["export_checkpoint", "exportable_formats"]  # checked once mpsearch exports them
NAMES = _DESIGN + [n for n in _BEING_ADDED if n in mpsearch._EXPORTS]
MODULE_NAMES = {"mmmu": ["parse_multi_choice", "parse_open", "eval_open"], "sensitivity": ["hessian_traces"]}
#: What touching a name used to break (issue 15), and the imports that bind a subpackage.
KNOWN_BAD = [
    ["solve_ilp", "search"],
    ["Candidate", "search"],
    ["refine", "search"],
    ["import mpsearch.searching", "import mpsearch.searching._search", "import mpsearch.searching._ilp", "search"],
    ["Result", "evaluate"],
    ["import mpsearch.evaluation", "import mpsearch.evaluation.run", "import mpsearch.evaluation.store", "evaluate"],
    ["import mpsearch.sensitivity.report", "from mpsearch import sensitivity", "profile", "SensitivityReport"],
    ["import mpsearch.models.load", "import mpsearch.models.discover", "import mpsearch.export",
     "import mpsearch.latency.table", "load_vlm", "discover_layers", "Layer", "LatencyTable"],
]
N_RANDOM = 8


def _modules() -> list[str]:
    """Every module of the library, from the file tree (no imports); the CLI and demo left out."""
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        if parts[-1] == "__main__" or any(p in ("_cli", "demo", "search_spaces") for p in parts):
            continue
        out.append(".".join(parts))
    return out


def _random_order(seed: int) -> list[str]:
    rng = random.Random(seed)
    steps = [n if rng.random() < 0.7 else f"from mpsearch import {n}" for n in NAMES]
    steps += [f"import {m}" for m in rng.sample(_modules(), 8)]
    rng.shuffle(steps)
    return steps


CHECK = r"""
import importlib, json, sys, types
order, names, module_names = json.loads(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
import mpsearch as mps
for step in order:
    if step.startswith("import "):
        importlib.import_module(step.split()[1])
    elif step.startswith("from mpsearch import "):
        exec(step, {})
    else:
        getattr(mps, step)
for name in names:
    value = getattr(mps, name)
    assert value is not None, name
    if name in module_names:
        assert isinstance(value, types.ModuleType), (name, value)
        for attr in module_names[name]:
            assert callable(getattr(value, attr)), (name, attr)
        continue
    assert not isinstance(value, types.ModuleType), f"mps.{name} is the module {value.__name__}"
    assert callable(value), (name, value)
    home = importlib.import_module(mps._EXPORTS[name])
    assert getattr(home, name) is value, f"mps.{name} is not {home.__name__}.{name}"
    exec(f"from mpsearch import {name} as again", ns := {})
    assert ns["again"] is value, name
assert isinstance(mps.search, types.FunctionType) and isinstance(mps.evaluate, types.FunctionType)
print("ok")
"""

ORDERS = [pytest.param(order, id=f"known-bad-{i}") for i, order in enumerate(KNOWN_BAD)]
ORDERS += [pytest.param(_random_order(seed), id=f"random-{seed}") for seed in range(N_RANDOM)]


@pytest.mark.parametrize("order", ORDERS)
def test_public_names_in_a_fresh_interpreter(order):
    """One order, its own ``python -c`` (about 2 s each: the imports dominate)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", CHECK, json.dumps(order), json.dumps(NAMES), json.dumps(MODULE_NAMES)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), f"order {order}:\n{proc.stderr[-3000:]}"


def test_design_names_are_exported():
    exported = set(mpsearch._EXPORTS) | set(mpsearch._SUBMODULES)
    assert set(_DESIGN) <= exported, sorted(set(_DESIGN) - exported)
    assert set(NAMES) <= set(mpsearch.__all__)


def test_no_public_name_is_also_a_module_name():
    """An exported name must not be a submodule of mpsearch, nor of the package that defines it."""
    top = {m.name for m in pkgutil.iter_modules([str(ROOT)])}
    clash = sorted(n for n in mpsearch._EXPORTS if n in top)
    assert not clash, f"public names that are also modules of mpsearch: {clash}"
    for name, home in mpsearch._EXPORTS.items():
        folder = ROOT.parent.joinpath(*home.split("."))
        if folder.is_dir():
            children = {m.name for m in pkgutil.iter_modules([str(folder)])}
            assert name not in children, f"{home}.{name} is both a public name and a submodule"
