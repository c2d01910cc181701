"""`ift push RUN_DIR --repo-id ID`: publish a run's weights, tokenizer, model card and plots to the Hub."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


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
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--merge", action="store_true",
                   help="upload the adapter merged into its base, in the base's dtype (runs `ift merge` if needed)")
    p.add_argument("--revision", metavar="REV", help="branch to push to (created if missing; default main)")
    p.add_argument("--message", metavar="MSG", help="commit message (default: 'Upload <model> fine-tuned with ift')")
    p.add_argument("--dry-run", action="store_true", help="list the files and sizes that would be uploaded; no network "
                   "(the card is still written, and --merge still merges, locally)")
    p.add_argument("--out", metavar="DIR", type=Path,
                   help="with --dry-run: also write those files to DIR, the repo as it would be on the Hub "
                        "(from_pretrained(DIR) loads it; an earlier copy there is replaced)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ift.errors import IftError
    from ift.hub import push
    from ift.merge import load_run_recipe

    repo_id = args.repo_id or load_run_recipe(args.run_dir).hub.repo_id
    if not repo_id:
        raise IftError("no repo id given", str(args.run_dir), "pass --repo-id your-name/model-name")
    result = push(args.run_dir, repo_id, private=args.private, merge=args.merge, revision=args.revision,
                  commit_message=args.message, dry_run=args.dry_run, report=_progress, out=args.out)
    print(result if args.dry_run else f"pushed: {result}")
    return 0


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
