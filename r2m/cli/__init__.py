"""The `r2m` command. Each subcommand lives in its own module, imported only when chosen, which
provides HELP and either main(argv) -> exit code (it parses its own arguments) or
add_arguments(parser) and run(args) -> exit code."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, str] = {
    # name: module
    "bench": "r2m.cli.bench",
    "experiment": "r2m.cli.experiment",
    "train": "r2m.cli.train",
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="r2m", description="Real-Time Aligned Reward Models for RLHF")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        sub.add_parser(name, help=f"see `r2m {name} --help`", add_help=False)
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv or ["--help"])
        return 2
    module = importlib.import_module(COMMANDS[argv[0]])
    if hasattr(module, "main"):
        return int(module.main(argv[1:]) or 0)
    cmd = argparse.ArgumentParser(prog=f"r2m {argv[0]}", description=module.HELP)
    module.add_arguments(cmd)
    return int(module.run(cmd.parse_args(argv[1:])) or 0)

