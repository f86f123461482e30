"""The command line both flows share: `run` once, here, or `serve` as a deployment with a schedule.

`python -m flows.<flow> [options]` without a command means `run`.
"""

import argparse
import sys


def run_or_serve(description: str, deployment: str, cron_example: str) -> tuple[argparse.ArgumentParser, list]:
    """A parser with `run` and `serve` (both take --workdir; serve takes --cron or --interval, and --name).
    Returns it and the two subparsers, for the flow's own options."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    commands = [sub.add_parser(command) for command in ("run", "serve")]
    for p in commands:
        p.add_argument("--workdir", default=".", help="DVC project directory (default: .)")
    when = commands[1].add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", help=f'cron schedule, e.g. "{cron_example}"')
    when.add_argument("--interval", type=float, help="schedule every this many seconds")
    commands[1].add_argument("--name", default=deployment, help=f"deployment name (default: {deployment})")
    return parser, commands


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("run", "serve", "-h", "--help"):
        argv = ["run", *argv]
    return parser.parse_args(argv)
