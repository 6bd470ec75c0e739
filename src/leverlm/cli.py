"""The ``leverlm`` command. Thin: each subcommand lives in its own module, imported lazily."""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, function taking argv, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "prep": ("leverlm.data.prep.cli", "main", "write a collection (coco, vqav2, easyvqa)"),
    "features": ("leverlm.encoders", "main", "CLIP image/text features of a collection"),
    "gt": ("leverlm.gt.job", "main", "ground-truth ICD sequences (LightningCLI predict)"),
    "train": ("leverlm.lever.module", "main", "train Lever-LM (LightningCLI fit)"),
    "select": ("leverlm.lever.select", "main", "configure ICDs for queries with Lever-LM"),
    "eval": ("leverlm.icl.job", "main", "in-context evaluation (LightningCLI test)"),
    "report": ("leverlm.report", "main", "tables and plots from eval results"),
    "bench": ("leverlm.bench", "main", "benchmarks: fast paths vs reference paths"),
    "demo": ("leverlm.demo", "main", "the whole pipeline on the embedded easy-vqa set"),
}


def _usage() -> str:
    lines = ["usage: leverlm <command> [args...]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "Run 'leverlm <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from leverlm import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"leverlm: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name, _ = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and err.name.startswith("leverlm"):
            print(f"leverlm: command {name!r} is not available in this build", file=sys.stderr)
            return 2
        raise
    result = getattr(module, func_name)(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
