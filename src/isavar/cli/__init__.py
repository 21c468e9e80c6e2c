"""isavar command line: ``isavar <command> [options]``; ``isavar <command> --help`` for each."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from isavar._version import __version__

#: The subcommands, in the order ``--help`` lists them: (name, module under isavar.cli).
COMMANDS: list[tuple[str, str]] = [
    ("isac2", "isac2"),
    ("3dvariability", "variability"),
    ("3dva", "threedva"),
    ("3dva-split", "threedva_split"),
    ("reconstruct", "reconstruct"),
    ("simulate", "simulate"),
    ("convert", "convert"),
    ("info", "info"),
    ("demo", "demo"),
]


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with one subparser per command."""
    parser = argparse.ArgumentParser(
        prog="isavar",
        description="ISAC2 2D classification and 3D variability for cryo-EM single-particle analysis.",
    )
    parser.add_argument("--version", action="version", version=f"isavar {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS:
        module = importlib.import_module(f"isavar.cli.{module_name}")
        doc = (module.__doc__ or "").strip()
        summary = doc.splitlines()[0] if doc else name
        p = sub.add_parser(name, help=summary, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the isavar command line.

    Parameters
    ----------
    argv : list of str, optional
        Arguments without the program name; default ``sys.argv[1:]``.

    Returns
    -------
    int
        Exit status: 0 success, 1 failure, 2 bad input or usage.
    """
    from isavar.errors import InputError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except InputError as exc:
        print(f"isavar {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"isavar {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        from isavar._logging import close_log_files

        close_log_files()



if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
