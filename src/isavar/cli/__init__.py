"""isavar command line: ``isavar <command> [options]``; ``isavar <command> --help`` for each."""

from __future__ import annotations

import argparse
import importlib
import sys

from isavar._version import __version__

#: The subcommands, in the order ``--help`` lists them: (name, module under isavar.cli).
COMMANDS: list[tuple[str, str]] = [
    ("isac2", "isac2"),
    ("isac2-select", "isac2_select"),
    ("3dvariability", "variability"),
    ("3dva", "threedva"),
    ("3dva-split", "threedva_split"),
    ("reconstruct", "reconstruct"),
    ("simulate", "simulate"),
    ("convert", "convert"),
    ("info", "info"),
    ("demo", "demo"),
]


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (the usage of isac2 alone fills a screen)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


#: Commands whose interrupted runs continue when the same command is run again.
RESUMABLE = ("isac2", "3dvariability")


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with one subparser per command."""
    parser = _Parser(
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
        Exit status: 0 success, 1 failure (out of memory or disk space, I/O error), 2 bad input or usage,
        130 interrupted.
    """
    from isavar._allocator import tune_allocator
    from isavar.errors import InputError

    tune_allocator()
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
        hint = "; run the same command again to continue" if args.command in RESUMABLE else ""
        print(f"isavar {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _stdout_closed()
    except MemoryError as exc:
        detail = str(exc).split(";")[0] or "memory exhausted"
        print(f"isavar {args.command}: error: out of memory ({detail}); use fewer --workers or a smaller "
              "--chunk-size, or a machine with more memory", file=sys.stderr)
        return 1
    except OSError as exc:                                 # full disk, permissions, I/O errors: one line
        from isavar.workflows.outputs import describe_os_error

        print(f"isavar {args.command}: error: {describe_os_error(exc)}", file=sys.stderr)
        return 1
    finally:
        from isavar._logging import close_log_files

        close_log_files()


def _stdout_closed() -> int:
    """The reader of stdout went away (``isavar info FILE | head``): stop quietly, as shell tools do.

    Python's own flush of ``sys.stdout`` at exit would raise again, so stdout is
    pointed at ``/dev/null`` first. Returns 141 (128 + SIGPIPE).
    """
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 141


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
