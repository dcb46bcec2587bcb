"""`qlora-pipeline preprocess`: the recipe's data checked and tokenized without the model, shown example by example
(token, id, label) and as length statistics, with every row read accounted for."""

from __future__ import annotations

from qlora_pipeline.data.checks import listing
from qlora_pipeline.outputs import sources_table


def preprocess(args, overrides: list[str]) -> int:
    from qlora_pipeline.recipe import load_recipe

    recipe = load_recipe(args.recipe, overrides)
    from qlora_pipeline.tasks import prepare_data

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
            print_task_example(index, example, tokenizer)
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
    accounting = prepared.accounting or {}
    if "sources" in accounting:  # a mixture: every source's rows accounted for
        data = prepared.data_summary()
        used = sum(counts["train"] for counts in accounting["sources"].values())
        eval_rows = prepared.eval.rows_in if prepared.eval else 0
        print("\n== sources (rows read = train + eval + skipped + unused; draws: training examples drawn) ==")
        for line in sources_table.text_table(data):
            print(line)
        print(
            f"rows  read {accounting['rows_read']} = train {used} + eval {eval_rows} + skipped "
            f"{accounting['skipped']} + unused {accounting['unused']} (not drawn, or past max_train/eval_samples)"
        )
    elif accounting:  # every row read is accounted for
        rows = {"train": prepared.train.rows_in, "eval": prepared.eval.rows_in if prepared.eval else 0}
        print(
            f"rows  read {accounting['rows_read']} = train {rows['train']} + eval {rows['eval']} + skipped "
            f"{accounting['skipped']} + unused {accounting['unused']} (past max_train/eval_samples)"
        )
    for fix, count in accounting.get("repaired", {}).items():
        print(f"repaired {count} ({fix}; kept, listed in the run's repaired_rows.jsonl)")
    print_checks(prepared.checks)
    return 0


def print_checks(checks) -> None:
    """What the data checks found, the first findings of each kind with file and line (train writes them all to
    the run's data_checks.json)."""
    if checks is None:
        return
    print(
        f"\n== data checks: {checks.train_rows} training rows, {checks.eval_rows} held out ==\n"
        f"duplicates {len(checks.duplicates)} (copy = first)  train/eval overlap {len(checks.overlaps)} "
        f"(training row = held-out row)  left out {len(checks.dropped)}"
    )
    for title, found in (("duplicates", checks.duplicates), ("train/eval overlap", checks.overlaps)):
        if found:
            print(f"{title}:\n{listing(found)}")


def print_task_example(index: int, example: dict, tokenizer) -> None:
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
