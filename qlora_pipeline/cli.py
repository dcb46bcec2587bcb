"""Command line: `qlora-pipeline SUBCOMMAND …`, also `python -m qlora_pipeline` and
`accelerate launch -m qlora_pipeline`.

Heavy libraries (torch, transformers, trl) are imported inside each command, so `--help` stays instant.
Bad input of any kind ends in one `error: …` line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from qlora_pipeline import __version__
from qlora_pipeline.errors import DataError, PipelineError, RecipeError

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

    merge = commands.add_parser(
        "merge",
        help="merge a run's adapter into its base model and export it, checked against the trained model",
        description="Merge the LoRA adapter into unquantized base weights and export a standalone model "
        "(safetensors, tokenizer with the training chat template, model card, fidelity report).",
    )
    merge.add_argument("run", help="run folder (holding adapter/) or adapter folder")
    merge.add_argument("--out", help="export folder (default: RUN/merged, or the recipe's merge_output_dir)")
    merge.add_argument(
        "--dtype", choices=["fp16", "bf16", "fp32"], help="dtype of the merged weights (default: the base's)"
    )
    merge.add_argument(
        "--base-mode",
        choices=["nf4-roundtrip", "original"],
        help="merge into the NF4-dequantized weights the adapter was trained against (default) or the original ones",
    )
    merge.add_argument("--max-shard-size", help="largest safetensors shard, e.g. 2GB (default 5GB)")
    merge.add_argument("--prompts", type=int, help="held-out examples in the fidelity check (default 8)")
    merge.add_argument("--max-ppl-increase", type=float, help="fail if perplexity rises by more than this share")
    merge.add_argument("--max-logit-diff", type=float, help="fail if any logit moves by more than this")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing export folder")
    merge.set_defaults(handler=cmd_merge)

    publish = commands.add_parser(
        "publish",
        help="upload a merged export (or a LoRA adapter) to the Hugging Face Hub",
        description="Check a merged export (or, with --adapter-only, a LoRA adapter) offline, then upload it to the "
        "Hub. The token comes from HF_TOKEN or `hf auth login`. Exit 3: the Hub could not be reached or refused "
        "the upload; the folder is untouched and the same command publishes it again.",
    )
    publish.add_argument(
        "folder",
        metavar="DIR",
        help="merged export, adapter folder, or run folder (its merged/, or adapter/ with --adapter-only)",
    )
    publish.add_argument("--repo-id", required=True, metavar="OWNER/NAME", help="Hub repo (created if missing)")
    publish.add_argument(
        "--private", action="store_true", help="create the repo private (an existing repo keeps its visibility)"
    )
    publish.add_argument("--adapter-only", action="store_true", help="publish the LoRA adapter, not the merged model")
    publish.add_argument("--revision", metavar="BRANCH", help="branch to commit to (created if missing); default main")
    publish.add_argument("--dry-run", action="store_true", help="check and list what would be uploaded; send nothing")
    publish.set_defaults(handler=cmd_publish)

    report = commands.add_parser(
        "report",
        help="write a run's report.md and plots (loss, learning rate, throughput, token lengths)",
        description="Write report.md and PNG plots into a run folder from its summary.json and metrics.jsonl "
        "(train does this at the end of every run; this rewrites them).",
    )
    report.add_argument("run", metavar="RUN_DIR", help="run folder (holding summary.json and metrics.jsonl)")
    report.set_defaults(handler=cmd_report)

    evaluate = commands.add_parser(
        "evaluate",
        help="the task's metric on the held-out rows, untrained vs trained, as one table",
        description="Run the recipe's task metric (F1/EM for QA, accuracy/F1/AUC for classification, symptom F1 "
        "for the symptoms recipe, MedTuned task scores per subtask…) on its held-out rows. A run folder: the untrained "
        "base ('before'), the run's adapter ('after') and its merged export where there is one ('merged'). A recipe "
        "file: the untrained base. --model (repeatable) adds an adapter folder, a merged export or model folder, or "
        "a Hub id. The table is saved as evaluation.json and evaluation.md in the run folder "
        "(the recipe's output_dir).",
        epilog=OVERRIDES_HELP,
    )
    evaluate.add_argument("target", metavar="RECIPE_OR_RUN", help="recipe YAML file or run folder")
    evaluate.add_argument(
        "--model",
        action="append",
        metavar="PATH_OR_ID",
        help="also evaluate this adapter, model folder or Hub id (repeatable)",
    )
    evaluate.set_defaults(handler=cmd_evaluate)

    generate = commands.add_parser(
        "generate",
        help="generate answers with a trained model, prompts formatted exactly as in training",
        description="Generate with a run (its adapter on the base quantized as trained), an adapter folder, or a "
        "merged export / model folder. Prompts go through the saved chat template, as in training; greedy unless "
        "sampling is asked for. Only the new text is printed.",
    )
    _add_model_arguments(generate)
    generate.add_argument("--prompt", action="append", metavar="TEXT", help="an instruction (repeatable)")
    generate.add_argument(
        "--input-file",
        metavar="FILE.jsonl",
        help="rows with 'instruction' and optional 'input' (a run's recipe columns) or 'messages'; each row is "
        "written back with a 'generation' field",
    )
    generate.add_argument("--output-file", metavar="FILE.jsonl", help="where the rows go (default: stdout)")
    generate.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (default 8)")
    _add_generation_arguments(generate)
    generate.set_defaults(handler=cmd_generate)

    chat = commands.add_parser(
        "chat",
        help="chat with a trained model in the terminal, multi-turn, answers streamed",
        description="Chat with a run, an adapter folder or a model folder: one line per turn; the whole "
        "conversation is re-rendered with the training chat template each turn. /reset clears it, /exit quits.",
    )
    _add_model_arguments(chat)
    _add_generation_arguments(chat)
    chat.set_defaults(handler=cmd_chat)

    plan = commands.add_parser(
        "plan",
        help="predict a recipe's peak training memory from the model's config alone (no weights, no download)",
        description="Predict the peak memory of training a recipe on one device: the model is built on the meta "
        "device from its config (embedded, local folder, Hugging Face cache, or the configs shipped with "
        "qlora-pipeline) and each part of a training step is counted. Without --gpu-memory it plans what would run "
        "on this machine (on a machine without CUDA: float32, no mixed precision, as `train` adapts the recipe). "
        "Exit status: 0 when the plan fits --gpu-memory (or none is given), 1 when it does not, 2 on bad input.",
        epilog=OVERRIDES_HELP,
    )
    plan.add_argument("recipe", help="recipe YAML file")
    plan.add_argument(
        "--gpu-memory",
        metavar="SIZE",
        help="plan for one CUDA GPU of this size (24GiB, 24GB, 16000MiB), with fp16/bf16 and dtype as the recipe and "
        "command line write them (read back from the file: on a machine without CUDA, loading a recipe switches "
        "them off); says whether it fits and the largest per-device batch that does",
    )
    plan.add_argument("--batch-size", metavar="N", help="per-device batch (default: per_device_train_batch_size)")
    plan.add_argument("--max-length", metavar="N", help="tokens per sequence (default: the recipe's max_length)")
    plan.add_argument(
        "--labelled-fraction",
        metavar="F",
        help="share (0-1] of a batch's positions the loss computes logits for: where some row of the batch has a "
        "label (default: measured on the recipe's data where it is local, else 1, an upper bound)",
    )
    plan.add_argument("--json", action="store_true", help="print the plan as JSON (sizes in bytes)")
    plan.set_defaults(handler=cmd_plan)

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

    summary = run(recipe, resume=args.resume, overwrite=args.overwrite, overrides=overrides)
    if recipe.publish:
        publish_run(recipe, summary["run_dir"])
    return 0


def publish_run(recipe, run_dir: str) -> None:
    """push_to_hub: true → merge the new adapter and publish the export, once, from the main process."""
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return
    from qlora_pipeline import merge, publish

    print(f"\n== push_to_hub: merge, then publish to {recipe.training.hub_model_id} ==")
    report = merge.merge(run_dir, overwrite=True)
    publish.publish(
        report["export_dir"],
        recipe.training.hub_model_id,
        private=bool(recipe.training.hub_private_repo),
        revision=recipe.training.hub_revision,
    )


# merge option → the recipe key it overrides
MERGE_OPTIONS = {
    "dtype": "merge_dtype",
    "base_mode": "merge_base_mode",
    "max_shard_size": "merge_max_shard_size",
    "prompts": "merge_fidelity_prompts",
    "max_ppl_increase": "merge_max_ppl_increase",
    "max_logit_diff": "merge_max_logit_diff",
}


def cmd_merge(args, extra: list[str]) -> int:
    if extra:
        raise PipelineError(f"merge: unknown option {extra[0]!r}; see qlora-pipeline merge --help")
    overrides = []
    for option, key in MERGE_OPTIONS.items():
        value = getattr(args, option)
        if value is not None:
            overrides += [f"--{key}", str(value)]
    from qlora_pipeline import merge

    merge.locate(args.run)  # a wrong path is reported before the heavy imports
    _quiet_libraries()
    merge.merge(args.run, overrides, out=args.out, overwrite=args.overwrite)
    return 0


def cmd_preprocess(args, overrides: list[str]) -> int:
    from qlora_pipeline.config import load_recipe

    recipe = load_recipe(args.recipe, overrides)
    _quiet_libraries()
    from qlora_pipeline.train import prepare_data

    prepared = prepare_data(recipe)
    for note in recipe.notes + prepared.notes:
        print(f"note: {note}")
    for record in prepared.skipped or []:  # train writes them to RUN/skipped_rows.jsonl
        where = f"{record['file']}:{record['line']}" if record["line"] else f"{record['file']}: row {record['row']}"
        print(f"skipped: {where}: {record['reason']}")
    tokenizer = prepared.tokenizer
    masked_loss = recipe.training.completion_only_loss is not False
    for index in range(min(args.debug, len(prepared.train.dataset))):
        example = prepared.train.dataset[index]
        if "completion_mask" not in example:  # QA, classification, seq2seq: tokens, then what the loss targets
            _print_task_example(index, example, tokenizer)
            continue
        ids, mask = example["input_ids"], example["completion_mask"]
        print(f"\n--- example {index}: {len(ids)} tokens, {sum(mask) if masked_loss else len(ids)} in the loss ---")
        print(f"{'pos':>5}  {'id':>6}  {'token':<24} label")
        for position, (token_id, in_loss) in enumerate(zip(ids, mask)):
            token = repr(tokenizer.convert_ids_to_tokens(token_id))
            label = str(token_id) if (in_loss or not masked_loss) else "-100 (masked)"
            print(f"{position:>5}  {token_id:>6}  {token:<24} {label}")
    print("\n== token lengths (prompt + answer, before truncation) ==")
    max_length = recipe.training.max_length
    policy = {"drop": "dropped", "truncate": "truncated", "error": "an error"}[recipe.data.overlong]
    print(f"max_length {max_length}, examples over it are {policy}")
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
    if prepared.accounting:  # every row read is accounted for
        rows = {"train": prepared.train.rows_in, "eval": prepared.eval.rows_in if prepared.eval else 0}
        print(
            f"rows  read {prepared.accounting['rows_read']} = train {rows['train']} + eval {rows['eval']} + skipped "
            f"{prepared.accounting['skipped']} + unused {prepared.accounting['unused']} (past max_train/eval_samples)"
        )
    return 0


def _print_task_example(index: int, example: dict, tokenizer) -> None:
    ids = example["input_ids"]
    print(f"\n--- example {index}: {len(ids)} tokens ---")
    print(f"{'pos':>5}  {'id':>6}  token")
    for position, token_id in enumerate(ids):
        print(f"{position:>5}  {token_id:>6}  {tokenizer.convert_ids_to_tokens(token_id)!r}")
    for key, value in example.items():
        if key in ("input_ids", "attention_mask", "token_type_ids", "n_tokens"):
            continue
        if key == "labels" and isinstance(value, list):  # seq2seq targets
            value = f"{value} = {tokenizer.decode([t for t in value if t >= 0])!r}"
        elif key in ("start_positions", "end_positions") and isinstance(value, int):
            value = f"{value} ({tokenizer.convert_ids_to_tokens(ids[value])!r})"
        print(f"{key}: {value}")


def cmd_publish(args, extra: list[str]) -> int:
    from pathlib import Path

    if extra:
        raise PipelineError(f"publish: unknown option {extra[0]!r}; see qlora-pipeline publish --help")
    from qlora_pipeline.publish import publish

    publish(
        Path(args.folder),
        args.repo_id,
        private=args.private,
        revision=args.revision,
        adapter_only=args.adapter_only,
        dry_run=args.dry_run,
    )
    return 0


def cmd_report(args, extra: list[str]) -> int:
    from pathlib import Path

    if extra:
        raise PipelineError(f"report: unknown option {extra[0]!r}; see qlora-pipeline report --help")
    from qlora_pipeline.report import PLOTS, write_report

    report = write_report(Path(args.run))
    print(f"report: {report}")
    for name in PLOTS:
        if (report.parent / name).is_file():
            print(f"plot:   {report.parent / name}")
    return 0


def cmd_evaluate(args, overrides: list[str]) -> int:
    from qlora_pipeline.evaluate import evaluate

    _quiet_libraries()
    evaluate(args.target, model=args.model, overrides=overrides)
    return 0


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        metavar="MODEL_OR_RUN",
        help="run folder (adapter as trained), adapter folder, or merged export / model folder",
    )
    parser.add_argument("--merged", action="store_true", help="use the run's merged export (RUN/merged)")


def _add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens (default 256)")
    parser.add_argument("--temperature", type=float, help="sampling temperature (implies --do-sample)")
    parser.add_argument("--top-p", type=float, help="nucleus sampling share (implies --do-sample)")
    parser.add_argument("--top-k", type=int, help="sample among the k likeliest tokens (implies --do-sample)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--do-sample", dest="do_sample", action="store_true", default=None, help="sample (default: greedy)"
    )
    mode.add_argument("--greedy", dest="do_sample", action="store_false", help="always the likeliest token (default)")
    parser.add_argument("--seed", type=int, help="random seed, for reproducible sampling")
    parser.add_argument("--show-prompt", action="store_true", help="print each prompt's text and token ids to stderr")


def _generation_options(args):
    from qlora_pipeline.infer import GenerationOptions

    return GenerationOptions(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )


def cmd_generate(args, extra: list[str]) -> int:
    if extra:
        raise PipelineError(f"generate: unknown option {extra[0]!r}; see qlora-pipeline generate --help")
    from qlora_pipeline import infer

    _quiet_libraries()
    return infer.run_generate(
        args.model,
        prompts=args.prompt,
        input_file=args.input_file,
        output_file=args.output_file,
        options=_generation_options(args),
        batch_size=args.batch_size,
        merged=args.merged,
        show_prompt=args.show_prompt,
    )


def cmd_chat(args, extra: list[str]) -> int:
    if extra:
        raise PipelineError(f"chat: unknown option {extra[0]!r}; see qlora-pipeline chat --help")
    from qlora_pipeline import infer

    _quiet_libraries()
    return infer.run_chat(
        args.model, options=_generation_options(args), merged=args.merged, show_prompt=args.show_prompt
    )


def cmd_plan(args, overrides: list[str]) -> int:
    """Print the memory plan; exit 1 if it does not fit --gpu-memory."""
    import json

    from qlora_pipeline import plan
    from qlora_pipeline.config import load_recipe

    budget = plan.parse_size(args.gpu_memory) if args.gpu_memory is not None else None
    batch_size = _positive_int("--batch-size", args.batch_size)
    max_length = _positive_int("--max-length", args.max_length)
    fraction = _fraction("--labelled-fraction", args.labelled_fraction)
    recipe = load_recipe(args.recipe, overrides)
    if recipe.task.task != "causal_lm":
        raise PipelineError(
            f"{args.recipe}: plan models causal-LM recipes; task '{recipe.task.task}' is not modelled (its recipe "
            "page in docs/ gives measured memory)"
        )
    _quiet_libraries()
    device = "cuda" if budget is not None else plan.this_machine()
    facts = plan.model_facts(recipe, plan.precision_for(recipe, device))
    shape = {"max_length": max_length, "labelled_fraction": fraction}
    result = plan.plan_from_facts(facts, recipe, batch_size=batch_size, **shape)
    largest = plan.largest_batch_size(facts, recipe, budget, **shape) if budget is not None else None
    fits = budget is None or result.total <= budget
    if args.json:
        values = result.to_dict()
        if budget is not None:
            values.update(gpu_memory=budget, fits=fits, largest_batch_size=largest)
        print(json.dumps(values, indent=2))
    else:
        print(f"== qlora-pipeline plan: {args.recipe} ==")
        print(plan.format_plan(result, budget, largest))
    return 0 if fits else 1


def _fraction(option: str, text: str | None) -> float | None:
    """An option's value as a share in (0, 1] (None if not given); anything else is a one-line error."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 1:
        raise PipelineError(f"{option}: {text!r} is not a share between 0 (excluded) and 1")
    return value


def _positive_int(option: str, text: str | None) -> int | None:
    """An option's value as a positive integer (None if not given); anything else is a one-line error."""
    if text is None:
        return None
    if not text.strip().isdigit() or int(text) < 1:
        raise PipelineError(f"{option}: {text!r} is not a positive whole number")
    return int(text)


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
