"""The command line's grammar: every subcommand, its options and help, in one parser. The commands themselves are
in commands.py (and preprocess.py, plan.py), under the subcommand's name. A subcommand that takes recipe overrides
(`--key value` after the recipe, checked by the recipe loader) says so with `takes_overrides`; any other option it
does not know is refused by `main`."""

from __future__ import annotations

import argparse

from qlora_pipeline import __version__
from qlora_pipeline.cli.spelling import ArgumentParser, both_spellings

OVERRIDES_HELP = (
    "Any recipe key can be overridden after the recipe as --key value (e.g. --learning_rate 1e-4 --max_steps 20); "
    "command-line values beat the recipe. 'qlora-pipeline keys' lists every key."
)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
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
    train.set_defaults(takes_overrides=True)

    preprocess = commands.add_parser(
        "preprocess",
        help="check and tokenize a recipe's data without loading the model",
        description="Load, check and tokenize the recipe's data; print examples and length statistics.",
        epilog=OVERRIDES_HELP,
    )
    preprocess.add_argument("recipe", help="recipe YAML file")
    preprocess.add_argument("--debug", type=int, default=0, metavar="N", help="print N examples token by token")
    preprocess.set_defaults(takes_overrides=True)

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

    gguf = commands.add_parser(
        "export-gguf",
        help="write GGUF files for llama.cpp and Ollama from a merged export, each checked by llama.cpp",
        description="Write GGUF files (one per type) and an Ollama Modelfile from a run's merged export (merging "
        "first when the run has none), then check every file in llama.cpp against the export: tokenization token "
        "for token, logits, perplexity and greedy generations. Needs pip install 'qlora-pipeline[gguf]'.",
    )
    gguf.add_argument("run", help="run folder (its merged/ export; merged first if missing) or merged export folder")
    gguf.add_argument(
        "--quant",
        help="comma-separated GGUF types, e.g. f16,q8_0,q4_k_m (default: the recipe's gguf_quant_types, else f16)",
    )
    gguf.add_argument("--out", help="folder for the files (default: RUN/gguf, or the recipe's gguf_output_dir)")
    gguf.add_argument("--prompts", type=int, help="held-out examples in the llama.cpp check (default 8)")
    gguf.add_argument("--overwrite", action="store_true", help="replace an existing GGUF folder")
    gguf.set_defaults(takes_overrides=True)  # --gguf_* recipe keys, e.g. --gguf_quantized_max_ppl_increase 0.05

    publish = commands.add_parser(
        "publish",
        help="upload a merged export, a GGUF folder (or a LoRA adapter) to the Hugging Face Hub",
        description="Check a merged export, a GGUF folder from export-gguf (publish it to a sibling repo, e.g. "
        "OWNER/NAME-GGUF) or, with --adapter-only, a LoRA adapter offline, then upload it to the "
        "Hub. The token comes from HF_TOKEN or `hf auth login`. Exit 3: the Hub could not be reached or refused "
        "the upload; the folder is untouched and the same command publishes it again.",
    )
    publish.add_argument(
        "folder",
        metavar="DIR",
        help="merged export, GGUF folder, adapter folder, or run folder (its merged/, or adapter/ with --adapter-only)",
    )
    publish.add_argument("--repo-id", required=True, metavar="OWNER/NAME", help="Hub repo (created if missing)")
    publish.add_argument(
        "--private", action="store_true", help="create the repo private (an existing repo keeps its visibility)"
    )
    publish.add_argument("--adapter-only", action="store_true", help="publish the LoRA adapter, not the merged model")
    publish.add_argument("--revision", metavar="BRANCH", help="branch to commit to (created if missing); default main")
    publish.add_argument("--dry-run", action="store_true", help="check and list what would be uploaded; send nothing")

    report = commands.add_parser(
        "report",
        help="write a run's report.md and plots (loss, learning rate, throughput, token lengths)",
        description="Write report.md and PNG plots into a run folder from its summary.json and metrics.jsonl "
        "(train does this at the end of every run; this rewrites them).",
    )
    report.add_argument("run", metavar="RUN_DIR", help="run folder (holding summary.json and metrics.jsonl)")

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
    evaluate.set_defaults(takes_overrides=True)

    generate = commands.add_parser(
        "generate",
        help="generate answers with a trained model, prompts formatted exactly as in training",
        description="Generate with a run (its adapter on the base quantized as trained), an adapter folder, or a "
        "merged export / model folder. Prompts go through the saved chat template, as in training; greedy unless "
        "sampling is asked for. Only the new text is printed.",
    )
    add_model_arguments(generate)
    generate.add_argument("--prompt", action="append", metavar="TEXT", help="an instruction (repeatable)")
    generate.add_argument(
        "--input-file",
        metavar="FILE.jsonl",
        help="rows with 'instruction' and optional 'input' (a run's recipe columns) or 'messages'; each row is "
        "written back with a 'generation' field",
    )
    generate.add_argument("--output-file", metavar="FILE.jsonl", help="where the rows go (default: stdout)")
    generate.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (default 8)")
    add_generation_arguments(generate)

    chat = commands.add_parser(
        "chat",
        help="chat with a trained model in the terminal, multi-turn, answers streamed",
        description="Chat with a run, an adapter folder or a model folder: one line per turn; the whole "
        "conversation is re-rendered with the training chat template each turn. /reset clears it, /exit quits.",
    )
    add_model_arguments(chat)
    add_generation_arguments(chat)

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
    plan.set_defaults(takes_overrides=True)

    commands.add_parser("keys", help="list every recipe key with its type, default and help")
    return parser


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        metavar="MODEL_OR_RUN",
        help="run folder (adapter as trained), adapter folder, or merged export / model folder",
    )
    parser.add_argument("--merged", action="store_true", help="use the run's merged export (RUN/merged)")


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens (default 256)")
    parser.add_argument("--temperature", type=float, help="sampling temperature (implies --do-sample)")
    parser.add_argument("--top-p", type=float, help="nucleus sampling share (implies --do-sample)")
    parser.add_argument("--top-k", type=int, help="sample among the k likeliest tokens (implies --do-sample)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        *both_spellings(("--do-sample",)),
        dest="do_sample",
        action="store_true",
        default=None,
        help="sample (default: greedy)",
    )
    mode.add_argument("--greedy", dest="do_sample", action="store_false", help="always the likeliest token (default)")
    parser.add_argument("--seed", type=int, help="random seed, for reproducible sampling")
    parser.add_argument("--show-prompt", action="store_true", help="print each prompt's text and token ids to stderr")
