"""`ift eval RUN_DIR|RECIPE`: accuracy and ROUGE on a split, for a run's fine-tuned model or the untuned base.

Each call appends an evaluation record to RUN_DIR/metrics.json (`evaluations`: which weights, split, rows,
limit, dtype, quantization, when) and writes its predictions to RUN_DIR/predictions/<record id>.jsonl; the
training run's own figures (`validation`, `test`) are never changed. `--compare` prints base vs fine-tuned.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ift.evaluation.compare import fmt as _fmt
from ift.evaluation.compare import print_compare
from ift.errors import IftError
from ift.run import RunDir

SPLITS = ("validation", "test")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="evaluate a run's final model (or the base model) on a split; compare base vs fine-tuned",
        description="Given a run directory, evaluate its final model; given a recipe (or --base), the untuned "
                    "base model. Overrides (key.path=value) may come before or after the options.",
    )
    p.add_argument("target", nargs="?", metavar="RUN_DIR|RECIPE", help="run directory (recipe.yaml + final/) or recipe")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="override recipe keys")
    p.add_argument("--split", choices=SPLITS, default="test", help="split to evaluate (default: test)")
    p.add_argument("--base", action="store_true", help="evaluate the untuned base model of the run's recipe")
    p.add_argument("--limit", type=_positive, metavar="N",
                   help="evaluate N rows spread evenly over the split (the same subset every time)")
    p.add_argument("--batch-size", type=_positive, metavar="N", help="rows per forward pass (default: recipe)")
    p.add_argument("--compare", nargs="?", const="", metavar="RUN_DIR",
                   help="print base vs fine-tuned from RUN_DIR/metrics.json (no evaluation)")
    p.add_argument("--benchmarks", nargs="*", metavar="TASK",
                   help="run lm-eval tasks (names or task YAML files; none given: the recipe's "
                        "evaluation.benchmarks) on the base and the fine-tuned model with identical settings; "
                        "--limit caps the rows per task; writes metrics.json's benchmarks section")
    p.set_defaults(func=run)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def run(args: argparse.Namespace) -> int:
    if args.compare is not None:
        target = args.compare or args.target
        if not target:
            raise IftError("--compare needs a run directory", "ift eval", "ift eval --compare runs/my-run")
        print_compare(Path(target), args.split)
        return 0
    if not args.target:
        raise IftError("no run directory or recipe given", "ift eval", "ift eval runs/my-run [--split test] [--base]")
    if args.benchmarks is not None:
        return run_benchmarks(args)
    recipe, run_dir, tuned = resolve(Path(args.target), args.overrides, args.base)
    rows = load_rows(recipe, args.split)  # data problems surface before a model loads
    loaded = load_model(recipe, run_dir, tuned)

    from ift.evaluation.evaluate import evaluate, write_predictions
    from ift.run import RunDir
    from ift.training.precision import evaluation_autocast, precision_record, runnable_precision

    # the run's weights dtype (load_final) and its autocast, as its own test evaluation ran
    device = next(loaded.model.parameters()).device.type
    recipe, why = runnable_precision(recipe, device)
    if why:
        print(f"note: {why}: evaluating without autocast", flush=True)
    mixed = recipe.training.mixed_precision
    label = f"{'' if tuned else 'base '}{args.split}"
    began = time.perf_counter()
    with evaluation_autocast(mixed, device):
        metrics, predictions = evaluate(loaded.model, loaded.tokenizer, loaded.kind, rows, recipe.evaluation,
                                        chat_template=recipe.data.wraps_pairs, batch_size=args.batch_size,
                                        limit=args.limit, desc=label)
    seconds = time.perf_counter() - began
    rd = RunDir(run_dir)
    four_bit = tuned and recipe.adapter.method == "qlora"
    model = "fine-tuned" if tuned else "base"
    n = len(rd.metrics().get("evaluations") or []) + 1
    pred_path = rd.predictions(f"ift-eval-{model}-{args.split}-{n}")
    write_predictions(pred_path, predictions)
    record = rd.add_evaluation(model=model, split=args.split, metrics=metrics, rows=len(predictions),
                               limit=args.limit if args.limit and args.limit < len(rows) else None, weights=str(rd.final) if tuned else loaded.source,
                               dtype=precision_record(loaded.model, mixed),
                               quantization=recipe.adapter.quant_type if four_bit else None,
                               predictions=pred_path, by="ift-eval")
    _print_metrics(label, metrics, seconds)
    print(f"wrote evaluation record {record['id']} to {rd.metrics_file} and {pred_path}")
    return 0


def run_benchmarks(args: argparse.Namespace) -> int:
    """lm-eval tasks on a finished run's fine-tuned model and its base; the section replaces the previous one."""
    from ift.evaluation.benchmarks import base_and_fine_tuned
    from ift.evaluation.compare import print_benchmarks
    from ift.run import RunDir
    from ift.training.precision import evaluation_autocast, runnable_precision

    if args.base:
        raise IftError("--benchmarks runs both models; --base does not apply", "ift eval",
                       f"ift eval {args.target} --benchmarks [TASK ...]")
    recipe, run_dir, _ = resolve(Path(args.target), args.overrides, False)
    entries = list(args.benchmarks) or list(recipe.evaluation.benchmarks)
    if not entries:
        raise IftError("no benchmarks to run", "evaluation.benchmarks",
                       "name lm-eval tasks or task YAML files after --benchmarks, or list them in the recipe")
    # the task files are checked where they are read (ift.evaluation.benchmarks.run_tasks)
    cfg = recipe.evaluation.model_copy(update={
        "benchmarks": entries, "benchmark_limit": args.limit or recipe.evaluation.benchmark_limit,
        "batch_size": args.batch_size or recipe.evaluation.batch_size})
    loaded = load_model(recipe, run_dir, True)
    device = next(loaded.model.parameters()).device.type
    recipe, why = runnable_precision(recipe, device)
    if why:
        print(f"note: {why}: evaluating without autocast", flush=True)
    with evaluation_autocast(recipe.training.mixed_precision, device):
        section = base_and_fine_tuned(loaded.model, loaded.tokenizer, loaded.kind, cfg,
                                      load_base=lambda: load_model(recipe, run_dir, False).model)
    rd = RunDir(run_dir)
    data = rd.metrics() if rd.metrics_file.is_file() else {}
    data["benchmarks"] = section
    rd.write_json(rd.metrics_file, data)
    print_benchmarks(run_dir)
    print(f"wrote the benchmarks section of {rd.metrics_file}")
    return 0


