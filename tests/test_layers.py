"""The one-way layering of refusal_probe's subpackages (README "Architecture", /work/coord/PLAN.md).

Every module under src/refusal_probe is parsed with ``ast``; every import at any depth (function-local ones too)
that names refusal_probe is mapped to its subpackage and rank. A module may import only its own subpackage or a lower
rank, and the subpackage import graph has no cycle. Adding a subpackage means giving it a rank here.
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest

import refusal_probe

PACKAGE = "refusal_probe"
# Lower ranks are imported by higher ones, never the other way round.
RANKS = {
    PACKAGE: 0,  # the package root: __version__ only
    "core": 0,  # errors, io, hashing, template, batching, generate, settings, locks
    "data": 1,  # bundled datasets and loaders
    "models": 2,  # sources, embedded, tree discovery, manifest, quantization
    "evaluate": 3,  # judges, chrF, score, eval pipeline
    "probe": 4,  # activations, directions, drift, hooks, weights, validate
    "train": 5,  # lifecycle, sft, dpo, callbacks, sweep
    "analysis": 6,  # join, correlate, plots, report, analyze pipeline
    "cli": 7,
    "demo": 7,
    "testing": 7,  # test-support builders (tiny models)
}
SRC = Path(refusal_probe.__file__).resolve().parent


def module_names(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under the package folder ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = [PACKAGE, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def unit(module: str) -> str:
    """The subpackage (or top-level module) a dotted name belongs to; the root package is its own unit."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else PACKAGE


def imports(module: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported refusal_probe module, line) for every import statement in the file, at any nesting level."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_pkg = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == PACKAGE]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")
                base = base if is_pkg else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != PACKAGE:
                continue
            for (
                alias
            ) in node.names:  # `from refusal_probe.x import y` imports the module x.y when there is one
                sub = f"{target}.{alias.name}"
                found.append((sub if sub in known else target, node.lineno))
    return list(dict.fromkeys(found))


def layer_problems(root: Path) -> list[str]:
    """Every import that points up or sideways into an unranked unit, and every cycle between units."""
    modules = module_names(root)
    known = set(modules)
    problems = []
    edges: dict[
        str, dict[str, str]
    ] = {}  # unit -> imported unit -> one example "module line N imports target"
    for module, path in modules.items():
        src = unit(module)
        if src not in RANKS:
            problems.append(
                f"{module}: subpackage '{src}' has no rank; give it one in tests/test_layers.py RANKS"
            )
            continue
        for target, line in imports(module, path, known):
            dst = unit(target)
            where = f"{module} (line {line}) imports {target}"
            if dst not in RANKS:
                problems.append(f"{where}: '{dst}' has no rank")
                continue
            if dst != src:
                edges.setdefault(src, {}).setdefault(dst, where)
            if RANKS[dst] > RANKS[src]:
                problems.append(
                    f"{where}: {src} (rank {RANKS[src]}) may not import {dst} (rank {RANKS[dst]})"
                )
    problems += [
        f"import cycle {' -> '.join(c)}: " + "; ".join(edges[a][b] for a, b in itertools.pairwise(c))
        for c in cycles(edges)
    ]
    return problems


def cycles(edges: dict[str, dict[str, str]]) -> list[list[str]]:
    """One cycle (as a closed path a -> ... -> a) per strongly connected group of units, found by DFS."""
    found, done = [], set()

    def visit(node: str, stack: list[str]) -> None:
        for nxt in sorted(edges.get(node, {})):
            if nxt in stack:
                cyc = stack[stack.index(nxt) :] + [nxt]
                if not any(set(cyc) == set(c) for c in found):
                    found.append(cyc)
            elif nxt not in done:
                visit(nxt, [*stack, nxt])
        done.add(node)

    for start in sorted(edges):
        if start not in done:
            visit(start, [start])
    return found


def test_subpackages_import_only_lower_layers_without_cycles():
    problems = layer_problems(SRC)
    assert not problems, "layering violations:\n" + "\n".join(problems)


def write_package(root: Path, files: dict[str, str]) -> Path:
    pkg = root / PACKAGE
    for rel, text in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text, encoding="utf-8")
    return pkg


@pytest.mark.parametrize(
    "files, expected",
    [
        # a function-local upward import is found and named
        (
            {
                "core/__init__.py": "",
                "core/gen.py": "def f():\n    from refusal_probe.probe.act import pad\n",
                "probe/__init__.py": "",
                "probe/act.py": "",
            },
            "refusal_probe.core.gen (line 2) imports refusal_probe.probe.act: core (rank 0) may not import probe",
        ),
        # `from refusal_probe import x` counts as importing the subpackage x
        (
            {"data/__init__.py": "from refusal_probe import train\n", "train/__init__.py": ""},
            "refusal_probe.data (line 1) imports refusal_probe.train: data (rank 1) may not import train (rank 5)",
        ),
        # a relative import is resolved
        (
            {
                "models/__init__.py": "",
                "models/x.py": "from ..evaluate import judge\n",
                "evaluate/__init__.py": "",
                "evaluate/judge.py": "",
            },
            "refusal_probe.models.x (line 1) imports refusal_probe.evaluate.judge",
        ),
        # an unranked top-level module
        ({"errors.py": ""}, "subpackage 'errors' has no rank"),
        # a cycle between units of equal rank
        (
            {"cli.py": "import refusal_probe.demo\n", "demo.py": "from refusal_probe.cli import main\n"},
            "import cycle cli -> demo -> cli",
        ),
    ],
)
def test_layer_check_names_the_offending_import(tmp_path, files, expected):
    problems = layer_problems(write_package(tmp_path, files))
    assert any(expected in p for p in problems), problems


def test_layer_check_accepts_downward_and_same_package_imports(tmp_path):
    pkg = write_package(
        tmp_path,
        {
            "__init__.py": "",
            "core/__init__.py": "",
            "core/io.py": "",
            "probe/__init__.py": "",
            "probe/a.py": "from refusal_probe.core.io import x\nfrom refusal_probe.probe import b\n",
            "probe/b.py": "",
            "analysis/__init__.py": "def f():\n    import refusal_probe.probe.a\n    from refusal_probe import __version__\n",
        },
    )
    assert layer_problems(pkg) == []
