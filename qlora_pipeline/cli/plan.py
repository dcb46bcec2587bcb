"""`qlora-pipeline plan`: the memory plan of a recipe printed (or as JSON), and whether it fits --gpu-memory."""

from __future__ import annotations

from qlora_pipeline.errors import PipelineError


def plan(args, overrides: list[str]) -> int:
    """Print the memory plan (with the settings a recipe's `auto` keys will take); exit 1 if it does not fit
    --gpu-memory, or nothing fits the budget `auto` chooses against."""
    import contextlib
    import json
    import sys

    from qlora_pipeline import plan as planner
    from qlora_pipeline.plan import choose
    from qlora_pipeline.recipe import load_recipe

    budget = planner.parse_size(args.gpu_memory) if args.gpu_memory is not None else None
    batch_size = _positive_int("--batch-size", args.batch_size)
    max_length = _positive_int("--max-length", args.max_length)
    fraction = _fraction("--labelled-fraction", args.labelled_fraction)
    # Libraries print on import (transformers' W&B integration under WANDB_MODE=offline): JSON output stays JSON.
    with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):
        recipe = load_recipe(args.recipe, overrides)
        if recipe.task.task != "causal_lm":
            raise PipelineError(
                f"{args.recipe}: plan models causal-LM recipes; task '{recipe.task.task}' is not modelled (its "
                "recipe page in docs/ gives measured memory)"
            )
        device = "cuda" if budget is not None else planner.this_machine()
        facts = planner.model_facts(recipe, planner.precision_for(recipe, device))
        choice = None
        if recipe.auto:  # what train will choose at its start, on this device and budget
            choice = choose.choose(recipe, device=device, budget=budget, strict=False, facts=facts)
            choose.apply(recipe, choice)
        shape = {"max_length": max_length, "labelled_fraction": fraction}
        result = planner.plan_from_facts(facts, recipe, batch_size=batch_size, **shape)
        largest = planner.largest_batch_size(facts, recipe, budget, **shape) if budget is not None else None
    fits = (budget is None or result.total <= budget) and (choice is None or choice.fits)
    if args.json:
        values = result.to_dict()
        if budget is not None:
            values.update(gpu_memory=budget, fits=fits, largest_batch_size=largest)
        if choice is not None:
            values.update(auto_settings=choice.to_dict(), fits=fits)
        print(json.dumps(values, indent=2))
    else:
        print(f"== qlora-pipeline plan: {args.recipe} ==")
        if choice is not None:
            print(choice.describe())
        print(planner.format_plan(result, budget, largest))
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
