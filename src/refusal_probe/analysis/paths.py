"""How a path is shown in a report or a figure: relative to the tree, never as a path of the machine that made it.

A summary.json holds absolute paths (the tree root, each checkpoint's folder, the shared direction cache, a base
model's folder); a reader elsewhere can use none of them and they say who ran it where. Every string shown passes
through ``path_scrubber``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path

_ABS = re.compile(r"(?<![\w.~<>:/+-])(?:/[^\s/`'\"|,;()\[\]{}<>=]+){2,}/?")


def path_scrubber(summary: Mapping | None, out_dir: Path | None = None) -> Callable[[str], str]:
    """A function that rewrites every absolute path in a string: relative to the tree root (or the analysis folder
    outside it), ``<cache>/...`` in the shared cache, ``~/...`` under home, else ``.../<last two parts>``."""
    from refusal_probe.core.io import cache_root

    raw_tree = (summary or {}).get("tree")
    tree: Mapping = raw_tree if isinstance(raw_tree, Mapping) else {}
    prefixes: list[tuple[str, str]] = []
    root = Path(tree["root"]).resolve() if tree.get("root") else None
    # the analysis folder gets its own label only outside the tree: inside, a path reads the same (relative to the
    # tree) whether the report is written there or elsewhere (`report --out`)
    outside = out_dir is not None and (root is None or not Path(out_dir).resolve().is_relative_to(root))
    for raw, label in (
        (tree.get("root"), ""),
        (str(out_dir) if outside else None, "<analysis>"),
        (str(cache_root()), "<cache>"),
        (str(Path.home()), "~"),
    ):
        if raw:
            for p in {str(Path(raw).absolute()), str(Path(raw).resolve())}:
                if p != "/":
                    prefixes.append((p.rstrip("/"), label))
    prefixes.sort(key=lambda x: len(x[0]), reverse=True)

    def one(m: re.Match) -> str:
        path = m.group(0)
        for prefix, label in prefixes:
            if path == prefix or path.startswith(prefix + "/"):
                rest = path[len(prefix) :].lstrip("/")
                if not label:
                    return rest or "."
                return f"{label}/{rest}" if rest else label
        return ".../" + "/".join(path.rstrip("/").split("/")[-2:])

    return lambda text: _ABS.sub(one, text)
