"""The ``leverlm`` command: one dispatcher; each subcommand lives in its own module (lazy).

Every user error is a :class:`~leverlm.errors.LeverError`, caught here once: it prints
``error: <message>`` on one line and exits with the error's code (2; 3 for an unfinished run),
never a traceback.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, function taking argv, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "prep": ("leverlm.data.prep.cli", "main", "write a collection (coco, vqav2, easyvqa)"),
    "features": ("leverlm.encoders.job", "main", "CLIP features of a collection: predict | merge"),
    "gt": ("leverlm.gt.job", "main", "ground-truth ICD sequences: predict | merge"),
    "train": ("leverlm.lever.module", "main", "train Lever-LM: fit | validate"),
    "select": ("leverlm.lever.select", "main", "configure ICDs for queries with Lever-LM"),
    "eval": ("leverlm.icl.job", "main", "in-context evaluation: predict | merge"),
    "report": ("leverlm.report", "main", "tables and plots from eval results"),
    "bench": ("leverlm.bench", "main", "benchmarks: fast paths vs reference paths"),
    "demo": ("leverlm.demo", "main", "the whole pipeline on the embedded easy-vqa set"),
}


def usage() -> str:
    lines = ["usage: leverlm <command> [args...]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "Run 'leverlm <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from leverlm.errors import LeverError
    from leverlm.utils import quiet_third_party, setup_logging

    quiet_third_party()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from leverlm import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    setup_logging()
    module_name, func_name, _ = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
        return int(getattr(module, func_name)(rest) or 0)
    except LeverError as err:
        print(f"error: {message(err)}", file=sys.stderr)
        return err.exit_code


def message(err: Exception) -> str:
    """The error's own message; for one re-raised from a DataLoader worker (torch wraps the
    worker's traceback into the message), its last line."""
    text = str(err)
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        head, sep, tail = last.partition(": ")
        return tail if sep and head.endswith(type(err).__name__) else last
    return text


if __name__ == "__main__":
    sys.exit(main())
