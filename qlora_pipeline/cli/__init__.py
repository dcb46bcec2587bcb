"""Command line: `qlora-pipeline SUBCOMMAND …`, also `python -m qlora_pipeline` and
`accelerate launch -m qlora_pipeline`.

The grammar is in parser.py, the commands in commands.py, preprocess.py and plan.py. Heavy libraries (torch,
transformers, trl) are imported inside each command, so `--help` stays instant. Bad input of any kind ends in one
`error: …` line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import logging
import os
import sys

from qlora_pipeline.cli.parser import build_parser
from qlora_pipeline.errors import DataError, PipelineError, RecipeError

__all__ = ["build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if extra and not getattr(args, "takes_overrides", False):
            raise PipelineError(
                f"{args.command}: unknown option {extra[0]!r}; see qlora-pipeline {args.command} --help"
            )
        quiet_libraries()
        return command(args.command)(args, extra) or 0
    except (RecipeError, DataError) as exc:
        # Found before anything loads, the same on every rank: under `accelerate launch` only rank 0 says it.
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def command(name: str):
    """The function that runs the subcommand `name`."""
    if name == "preprocess":
        from qlora_pipeline.cli.preprocess import preprocess

        return preprocess
    if name == "plan":
        from qlora_pipeline.cli.plan import plan

        return plan
    from qlora_pipeline.cli import commands

    return getattr(commands, name.replace("-", "_"))


def quiet_libraries() -> None:
    """transformers' warnings and our own notes, not its info chatter. Through the environment, so that nothing heavy
    is imported here (a recipe's unknown key is refused before torch loads); a verbosity the user set is kept."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "warning")
    logging.getLogger("qlora_pipeline").setLevel(logging.INFO)
