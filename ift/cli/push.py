"""`ift push RUN_DIR --repo-id ID`: publish a run's weights, tokenizer, model card and plots to the Hub
(and with --dataset, the prepared splits as a dataset repo with a dataset card)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ift.run import RunDir


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "push", help="upload a run (adapter or merged model, tokenizer, card, plots) to the Hugging Face Hub",
        description="Create the model repo if needed and upload, in one commit, the weights (adapter, merged or "
                    "full model; safetensors only), the tokenizer, the model card (README.md, written afresh) and "
                    "plots/*.png; files of an earlier push that this one lacks are deleted in the same commit. An "
                    "adapter's config names its base by Hub id (model.hub_id, the Hub id in model.name_or_path, or "
                    "a GGUF's metadata). The token comes from HF_TOKEN or `hf auth login` and is never printed.")
    p.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="the run folder (training.output_dir)")
    p.add_argument("--repo-id", metavar="ID", help="your-name/model-name (default: hub.repo_id of the run's recipe)")
    p.add_argument("--private", action="store_true", help="create the repo (and the --dataset repo) as private")
    p.add_argument("--merge", action="store_true",
                   help="upload the adapter merged into its base, in the base's dtype (runs `ift merge` if needed)")
    p.add_argument("--revision", metavar="REV", help="branch to push to (created if missing; default main)")
    p.add_argument("--message", metavar="MSG", help="commit message (default: 'Upload <model> fine-tuned with ift')")
    p.add_argument("--dry-run", action="store_true", help="list the files and sizes that would be uploaded; no network "
                   "(the card is still written, and --merge still merges, locally)")
    p.add_argument("--dataset", metavar="ID", nargs="?", const="",
                   help="also push the prepared splits as dataset repo ID (default: hub.push_dataset of the recipe), "
                        "with a dataset card: sources, templates, rows per split, carved splits, leaks, mixture. The "
                        "splits are rebuilt from the run's recipe.yaml (the rows it trained on, while the sources are "
                        "unchanged); with --dry-run they are listed, not pushed")
    p.add_argument("--out", metavar="DIR", type=Path,
                   help="with --dry-run: also write those files to DIR, the repo as it would be on the Hub "
                        "(from_pretrained(DIR) loads it; an earlier copy there is replaced)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ift.errors import IftError
    from ift.publish.hub import push
    from ift.publish.merge import load_run_recipe

    recipe = load_run_recipe(args.run_dir)
    repo_id = args.repo_id or recipe.hub.repo_id
    if not repo_id:
        raise IftError("no repo id given", str(args.run_dir), "pass --repo-id your-name/model-name")
    dataset_id = None
    if args.dataset is not None:  # checked before the model push, so a bad id wastes no upload
        from ift.publish.hub import check_dataset_repo_id

        dataset_id = args.dataset or recipe.hub.push_dataset
        if not dataset_id:
            raise IftError("no dataset repo id given", "--dataset",
                           "pass --dataset your-name/dataset-name, or set hub.push_dataset in the recipe")
        dataset_id = check_dataset_repo_id(dataset_id)
    result = push(args.run_dir, repo_id, private=args.private, merge=args.merge, revision=args.revision,
                  commit_message=args.message, dry_run=args.dry_run, report=_progress, out=args.out)
    print(result if args.dry_run else f"pushed: {result}")
    if dataset_id:
        result = _push_dataset(args, recipe, dataset_id)
        print(result if args.dry_run else f"pushed the prepared splits: {result}")
    return 0


def _push_dataset(args: argparse.Namespace, recipe, dataset_id: str) -> str:
    """Rebuild the run's splits from its recipe (carved splits pinned, same seed: the same rows) and push them."""
    import json

    from ift.data.prepare import build_splits
    from ift.publish.hub import push_dataset
    from ift.templates.library import TemplateLibrary

    _progress("rebuilding the prepared splits from the run's recipe.yaml")
    prepared = build_splits(recipe.data, TemplateLibrary(dirs=tuple(recipe.data.templates_dir)))
    try:  # training's own split report: a source changed since then gives other rows
        saved = json.loads(RunDir(args.run_dir).data_report.read_text())["splits"]["splits"]
        trained = {split: saved[split]["rows"] for split in saved}
    except (OSError, ValueError, KeyError, TypeError):
        trained = None
    rebuilt = {split: len(ds) for split, ds in prepared.splits.items()}
    if trained is not None and trained != rebuilt:
        _progress(f"warning: the rebuilt splits have {rebuilt} rows, training had {trained}: a source changed "
                  "since the run; the dataset card describes the rebuilt rows")
    return push_dataset(prepared, recipe, dataset_id, private=args.private, dry_run=args.dry_run, report=_progress)


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