def resolve(target: Path, overrides: list[str], base: bool):
    """(recipe, run directory, whether the fine-tuned model is evaluated)."""
    from ift.recipe import load_recipe

    if target.is_dir():
        recipe_file = RunDir(target).recipe
        if not recipe_file.is_file():
            raise IftError(f"{target} is not a run directory (no recipe.yaml)", str(target),
                           "give a directory written by `ift train`, or a recipe file")
        recipe = load_recipe(recipe_file, overrides)
        if not base and not RunDir(target).final.is_dir():
            raise IftError("the run has no final model", str(RunDir(target).final),
                           "let training finish (it writes final/), or evaluate the base model with --base")
        return recipe, target, not base
    if target.is_file():
        recipe = load_recipe(target, overrides)
        return recipe, Path(recipe.training.output_dir), False
    raise IftError(f"no such run directory or recipe: {target}", "ift eval", "check the path")


def load_rows(recipe, split: str):
    from ift.data.prepare import build_splits
    from ift.templates.library import TemplateLibrary

    prepared = build_splits(recipe.data, TemplateLibrary(dirs=tuple(recipe.data.templates_dir)))
    splits = prepared.splits
    if split not in splits or splits[split] is None or len(splits[split]) == 0:
        raise IftError(f"the {split} split is empty", "data", f"give the sources a {split} split or set "
                       f"data.{split}_size to carve one from train")
    return splits[split]


def load_model(recipe, run_dir: Path, tuned: bool):
    from ift.modeling.final import load_final
    from ift.modeling.loading import load
    from ift.recipe import AdapterConfig

    # a QLoRA adapter is evaluated on the 4-bit base it was trained on
    loaded = load_final(RunDir(run_dir).final, recipe.model, adapter=recipe.adapter) if tuned \
        else load(recipe.model, AdapterConfig())
    if not tuned:  # the base answers in the chat template the run trained with (final/ keeps its own copy)
        from ift.inference.target import apply_run_chat_template

        apply_run_chat_template(loaded, recipe)
    _to_accelerator(loaded.model)
    return loaded


def _to_accelerator(model) -> None:
    """Use a GPU when there is one; quantized models are already placed by their loader."""
    import torch

    if torch.cuda.is_available() and not getattr(model, "is_quantized", False) \
            and not getattr(model, "is_loaded_in_4bit", False) and next(model.parameters()).device.type == "cpu":
        model.to("cuda")




def _print_metrics(label: str, metrics: dict, seconds: float) -> None:
    from rich.console import Console
    from rich.table import Table

    names = [k for k, v in metrics.items() if isinstance(v, (int, float)) and k != "n"]
    table = Table(title=f"{label}: {metrics.get('n', 0)} rows, {seconds:.1f} s")
    table.add_column("group")
    for name in names + ["n"]:
        table.add_column(name, justify="right")
    table.add_row("all", *(_fmt(metrics.get(k)) for k in names + ["n"]))
    for key in ("by_source", "by_template"):
        groups = metrics.get(key) or {}
        if len(groups) > 1:
            for group, figures in groups.items():
                table.add_row(f"{key[3:]}: {group}", *(_fmt(figures.get(k)) for k in names + ["n"]))
    Console().print(table)
