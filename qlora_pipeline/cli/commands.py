"""The commands that run a stage: train (and push_to_hub), merge, publish, report, evaluate, generate, chat, keys.
Each imports its stage only when it runs, so `--help` stays instant."""

from __future__ import annotations


def train(args, overrides: list[str]) -> int:
    from qlora_pipeline.recipe import load_recipe

    recipe = load_recipe(args.recipe, overrides)
    from qlora_pipeline.stages.train import run

    summary = run(recipe, resume=args.resume, overwrite=args.overwrite, overrides=overrides)
    if recipe.publish:
        publish_run(recipe, summary["run_dir"])
    return 0


def publish_run(recipe, run_dir: str) -> None:
    """push_to_hub: true → merge the new adapter and publish the export, once, from the main process."""
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return
    from qlora_pipeline.stages.merge import merge as merge_run
    from qlora_pipeline.stages.publish import publish as upload

    print(f"\n== push_to_hub: merge, then publish to {recipe.training.hub_model_id} ==")
    report = merge_run(run_dir, overwrite=True)
    upload(
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


def merge(args, extra: list[str]) -> int:
    overrides = []
    for option, key in MERGE_OPTIONS.items():
        value = getattr(args, option)
        if value is not None:
            overrides += [f"--{key}", str(value)]
    from qlora_pipeline.model.adapters import locate

    source = locate(args.run)  # a wrong path is reported before the heavy imports
    from qlora_pipeline.recipe import load_recipe
    from qlora_pipeline.stages.merge import export_folder
    from qlora_pipeline.stages.merge import merge as merge_run

    recipe = load_recipe(source.recipe_path, overrides)
    gguf = None
    if recipe.export.gguf_quant_types:  # GGUF files in the same step: the request is checked before the merge
        from qlora_pipeline.stages import export_gguf as gguf_stage

        export_dir = export_folder(source, recipe, args.out)
        gguf = gguf_stage.check_request(export_dir, source.recipe_path, None, None, args.overwrite, overrides)
    merge_run(args.run, overrides, out=args.out, overwrite=args.overwrite)
    if gguf is not None:
        print(f"\n== gguf_quant_types: {', '.join(gguf.types)} ==")
        gguf_stage.export_gguf(gguf)
    return 0


def export_gguf(args, extra: list[str]) -> int:
    """GGUF files from a run's merged export; a run without one is merged first (with the recipe's settings)."""
    from qlora_pipeline.local_runtimes.requirements import require_gguf_packages
    from qlora_pipeline.stages import export_gguf as gguf_stage

    require_gguf_packages()  # before anything else: the plain install lacks the extra
    overrides = [*extra, *(["--merge_fidelity_prompts", str(args.prompts)] if args.prompts is not None else [])]
    export_dir, recipe_path = gguf_stage.locate_export(args.run)
    request = gguf_stage.check_request(export_dir, recipe_path, args.quant, args.out, args.overwrite, overrides)
    if not (export_dir / "config.json").is_file():
        from qlora_pipeline.stages.merge import merge as merge_run

        print(f"== {args.run} has no merged export: merging first ==")
        merge_run(args.run, overrides)
    gguf_stage.export_gguf(request)
    return 0


def publish(args, extra: list[str]) -> int:
    from pathlib import Path

    from qlora_pipeline.stages.publish import publish as upload

    upload(
        Path(args.folder),
        args.repo_id,
        private=args.private,
        revision=args.revision,
        adapter_only=args.adapter_only,
        dry_run=args.dry_run,
    )
    return 0


def report(args, extra: list[str]) -> int:
    from pathlib import Path

    from qlora_pipeline.outputs.report import PLOTS, write_report

    written = write_report(Path(args.run))
    print(f"report: {written}")
    for name in PLOTS:
        if (written.parent / name).is_file():
            print(f"plot:   {written.parent / name}")
    return 0


def evaluate(args, overrides: list[str]) -> int:
    from qlora_pipeline.stages.evaluate import evaluate as evaluate_models

    evaluate_models(args.target, model=args.model, overrides=overrides)
    return 0


def generation_options(args):
    from qlora_pipeline.stages.infer import GenerationOptions

    return GenerationOptions(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )


def generate(args, extra: list[str]) -> int:
    from qlora_pipeline.stages import infer

    return infer.run_generate(
        args.model,
        prompts=args.prompt,
        input_file=args.input_file,
        output_file=args.output_file,
        options=generation_options(args),
        batch_size=args.batch_size,
        merged=args.merged,
        show_prompt=args.show_prompt,
    )


def chat(args, extra: list[str]) -> int:
    from qlora_pipeline.stages import infer

    return infer.run_chat(
        args.model, options=generation_options(args), merged=args.merged, show_prompt=args.show_prompt
    )


def keys(args, extra: list[str]) -> int:
    import dataclasses

    from qlora_pipeline.recipe.load import parser_classes

    for cls in parser_classes():
        print(f"\n# {cls.__name__}")
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            default = f.default if f.default is not dataclasses.MISSING else "(computed)"
            help_text = " ".join(str(f.metadata.get("help", "")).split())
            print(f"{f.name}: {default!r}  {help_text[:160]}")
    return 0
