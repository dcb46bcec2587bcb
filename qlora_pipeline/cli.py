"""Command line: `qlora-pipeline SUBCOMMAND …`, also `python -m qlora_pipeline` and `accelerate launch -m qlora_pipeline`.

Heavy libraries (torch, transformers, trl) are imported inside each command, so `--help` stays instant.
Bad input of any kind ends in one `error: …` line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from qlora_pipeline import __version__
from qlora_pipeline.errors import PipelineError

OVERRIDES_HELP = (
    "Any recipe key can be overridden after the recipe as --key value (e.g. --learning_rate 1e-4 --max_steps 20); "
    "command-line values beat the recipe. 'qlora-pipeline keys' lists every key."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qlora-pipeline",
        description="Recipe-driven QLoRA / LoRA fine-tuning: recipe → data → model → train → run folder.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = commands.add_parser(
        "train", help="train a recipe and write the run folder", description="Train a recipe.", epilog=OVERRIDES_HELP
    )
    train.add_argument("recipe", help="recipe YAML file (see recipes/)")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    train.add_argument("--overwrite", action="store_true", help="replace an existing run in output_dir")
    train.set_defaults(handler=cmd_train)

    preprocess = commands.add_parser(
        "preprocess",
        help="check and tokenize a recipe's data without loading the model",
        description="Load, check and tokenize the recipe's data; print examples and length statistics.",
        epilog=OVERRIDES_HELP,
    )
    preprocess.add_argument("recipe", help="recipe YAML file")
    preprocess.add_argument("--debug", type=int, default=0, metavar="N", help="print N examples token by token")
    preprocess.set_defaults(handler=cmd_preprocess)

    keys = commands.add_parser("keys", help="list every recipe key with its type, default and help")
    keys.set_defaults(handler=cmd_keys)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if extra and args.command == "keys":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.handler(args, extra) or 0
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def _quiet_libraries() -> None:
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_warning()
    logging.getLogger("qlora_pipeline").setLevel(logging.INFO)


def cmd_train(args, overrides: list[str]) -> int:
    from qlora_pipeline.config import load_recipe

    recipe = load_recipe(args.recipe, overrides)
    _quiet_libraries()
    from qlora_pipeline.train import run

    run(recipe, resume=args.resume, overwrite=args.overwrite)
    return 0


def cmd_preprocess(args, overrides: list[str]) -> int:
    from qlora_pipeline.config import load_recipe

    recipe = load_recipe(args.recipe, overrides)
    _quiet_libraries()
    from qlora_pipeline.train import prepare_data

    prepared = prepare_data(recipe)
    for note in recipe.notes + prepared.notes:
        print(f"note: {note}")
    tokenizer = prepared.tokenizer
    masked_loss = recipe.training.completion_only_loss is not False
    for index in range(min(args.debug, len(prepared.train.dataset))):
        example = prepared.train.dataset[index]
        ids, mask = example["input_ids"], example["completion_mask"]
        print(f"\n--- example {index}: {len(ids)} tokens, {sum(mask) if masked_loss else len(ids)} in the loss ---")
        print(f"{'pos':>5}  {'id':>6}  {'token':<24} label")
        for position, (token_id, in_loss) in enumerate(zip(ids, mask)):
            token = repr(tokenizer.convert_ids_to_tokens(token_id))
            label = str(token_id) if (in_loss or not masked_loss) else "-100 (masked)"
            print(f"{position:>5}  {token_id:>6}  {token:<24} {label}")
    print("\n== token lengths (prompt + answer, before truncation) ==")
    max_length = recipe.training.max_length
    print(f"max_length {max_length}, examples over it are {'dropped' if recipe.data.overlong == 'drop' else 'truncated'}")
    for name, split in (("train", prepared.train), ("eval", prepared.eval)):
        if split is None:
            continue
        s = split.stats()
        print(
            f"{name:<5} rows {s['rows']}  examples {s['examples']}  tokens {s['tokens']}  "
            f"min {s['min']}  mean {s['mean']}  median {s['median']}  p95 {s['p95']}  max {s['max']}  "
            f"over max_length {s['overlong']}  dropped {s['dropped']}  truncated {s['truncated']}  "
            f"{'(tokenized data read from cache)' if s['from_cache'] else '(tokenized now, cached for next time)'}"
        )
    return 0


def cmd_keys(args, extra: list[str]) -> int:
    import dataclasses

    from qlora_pipeline.config import _parser_classes

    for cls in _parser_classes():
        print(f"\n# {cls.__name__}")
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            default = f.default if f.default is not dataclasses.MISSING else "(computed)"
            help_text = " ".join(str(f.metadata.get("help", "")).split())
            print(f"{f.name}: {default!r}  {help_text[:160]}")
    return 0
