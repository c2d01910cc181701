"""`ift push`: publish a run (adapter, merged or full model + tokenizer + card + plots) to the Hub.

What is uploaded is decided by `plan_upload` alone; the push stages exactly those files in a temporary
folder and hands it to `HfApi.upload_folder`, so the dry-run listing and the upload cannot differ.
The token comes from the caller or huggingface_hub's own resolution (HF_TOKEN, `hf auth login`); it is
passed to HfApi and nowhere else: never printed, logged, or written to a file.
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from ift.errors import IftError
from ift.merge import Report, has_adapter, load_run_recipe
from ift.recipe import Recipe

# Pickle-based weight formats: loading them runs code, so we never publish them.
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}
REPO_ID_FIX = "use your-name/model-name (letters, digits, '-', '_', '.'; at most 96 characters each)"
TOKEN_FIX = "set HF_TOKEN to a token with write access, or run `hf auth login`"


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
    files = sorted(p for p in weights.iterdir() if p.is_file() and not p.name.startswith(".") and p.name != "README.md")
    pickles = [p.name for p in files if p.suffix.lower() in PICKLE_SUFFIXES]
    if pickles:
        raise IftError(f"pickle files in the weights folder: {', '.join(pickles)}; ift publishes safetensors only",
                       str(weights), "save the model with save_pretrained (it writes .safetensors) and delete them")
    if not any(p.name.endswith(".safetensors") for p in files):
        raise IftError("no .safetensors weights in the weights folder", str(weights),
                       "save the model with save_pretrained, or rerun the training")
    card = weights / "README.md" if merge and (weights / "README.md").is_file() else run_dir / "README.md"
    if not card.is_file():
        raise IftError("the run has no model card (README.md)", str(run_dir),
                       "`ift push` writes it; from Python call ift.card.write_model_card(run_dir, recipe)")
    plan = [(p, p.name) for p in files] + [(card, "README.md")]
    plan += [(p, f"plots/{p.name}") for p in sorted((run_dir / "plots").glob("*.png"))]
    return plan


def push(run_dir: Path, repo_id: str, *, private: bool = False, merge: bool = False, revision: str | None = None,
         commit_message: str | None = None, dry_run: bool = False, token: str | None = None,
         report: Report | None = None) -> str:
    """Create the model repo if needed and upload the run in one commit; return its URL.

    dry_run: touch no network (merging and writing the card still happen locally) and return the listing
    of the files and sizes that would be uploaded.
    """
    say = report or (lambda _msg: None)
    run_dir = Path(run_dir)
    repo_id = check_repo_id(repo_id)
    recipe = load_run_recipe(run_dir)
    if merge and not has_adapter(run_dir / "final"):
        raise IftError("--merge folds an adapter into its base, but final/ holds a full model", str(run_dir / "final"),
                       "push without --merge: the full model is uploaded as it is")
    if not dry_run:
        token = token or _resolve_token()
        if not token:
            raise IftError("no Hugging Face token found", repo_id, TOKEN_FIX)
    _prepare(run_dir, recipe, repo_id, merge, say)
    plan = plan_upload(run_dir, merge=merge)
    message = commit_message or f"Upload {_model_label(recipe)} fine-tuned with ift"
    if dry_run:
        return format_plan(plan, repo_id, private=private, revision=revision, commit_message=message)
    say(f"uploading {len(plan)} files ({_size(sum(p.stat().st_size for p, _ in plan))}) to {repo_id}")
    with _staged(run_dir, plan) as folder, _hub_errors(repo_id, revision):
        return _upload(folder, repo_id, token, private=private, revision=revision, message=message)


def check_repo_id(repo_id: str | None) -> str:
    """A model repo id ('name' or 'namespace/name'); Hub URLs are accepted, dataset/Space ids refused."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    text = (repo_id or "").strip()
    for prefix in ("https://huggingface.co/", "http://huggingface.co/", "https://hf.co/", "huggingface.co/", "hf.co/"):
        text = text.removeprefix(prefix)
    text = text.rstrip("/")
    head = text.split("/", 1)[0]
    if head in ("datasets", "spaces") and text.count("/") >= 2:
        raise IftError(f"'{repo_id}' names a {head[:-1]} repository; ift pushes models", "--repo-id / hub.repo_id",
                       f"use a model repo id such as {text.split('/', 1)[1]}")
    try:
        validate_repo_id(text)
    except HFValidationError as exc:
        raise IftError(f"malformed repo id {repo_id!r}: {exc}", "--repo-id / hub.repo_id", REPO_ID_FIX) from None
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


def _prepare(run_dir: Path, recipe: Recipe, repo_id: str, merge: bool, say: Callable[[str], None]) -> None:
    """Bring the merged model (when asked) and the card up to date before planning."""
    from ift.card import write_model_card

    if merge:
        from ift.merge import merge as merge_run

        merged = run_dir / "merged"
        if not _merge_is_current(run_dir / "final", merged):
            merge_run(run_dir, merged, report=say)
        write_model_card(run_dir, recipe, merged=True, repo_id=repo_id, path=merged / "README.md")
    else:
        write_model_card(run_dir, recipe, repo_id=repo_id)


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
def _staged(run_dir: Path, plan: list[tuple[Path, str]]) -> Iterator[Path]:
    """A temporary folder holding exactly the planned files (hard links: no copy of large weights)."""
    with tempfile.TemporaryDirectory(dir=run_dir, prefix=".push-") as tmp:
        for local, rel in plan:
            dest = Path(tmp) / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(local, dest)
            except OSError:
                shutil.copy2(local, dest)
        yield Path(tmp)


# ---------------------------------------------------------------- the Hub


def _resolve_token() -> str | None:
    from huggingface_hub import get_token

    return get_token()


def _upload(folder: Path, repo_id: str, token: str, *, private: bool, revision: str | None, message: str) -> str:
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if url.repo_type not in (None, "model"):
        raise IftError(f"'{repo_id}' exists as a {url.repo_type} repository, not a model", str(url),
                       "choose another repo id for the model")
    full_id = url.repo_id or repo_id  # a bare name resolves to the token owner's namespace
    if revision and revision != "main":
        api.create_branch(full_id, branch=revision, repo_type="model", exist_ok=True)
    api.upload_folder(repo_id=full_id, folder_path=folder, repo_type="model", revision=revision,
                      commit_message=message)
    return f"{str(url).rstrip('/')}/tree/{revision}" if revision else str(url)


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level errors of huggingface_hub's HTTP client (httpx2 in 2.x, httpx in 1.x)."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for name in ("httpx2", "httpx"):
        try:
            found.append(importlib.import_module(name).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(found)


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
    except _transport_errors() as err:
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
