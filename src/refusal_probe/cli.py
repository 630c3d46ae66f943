"""The `refusal-probe` command: one thin subcommand per stage. Each area registers its own subcommands."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from refusal_probe.core.errors import UserError
from refusal_probe.core.settings import dash_values

# Modules exposing ``register(subparsers)``; each adds its subcommands and sets ``func`` on them.
COMMAND_MODULES = (
    "refusal_probe.models.commands",
    "refusal_probe.probe.commands",
    "refusal_probe.analysis.commands",
    "refusal_probe.evaluate.commands",
    "refusal_probe.train.commands",
    "refusal_probe.train.safety.commands",
    "refusal_probe.demo",
)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage dump) naming the flag, with where to read more."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}; see '{self.prog} --help'\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="refusal-probe",
        description="What did fine-tuning do to my model's safety, and where inside the model did it happen?",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # area not built yet
                continue
            raise
        module.register(sub)
    return parser


def _version() -> str:
    from refusal_probe import __version__

    return f"refusal-probe {__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # `--learning-rate -1e-4`: a value that starts with '-' reaches validation instead of being read as a flag
    args = parser.parse_args(dash_values(sys.argv[1:] if argv is None else argv, parser))
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"refusal-probe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"refusal-probe {args.command}: interrupted; re-run the same command to resume", file=sys.stderr
        )
        return 130
    except Exception as exc:  # unexpected: keep the traceback when asked
        if os.environ.get("REFUSAL_PROBE_DEBUG"):
            raise
        print(
            f"refusal-probe {args.command}: internal error: {type(exc).__name__}: {exc} "
            "(set REFUSAL_PROBE_DEBUG=1 for a traceback and report it)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
