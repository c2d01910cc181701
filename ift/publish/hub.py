"""`ift push`: publish a run (adapter, merged or full model + tokenizer + card + plots) to the Hub.

What is uploaded is decided by `plan_upload` alone; the push stages exactly those files in a temporary
folder (an adapter's config rewritten to name its base by Hub id), lists and uploads that folder, so the
dry-run listing, a `--dry-run --out DIR` copy and the upload cannot differ. The upload is one commit that
also deletes the files of an earlier push that this one no longer has (OWNED_FILES), so pushing a merged
model over an adapter leaves no adapter_config.json behind.
During training (hub.strategy every_save / checkpoint) `push_checkpoint` pushes the weights at each save the
same way (one commit, stale owned files deleted, the adapter naming its base by Hub id), and with
`checkpoint` the resumable state under last-checkpoint/. `push_dataset` publishes the prepared splits as a
dataset repo (datasets' push_to_hub) with a dataset card (ift.publish.dataset_card).
The token comes from the caller or huggingface_hub's own resolution (HF_TOKEN, `hf auth login`); it is
passed to HfApi and nowhere else: never printed, logged, or written to a file.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from ift.errors import IftError
from ift.locations import connection_errors
from ift.publish.merge import Report, has_adapter, load_run_recipe
from ift.recipe import Recipe
from ift.run import RunDir

# Pickle-based weight formats: loading them runs code, so we never publish them.
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}
REPO_ID_FIX = "use your-name/model-name (letters, digits, '-', '_', '.'; at most 96 characters each)"
TOKEN_FIX = "set HF_TOKEN to a token with write access, or run `hf auth login`"
# What a push owns in the repo: the files save_pretrained, the card and the plots may give it, at the root
# (plots/*.png under plots/). One of them that the new push lacks is stale and deleted in the same commit;
# anything else (a user's notes, .gitattributes, subfolders) is left alone.
OWNED_FILES = ("README.md", "*.safetensors", "*.safetensors.index.json", "adapter_config.json", "config.json",
               "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
               "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
               "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json")
# hub.strategy checkpoint: the resumable state of the newest checkpoint, in this folder of the model repo
LAST_CHECKPOINT = "last-checkpoint"


def plan_upload(run_dir: Path, *, merge: bool) -> list[tuple[Path, str]]:
    """(local file, path in repo) for everything a push uploads.

    Weights and tokenizer from final/ (or merged/ with merge=True) at the repo root, the model card as
    README.md, and plots/*.png under plots/. Refuses pickle weights (.bin/.pt/...): safetensors only.
    """
    run_dir = Path(run_dir)
    weights = run_dir / ("merged" if merge else "final")
    if not weights.is_dir():
        fix = ("run `ift merge RUN_DIR` first (`ift push --merge` does it for you)" if merge else
               "let the training finish, or resume it: ift train RUN_DIR/recipe.yaml --resume")
        raise IftError(f"no {'merged model' if merge else 'final weights'} to upload", str(weights), fix)
    files = _weight_files(weights)
    card = weights / "README.md" if merge and (weights / "README.md").is_file() else RunDir(run_dir).card
    if not card.is_file():
        raise IftError("the run has no model card (README.md)", str(run_dir),
                       "`ift push` writes it; from Python call ift.publish.card.write_model_card(run_dir, recipe)")
    plan = [(p, p.name) for p in files] + [(card, "README.md")]
    plan += [(p, f"plots/{p.name}") for p in sorted(RunDir(run_dir).plots.glob("*.png"))]
    return plan


def _weight_files(weights: Path) -> list[Path]:
    """The files save_pretrained wrote in `weights` (weights, configs, tokenizer; not peft's README.md).

    Refuses pickle weights (.bin/.pt/...) and a folder without .safetensors weights.
    """
    files = sorted(p for p in weights.iterdir() if p.is_file() and not p.name.startswith(".") and p.name != "README.md")
    pickles = [p.name for p in files if p.suffix.lower() in PICKLE_SUFFIXES]
    if pickles:
        raise IftError(f"pickle files in the weights folder: {', '.join(pickles)}; ift publishes safetensors only",
                       str(weights), "save the model with save_pretrained (it writes .safetensors) and delete them")
    if not any(p.name.endswith(".safetensors") for p in files):
        raise IftError("no .safetensors weights in the weights folder", str(weights),
                       "save the model with save_pretrained, or rerun the training")
    return files


def push(run_dir: Path, repo_id: str, *, private: bool = False, merge: bool = False, revision: str | None = None,
         commit_message: str | None = None, dry_run: bool = False, token: str | None = None,
         report: Report | None = None, out: Path | None = None, recipe: Recipe | None = None,
         card_written: bool = False) -> str:
    """Create the model repo if needed and upload the run in one commit; return its URL.

    recipe: the run's recipe as the caller holds it (the end of a training run), else the saved recipe.yaml.
    card_written: the caller has just written the run's card (RUN_DIR/README.md) for this repo: it is uploaded
    as it is, not written again.
    dry_run: touch no network (merging and writing the card still happen locally) and return the listing
    of the files and sizes that would be uploaded.
    out: with dry_run, also write those files to this folder (new, empty, or an earlier such copy): the
    repo as it would be, loadable with from_pretrained(out).
    """
    say = report or (lambda _msg: None)
    run_dir = Path(run_dir)
    repo_id = check_repo_id(repo_id)
    if out is not None and not dry_run:
        raise IftError("--out writes the files a push would upload, without uploading", str(out),
                       "add --dry-run, or drop --out to push to the Hub")
    recipe = recipe if recipe is not None else load_run_recipe(run_dir)
    if merge and not has_adapter(RunDir(run_dir).final):
        raise IftError("--merge folds an adapter into its base, but final/ holds a full model", str(RunDir(run_dir).final),
                       "push without --merge: the full model is uploaded as it is")
    if out is not None:
        _check_out(Path(out), run_dir)
    if not dry_run:
        token = require_token(repo_id, token)
    _prepare(run_dir, recipe, repo_id, merge, say, card_written=card_written)
    plan = plan_upload(run_dir, merge=merge)
    base = _adapter_base(run_dir, recipe, merge, say)
    message = commit_message or f"Upload {_model_label(recipe)} fine-tuned with ift"
    with _staged(run_dir, plan, base) as (folder, staged):
        if dry_run:
            if out is not None:
                _export(folder, Path(out))
            return format_plan(staged, repo_id, private=private, revision=revision, commit_message=message)
        say(f"uploading {len(staged)} files ({_size(sum(p.stat().st_size for p, _ in staged))}) to {repo_id}")
        with _hub_errors(repo_id, revision):
            return _upload(folder, [rel for _, rel in staged], repo_id, token, private=private, revision=revision,
                           message=message, say=say)


def push_checkpoint(run_dir: Path, weights: Path, *, step: int, repo_id: str, private: bool = False,
                    revision: str | None = None, state: Path | None = None, report: Report | None = None,
                    token: str | None = None, recipe: Recipe | None = None) -> str:
    """hub.strategy every_save / checkpoint: publish the weights of a checkpoint while training runs; the URL.
    `recipe`: the run's, as the caller holds it (else its saved recipe.yaml).

    `weights` is a save_pretrained folder (adapter or full model, safetensors) plus the tokenizer. It goes to
    the repo root in one commit, "Training in progress, step N", with the run's card (RUN_DIR/README.md) when
    one exists yet; an adapter config names its base by Hub id, as `push` does. Files of an earlier push that
    this one no longer has are deleted in the same commit (weights and tokenizer files: a checkpoint push
    leaves an earlier card when the run has none yet, and plots/ to the final push). So a run that crashes has
    published its last checkpoint's weights, loadable with from_pretrained(repo_id).

    state (hub.strategy checkpoint): that checkpoint folder (the Accelerate state, trainer_state.json,
    manifest.json; its hub/ subfolder skipped) goes under last-checkpoint/ in the same commit, replacing the
    previous one (its files this one lacks are deleted): download it into RUN_DIR/checkpoints/step-N and
    `ift train RECIPE --resume` continues from it. It holds the optimizer and RNG state as Accelerate writes
    them (torch pickles, like HF Trainer's last-checkpoint/); only the published weights are safetensors-only.

    Errors stop the training: no token (checked before any network), an unreachable Hub, a refused upload
    raise IftError naming the repo and the fix. A run asked to publish its checkpoints that cannot is
    stopped loudly rather than left running unpublished; its checkpoint is saved locally first, so
    `--resume` continues it once the cause is fixed (or with hub.strategy: end).
    """
    say = report or (lambda _msg: None)
    run_dir, weights = Path(run_dir), Path(weights)
    repo_id = check_repo_id(repo_id)
    resume = (f"the checkpoint is saved locally: fix that and continue with `ift train {run_dir / 'recipe.yaml'} "
              "--resume`, or set hub.strategy: end to push only when training ends")
    token = token or _resolve_token()
    if not token:
        raise IftError(f"no Hugging Face token found to push checkpoint step {step}", repo_id, f"{TOKEN_FIX}; {resume}")
    recipe = recipe if recipe is not None else load_run_recipe(run_dir)
    if not weights.is_dir():
        raise IftError(f"no weights to push for checkpoint step {step}", str(weights),
                       "report it as an ift bug: training writes them before pushing")
    plan = [(p, p.name) for p in _weight_files(weights)]
    card = RunDir(run_dir).card
    if card.is_file():
        plan.append((card, "README.md"))
    if state is not None:
        plan += _state_plan(Path(state))
    ours = {rel for _, rel in plan}

    def owned(path_in_repo: str) -> bool:
        if path_in_repo.startswith(f"{LAST_CHECKPOINT}/"):
            return state is not None
        return is_owned(path_in_repo) and not path_in_repo.startswith("plots/") and (
            path_in_repo != "README.md" or "README.md" in ours)

    base = _adapter_base(run_dir, recipe, False, say, weights=weights)
    message = f"Training in progress, step {step}"
    try:
        with _staged(run_dir, plan, base) as (folder, staged):
            say(f"pushing checkpoint step {step}: {len(staged)} files "
                f"({_size(sum(p.stat().st_size for p, _ in staged))}) to {repo_id}")
            with _hub_errors(repo_id, revision):
                return _upload(folder, [rel for _, rel in staged], repo_id, token, private=private, revision=revision,
                               message=message, say=say, owned=owned)
    except IftError as err:
        raise IftError(f"could not push checkpoint step {step} to the Hub: {err.what}", err.where or repo_id,
                       f"{err.fix}; {resume}" if err.fix else resume) from None
    except Exception as err:  # noqa: BLE001 - a training run stops with one line, not a traceback
        raise IftError(f"could not push checkpoint step {step} to the Hub: {type(err).__name__}: "
                       f"{str(err).splitlines()[0][:300] if str(err) else ''}", repo_id, resume) from None


def push_from_training(accelerator, model, state: dict, tokenizer, rd: RunDir, checkpoint: Path, *, step: int,
                       recipe: Recipe, say: Report) -> None:
    """`push_checkpoint` from inside a training run, which every process calls: the main one writes the weights
    (`state`, gathered by all) to a staging folder, removed after the upload, and uploads; a failure is shared
    with every process, so all stop together (the checkpoint itself is kept)."""
    from accelerate.utils import broadcast_object_list

    hub = recipe.hub
    failure: list = [None]
    if accelerator.is_main_process:
        weights = rd.hub_staging / checkpoint.name
        try:
            model.save_pretrained(weights, state_dict=state)
            tokenizer.save_pretrained(weights)
            push_checkpoint(rd.path, weights, step=step, repo_id=hub.repo_id, private=hub.private,
                            revision=hub.revision, state=checkpoint if hub.strategy == "checkpoint" else None,
                            report=say, recipe=recipe)
        except IftError as err:
            failure[0] = (err.what, err.where, err.fix)
        finally:
            shutil.rmtree(weights.parent, ignore_errors=True)
    if accelerator.num_processes > 1:
        broadcast_object_list(failure)
    if failure[0] is not None:
        raise IftError(*failure[0])


def _state_plan(state: Path) -> list[tuple[Path, str]]:
    """A checkpoint folder's files under last-checkpoint/ (not its hub/ copy of the weights, nor temporaries)."""
    if not state.is_dir():
        raise IftError("the checkpoint folder to push is missing", str(state),
                       "report it as an ift bug: training writes it before pushing")
    files = []
    for p in sorted(state.rglob("*")):
        rel = p.relative_to(state)
        if p.is_file() and rel.parts[0] != "hub" and not any(part.startswith(".") for part in rel.parts) \
                and not p.name.endswith(".tmp"):
            files.append((p, f"{LAST_CHECKPOINT}/{rel.as_posix()}"))
    return files


def push_dataset(prepared, recipe: Recipe | None, repo_id: str, *, private: bool = False, token: str | None = None,
                 dry_run: bool = False, report: Report | None = None) -> str:
    """hub.push_dataset: publish the prepared splits (ift.data.prepare.PreparedData) as a dataset repo; its URL.

    The splits go up with datasets' own DatasetDict.push_to_hub (Parquet shards under data/, the card's
    configs and dataset_info); then one more commit replaces README.md with ift's dataset card
    (ift.publish.dataset_card), which keeps datasets' metadata and says where every row came from. An empty split
    (validation_size: 0) is left out. `load_dataset(repo_id)` loads the splits.
    dry_run: no network, no token; returns the listing of the splits, rows and card that would be pushed.
    """
    from ift.publish.dataset_card import build_dataset_card

    say = report or (lambda _msg: None)
    repo_id = check_dataset_repo_id(repo_id)
    splits = _nonempty_splits(prepared.splits)
    if dry_run:
        return format_dataset_plan(splits, build_dataset_card(prepared, recipe, repo_id), repo_id, private=private)
    token = require_token(repo_id, token)
    say(f"uploading the prepared splits ({', '.join(f'{s} {len(d):,} rows' for s, d in splits.items())}) "
        f"to the dataset repo {repo_id}")
    with _hub_errors(repo_id, None):
        info = splits.push_to_hub(repo_id, private=private, token=token,
                                  commit_message="Upload the splits prepared by ift")
        full_id = getattr(getattr(info, "repo_url", None), "repo_id", None) or repo_id
        pushed = _read_dataset_card(full_id, getattr(info, "oid", None), token)
        card = build_dataset_card(prepared, recipe, full_id, metadata=pushed)
        from huggingface_hub import CommitOperationAdd, HfApi

        api = HfApi(token=token)
        api.create_commit(full_id, [CommitOperationAdd(path_in_repo="README.md",
                                                       path_or_fileobj=str(card).encode("utf-8"))],
                          commit_message="Dataset card written by ift", repo_type="dataset",
                          parent_commit=getattr(info, "oid", None))
        url = getattr(info, "repo_url", None)
    return str(url).rstrip("/") if url else f"{_endpoint()}/datasets/{full_id}"


def check_dataset_repo_id(repo_id: str | None) -> str:
    """A dataset repo id ('namespace/name'); 'datasets/...' and Hub dataset URLs accepted, model ids too."""
    text, head = _strip_hub_url(repo_id)
    if head == "spaces":
        raise IftError(f"'{repo_id}' names a space repository; the splits go to a dataset repo", "hub.push_dataset",
                       f"use a dataset repo id such as {text.split('/', 1)[1]}")
    if head == "datasets":
        text = text.split("/", 1)[1]
    return _validated(text, f"malformed dataset repo id {repo_id!r}", "hub.push_dataset")


def format_dataset_plan(splits, card, repo_id: str, *, private: bool = False) -> str:
    """The push_dataset dry-run listing: each split with its rows and where it goes, and the card's size."""
    text = str(card).encode("utf-8")
    where = f"{repo_id} ({'private' if private else 'public'} dataset repo, revision main)"
    rows = sum(len(d) for d in splits.values())
    lines = [f"dry run: would push {len(splits)} splits, {rows:,} rows, and a dataset card to {where}"]
    width = max([len(s) for s in splits] + [len("README.md")])
    for name, ds in splits.items():
        lines.append(f"  {name:<{width}}  {len(ds):>9,} rows   data/{name}-*.parquet ({', '.join(ds.column_names)})")
    lines.append(f"  {'README.md':<{width}}  {len(text):>9,} bytes  dataset card (datasets adds its dataset_info)")
    return "\n".join(lines)


def _nonempty_splits(splits):
    import datasets

    kept = {name: ds for name, ds in splits.items() if len(ds)}
    if not kept:
        raise IftError("every prepared split is empty: nothing to push", "hub.push_dataset",
                       "check data.sources and the split sizes (`ift data stats RECIPE`)")
    return datasets.DatasetDict(kept)


def _read_dataset_card(repo_id: str, revision: str | None, token: str) -> dict:
    """The metadata of the README.md that datasets' push_to_hub wrote ({} when there is none)."""
    from huggingface_hub import DatasetCard, HfFileSystem

    fs = HfFileSystem(token=token, skip_instance_cache=True)
    path = f"datasets/{repo_id}" + (f"@{revision}" if revision else "") + "/README.md"
    try:
        text = fs.read_text(path, encoding="utf-8")
    except FileNotFoundError:
        return {}
    return DatasetCard(text).data.to_dict()


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def require_token(repo_id: str, token: str | None = None) -> str:
    """The token a push will use (the caller's, else HF_TOKEN / `hf auth login`); IftError when there is none.

    No network. Training with hub.push can call it before the first step, so a missing token stops the run
    at the start rather than at its first checkpoint push or after the last step.
    """
    token = token or _resolve_token()
    if not token:
        raise IftError("no Hugging Face token found", repo_id, TOKEN_FIX)
    return token


def check_repo_id(repo_id: str | None) -> str:
    """A model repo id ('name' or 'namespace/name'); Hub URLs are accepted, dataset/Space ids refused."""
    text, head = _strip_hub_url(repo_id)
    if head in ("datasets", "spaces"):
        raise IftError(f"'{repo_id}' names a {head[:-1]} repository; ift pushes models", "--repo-id / hub.repo_id",
                       f"use a model repo id such as {text.split('/', 1)[1]}")
    return _validated(text, f"malformed repo id {repo_id!r}", "--repo-id / hub.repo_id")


def _strip_hub_url(repo_id: str | None) -> tuple[str, str | None]:
    """The id without a Hub URL prefix, and its repo-type prefix ('datasets', 'spaces') when it has one."""
    text = (repo_id or "").strip()
    for prefix in ("https://huggingface.co/", "http://huggingface.co/", "https://hf.co/", "huggingface.co/", "hf.co/"):
        text = text.removeprefix(prefix)
    text = text.rstrip("/")
    head = text.split("/", 1)[0]
    return text, head if head in ("datasets", "spaces") and text.count("/") >= 2 else None


def _validated(text: str, problem: str, where: str) -> str:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError as exc:
        raise IftError(f"{problem}: {exc}", where, REPO_ID_FIX) from None
    return text


def format_plan(plan: list[tuple[Path, str]], repo_id: str, *, private: bool = False, revision: str | None = None,
                commit_message: str | None = None) -> str:
    """The dry-run listing: every file with its size, the total, and where it would go."""
    sizes = [(rel, local.stat().st_size) for local, rel in plan]
    width = max(len(f"{n:,}") for _, n in sizes)
    where = f"{repo_id} ({'private' if private else 'public'} model repo, revision {revision or 'main'})"
    lines = [f"dry run: would upload {len(sizes)} files, {_size(sum(n for _, n in sizes))}, to {where}"]
    if commit_message:
        lines.append(f"commit message: {commit_message}")
    lines += [f"  {n:>{width},} bytes  {rel}" for rel, n in sizes]
    return "\n".join(lines)


# ---------------------------------------------------------------- local preparation


def _prepare(run_dir: Path, recipe: Recipe, repo_id: str, merge: bool, say: Callable[[str], None], *,
             card_written: bool = False) -> None:
    """Bring the merged model (when asked) and the card up to date before planning."""
    from ift.publish.card import write_model_card

    if merge:
        from ift.publish.merge import merge as merge_run

        merged = RunDir(run_dir).merged
        if not _merge_is_current(RunDir(run_dir).final, merged):
            merge_run(run_dir, merged, report=say)
        write_model_card(run_dir, recipe, merged=True, repo_id=repo_id, path=merged / "README.md")
    elif not card_written:
        write_model_card(run_dir, recipe, repo_id=repo_id)


def _adapter_base(run_dir: Path, recipe: Recipe, merge: bool, say: Callable[[str], None],
                  weights: Path | None = None) -> dict | None:
    """What the published adapter config says about its base ({"base_model_name_or_path", "revision"}), or
    None to leave it as peft wrote it.

    peft records the folder the base was loaded from, which for a GGUF base is ift's local cache
    (~/.cache/ift/gguf/<sha256>) and for a local base a path of this machine: nobody else can load that.
    """
    if merge or not has_adapter(weights or RunDir(run_dir).final):
        return None
    from ift.modeling.model_source import base_hub_id

    found = base_hub_id(recipe.model)
    if found is None:
        if weights is None or str(run_dir) not in _WARNED_NO_BASE_ID:  # a training run's checkpoints: once
            say("warning: the base model has no known Hub id, so the adapter can only be loaded where its base "
                "folder exists; set model.hub_id in recipe.yaml to the base's Hub id")
        if weights is not None:
            _WARNED_NO_BASE_ID.add(str(run_dir))
        return None
    m = recipe.model
    # the revision trained on, when the id is the one it was loaded from (AutoPeftModel loads that revision)
    return {"base_model_name_or_path": found, **({"revision": m.revision} if m.revision and found == m.name_or_path
                                                  else {})}


_WARNED_NO_BASE_ID: set[str] = set()


def _check_out(out: Path, run_dir: Path) -> None:
    """Refuse to replace a folder that is not an earlier copy of a push (a user's --out might be anything)."""
    if out.resolve() == run_dir.resolve() or out.resolve() in run_dir.resolve().parents \
            or RunDir(run_dir.resolve()).final in (out.resolve(), *out.resolve().parents):
        raise IftError("--out cannot be the run folder, final/ or a folder above them", str(out),
                       "choose a new folder for the copy")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "README.md").is_file())):
        raise IftError("the --out folder exists and does not hold an earlier push copy", str(out),
                       "choose a new or empty folder (an earlier copy there is replaced)")


def _export(folder: Path, out: Path) -> None:
    """Copy the staged files to `out` (real copies: editing them must not edit the run), replacing it whole."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        shutil.copytree(folder, tmp, dirs_exist_ok=True)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _merge_is_current(final: Path, merged: Path) -> bool:
    weights = list(merged.glob("*.safetensors"))
    adapter = list(final.glob("adapter_model*.safetensors"))
    if not weights or not (merged / "config.json").is_file():
        return False
    return min(p.stat().st_mtime for p in weights) >= max((p.stat().st_mtime for p in adapter), default=0.0)


def _model_label(recipe: Recipe) -> str:
    m = recipe.model
    if m.init == "scratch":
        return "a from-scratch model"
    if m.gguf_file:
        return Path(m.gguf_file.split("/")[-1]).stem
    return (m.name_or_path or "model").rstrip("/").split("/")[-1]


def _size(n: float) -> str:
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("KB", "MB", "GB", "TB"):
        n /= 1000
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}"
    return ""


@contextmanager
def _staged(run_dir: Path, plan: list[tuple[Path, str]],
            base: dict | None = None) -> Iterator[tuple[Path, list[tuple[Path, str]]]]:
    """A temporary folder holding exactly the planned files, and the plan pointing into it.

    Hard links (no copy of large weights), except an adapter_config.json that must name `base`
    differently: a new file (writing through a link would change final/ as well).
    """
    with tempfile.TemporaryDirectory(dir=run_dir, prefix=".push-") as tmp:
        staged = []
        for local, rel in plan:
            dest = Path(tmp) / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            if not (rel == "adapter_config.json" and base and _write_adapter_config(local, dest, base)):
                try:
                    os.link(local, dest)
                except OSError:
                    shutil.copy2(local, dest)
            staged.append((dest, rel))
        yield Path(tmp), staged


def _write_adapter_config(src: Path, dest: Path, base: dict) -> bool:
    """Write src's config with `base` to dest; False (nothing written) when src says that already."""
    try:
        config = json.loads(src.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IftError(f"cannot read the adapter config: {exc}", str(src), "retrain, or restore final/") from None
    if not isinstance(config, dict):
        raise IftError("the adapter config is not a JSON object", str(src), "retrain, or restore final/")
    if all(config.get(k) == v for k, v in base.items()):
        return False
    config.update(base)
    dest.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")  # as peft writes it
    return True


# ---------------------------------------------------------------- the Hub


def _resolve_token() -> str | None:
    from huggingface_hub import get_token

    return get_token()


def is_owned(path_in_repo: str) -> bool:
    """A repo file that ift's pushes write (OWNED_FILES at the root, plots/*.png)."""
    if path_in_repo.startswith("plots/"):
        return path_in_repo.count("/") == 1 and path_in_repo.endswith(".png")
    return "/" not in path_in_repo and any(fnmatch.fnmatchcase(path_in_repo, p) for p in OWNED_FILES)


def _upload(folder: Path, files: list[str], repo_id: str, token: str, *, private: bool, revision: str | None,
            message: str, say: Callable[[str], None], owned: Callable[[str], bool] | None = None) -> str:
    """Create the repo (and branch) if needed; one commit adding `files` and deleting the repo's files that
    `owned` (default is_owned) claims and this push lacks. Returns the repo's (branch's) URL."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if url.repo_type not in (None, "model"):
        raise IftError(f"'{repo_id}' exists as a {url.repo_type} repository, not a model", str(url),
                       "choose another repo id for the model")
    full_id = url.repo_id or repo_id  # a bare name resolves to the token owner's namespace
    if revision and revision != "main":
        api.create_branch(full_id, branch=revision, repo_type="model", exist_ok=True)
    # one explicit commit with the deletions: upload_folder may split a large upload into several commits
    # (hf_xet's pipeline), and a reader in between would see the new weights next to the stale files
    remote = api.list_repo_files(full_id, revision=revision, repo_type="model")
    owned = owned or is_owned
    stale = sorted(p for p in remote if owned(p) and p not in set(files))
    if stale:
        say(f"removing {len(stale)} files of an earlier push: {', '.join(stale)}")
    operations = [CommitOperationDelete(path_in_repo=p) for p in stale]
    operations += [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(folder / rel)) for rel in files]
    api.create_commit(full_id, operations, commit_message=message, revision=revision, repo_type="model")
    return f"{str(url).rstrip('/')}/tree/{revision}" if revision else str(url)


@contextmanager
def _hub_errors(repo_id: str, revision: str | None) -> Iterator[None]:
    """huggingface_hub's exceptions -> one IftError line saying what to do (never echoing the token)."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RevisionNotFoundError

    try:
        yield
    except OfflineModeIsEnabled:
        raise IftError("the Hub is unreachable: offline mode is on (HF_HUB_OFFLINE)", repo_id,
                       "unset HF_HUB_OFFLINE and retry, or list the files with --dry-run") from None
    except RevisionNotFoundError:
        raise IftError(f"revision '{revision}' not found", repo_id,
                       "push to an existing branch, or omit --revision") from None
    except HfHubHTTPError as err:
        raise _http_error(err, repo_id) from None
    except ValueError as err:
        if not str(err).startswith("Invalid metadata in README.md"):
            raise
        reasons = "; ".join(line.lstrip("- ") for line in str(err).splitlines()[1:] if line.strip())
        raise IftError(f"the Hub rejected the model card metadata: {reasons or err}", "README.md",
                       "report it as an ift bug; the card is regenerated on every push") from None
    except connection_errors() as err:
        raise IftError(f"cannot reach the Hugging Face Hub ({type(err).__name__})", repo_id,
                       "check the network connection and retry; --dry-run lists the files without the network"
                       ) from None


def _http_error(err, repo_id: str) -> IftError:
    status = err.response.status_code if getattr(err, "response", None) is not None else None
    detail = (getattr(err, "server_message", None) or "").strip().splitlines()
    said = f": {detail[0][:200]}" if detail else ""
    if status == 401:
        return IftError(f"the Hub rejected the token (401){said}", repo_id, TOKEN_FIX)
    if status == 403:
        namespace = repo_id.split("/")[0] if "/" in repo_id else "your namespace"
        return IftError(f"the token may not write to '{namespace}' (403){said}", repo_id,
                        "use a token with write access to that user or organisation")
    if status == 404:
        return IftError(f"repository not found (404){said}", repo_id, "check the repo id and the token's permissions")
    if status is not None and status >= 500:
        return IftError(f"the Hub failed with {status}{said}", repo_id, "retry in a few minutes")
    return IftError(f"the Hub refused the upload ({status}){said}", repo_id, "check the repo id and retry")
