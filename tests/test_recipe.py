"""Recipe validation: every mistake found before anything loads, all of them at once, one clear line each."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ift.cli import main
from ift.errors import IftError
from ift.recipe import Recipe, load_recipe

REPO = Path(__file__).resolve().parents[1]

GOOD = {
    "model": {"name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"},
    "adapter": {"method": "lora"},
    "data": {"sources": [{"path": "data/finance_news", "templates": ["finance_news/headline_sentiment"]}]},
    "training": {"output_dir": "runs/x"},
}


def write(tmp_path: Path, recipe: dict | str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe))
    return path


def merged(**patch) -> dict:
    """GOOD with `section__key=value` patches (value None deletes the key)."""
    recipe = yaml.safe_load(yaml.safe_dump(GOOD))
    for dotted, value in patch.items():
        *parents, last = dotted.split("__")
        node = recipe
        for p in parents:
            node = node.setdefault(p, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return recipe


def errors_of(tmp_path: Path, recipe) -> list[str]:
    with pytest.raises(IftError) as info:
        load_recipe(write(tmp_path, recipe))
    return info.value.lines()


BAD = [
    # (id, recipe, exact expected line (file path replaced by {f}))
    ("unknown key with suggestion", merged(model__dtyp="float32"),
     "unknown key 'dtyp' ({f}: model.dtyp) — did you mean 'dtype'?"),
    ("unknown top-level section", merged(trainig={"seed": 1}),
     "unknown key 'trainig' ({f}: trainig) — did you mean 'training'?"),
    ("unknown source key", merged(data__sources=[{"path": "a", "templatse": ["x"]}]),
     "unknown key 'templatse' ({f}: data.sources.0.templatse) — did you mean 'templates'?"),
    ("wrong type", merged(training__per_device_train_batch_size="eight"),
     "wrong type: input should be a valid integer, unable to parse string as an integer (got 'eight') "
     "({f}: training.per_device_train_batch_size) — change the value's type"),
    ("bad choice", merged(training__lr_scheduler_type="cosin"),
     "invalid value 'cosin' ({f}: training.lr_scheduler_type) — use one of 'linear', 'cosine' or 'constant'"),
    ("out of range rank", merged(adapter__r=0),
     "value 0 is out of range: input should be greater than or equal to 1 ({f}: adapter.r) — change it to a value in range"),
    ("out of range learning rate", merged(training__learning_rate=5),
     "value 5 is out of range: input should be less than 1 ({f}: training.learning_rate) — change it to a value in range"),
    ("missing section", merged(training=None),
     "missing required key 'training' ({f}: training) — add a training section with output_dir: "
     "training: {output_dir: runs/my-run}"),
    ("missing output_dir", merged(training={"seed": 1}),
     "missing required key 'output_dir' ({f}: training.output_dir) — add training.output_dir: runs/my-run"),
    ("empty sources", merged(data__sources=[]),
     "value [] is out of range: list should have at least 1 item after validation, not 0 ({f}: data.sources) — "
     "change it to a value in range"),
    ("source without path", merged(data__sources=[{"templates": ["x"]}]),
     "missing required key 'path' ({f}: data.sources.0.path) — give the source a path: a local file/folder "
     "or a Hub dataset id"),
    ("seq2seq with chat template", merged(model__kind="seq2seq", data__chat_template=True),
     "chat templates wrap decoder-only conversations; a seq2seq model has none ({f}: data.chat_template) — "
     "set data.chat_template: none (or auto) for seq2seq models"),
    ("both warmups", merged(training__warmup_steps=10, training__warmup_ratio=0.1),
     "both warmup_steps and warmup_ratio are set ({f}: training.warmup_steps) — keep one of "
     "training.warmup_steps / training.warmup_ratio"),
    ("best metric not computed", merged(training__metric_for_best_model="rouge1"),
     "'rouge1' is not among the computed metrics ({f}: training.metric_for_best_model) — use one of "
     "['accuracy', 'accuracy_norm', 'balanced_accuracy', 'exact_match', 'loss', 'macro_f1', 'tool_argument_f1', "
     "'tool_call_exact_match'] or add it to evaluation.metrics"),
    ("push without repo", merged(hub__push=True),
     "hub.push is true but no repo id is given ({f}: hub.repo_id) — set hub.repo_id: your-name/model-name"),
    ("secret in recipe", merged(hub__token="hf_abc"),
     "secrets do not belong in recipes (they are copied into run folders) ({f}: hub.token) — remove it; "
     "ift reads the Hub token from HF_TOKEN or `hf auth login`"),
    ("scratch without config", merged(model__init="scratch", model__name_or_path=None, adapter__method="none"),
     "init: scratch needs a model config ({f}: model.config) — set model.config to a config path/Hub id or "
     "inline sizes such as {model_type: llama, hidden_size: 64}"),
    ("qlora from scratch", merged(model__init="scratch", model__config={"model_type": "llama"}, adapter__method="qlora"),
     "QLoRA quantizes pretrained weights; a scratch model has none worth freezing ({f}: adapter.method) — "
     "use adapter.method: none (full training) for init: scratch"),
    ("merge without adapter", merged(adapter__method="none", hub__merge=True),
     "merge folds an adapter into the base, but adapter.method is none ({f}: hub.merge) — remove hub.merge "
     "(a full fine-tune is pushed as is)"),
    ("weighted mixture without weights",
     merged(data__mixture={"strategy": "weighted"}, data__sources=[{"path": "a"}, {"path": "b", "weight": 0.5}]),
     "mixture strategy 'weighted' needs a weight on every source ({f}: data.sources) — give each source a weight "
     "(e.g. 0.51 / 0.49) or use data.mixture.strategy: proportional"),
    ("splits leave no training rows", merged(data__validation_size=0.5, data__test_size=0.5),
     "validation_size + test_size leave no training rows ({f}: data.validation_size) — make their sum below 1"),
    ("not a mapping", "- a\n- b\n", "a recipe must be a mapping of sections (model, data, training, ...) ({f}) — "
     "start from recipes/tiny.yaml"),
]


@pytest.mark.parametrize("recipe,expected", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_recipe_exact_message(tmp_path, recipe, expected):
    lines = errors_of(tmp_path, recipe)
    assert expected.replace("{f}", str(tmp_path / "r.yaml")) in lines, lines


def test_yaml_syntax_error_names_the_line(tmp_path):
    lines = errors_of(tmp_path, "model:\n  name_or_path: a\n bad: indent\n")
    assert len(lines) == 1
    assert lines[0].startswith("YAML syntax error:") and f"({tmp_path / 'r.yaml'}, line 3, column 2)" in lines[0]


def test_all_errors_are_reported_together(tmp_path):
    recipe = merged(model__dtyp="x", adapter__r=0, training__lr_scheduler_type="cosin", hub__token="t")
    lines = errors_of(tmp_path, recipe)
    assert len(lines) == 4
    assert {l.split(" (")[0] for l in lines} >= {"unknown key 'dtyp'", "invalid value 'cosin'"}


def test_missing_file(tmp_path):
    with pytest.raises(IftError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_defaults_filled_and_frozen(tmp_path):
    recipe = load_recipe(write(tmp_path, GOOD))
    assert isinstance(recipe, Recipe)
    assert recipe.training.learning_rate == 2e-4 and recipe.adapter.r == 16
    assert recipe.data.sources[0].splits.validation == "validation"
    with pytest.raises(Exception):
        recipe.training.seed = 3  # frozen: one validated object flows through


def test_overrides_are_typed(tmp_path):
    recipe = load_recipe(write(tmp_path, GOOD), ["training.learning_rate=1e-4", "adapter.r=8",
                                                 "data.sources.0.template_mode=all", "evaluation.metrics=[loss, rouge]",
                                                 "training.gradient_checkpointing=true"])
    assert recipe.training.learning_rate == 1e-4
    assert recipe.adapter.r == 8
    assert recipe.data.sources[0].template_mode == "all"
    assert recipe.evaluation.metrics == ["loss", "rouge"]
    assert recipe.training.gradient_checkpointing is True


def test_an_unquoted_no_turns_mixed_precision_off(tmp_path):
    # YAML reads `no` as false: the form ift's own fp32 note prints (training.mixed_precision: no) must load
    text = yaml.safe_dump(GOOD).replace("output_dir: runs/x", "output_dir: runs/x\n  mixed_precision: no")
    assert "mixed_precision: no\n" in text
    assert load_recipe(write(tmp_path, text)).training.mixed_precision == "no"
    bf16 = merged(training__mixed_precision="bf16")
    assert load_recipe(write(tmp_path, bf16), ["training.mixed_precision=no"]).training.mixed_precision == "no"
    with pytest.raises(IftError) as info:
        load_recipe(write(tmp_path, GOOD), ["training.mixed_precision=yes"])
    assert "invalid value True" in info.value.lines()[0]


def test_bad_overrides(tmp_path):
    path = write(tmp_path, GOOD)
    with pytest.raises(IftError) as info:
        load_recipe(path, ["training.learnig_rate=1e-4", "data.sources.3.path=x", "adapter"])
    lines = info.value.lines()
    assert "no list item '3' in 'data.sources' (command line) — use an index from 0 to 0" in lines
    assert "override 'adapter' has no '=' (command line) — write overrides as key.path=value" in lines
    assert f"unknown key 'learnig_rate' ({path}: training.learnig_rate) — did you mean 'learning_rate'?" in lines


def test_resolved_recipe_round_trips_without_secrets(tmp_path):
    recipe = load_recipe(write(tmp_path, GOOD))
    out = tmp_path / "run" / "recipe.yaml"
    recipe.save(out)
    again = load_recipe(out)
    assert again == recipe
    assert "token:" not in out.read_text()


def test_cli_validate_reports_every_error_with_exit_2(tmp_path, capsys):
    path = write(tmp_path, merged(model__dtyp="x", training__lr_scheduler_type="cosin"))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)
    assert "Traceback" not in "".join(err)


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_load_and_start_with_their_launch_command(recipe):
    text = recipe.read_text()
    assert text.splitlines()[0].startswith("# Launch: ") and "ift/train.py" in text.splitlines()[0]
    load_recipe(recipe)


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate_offline_from_a_fresh_clone(recipe, monkeypatch):
    """`ift validate` on every shipped recipe with no network and nothing beside the repository: templates
    resolve and the project's own data/ is read; a Hub dataset is named in one error each, nothing downloaded."""
    from huggingface_hub import constants

    import ift.data.sources
    from ift.cli.validate import check
    from ift.locations import looks_like_hub_id

    text = recipe.read_text()
    assert "../shared" not in text  # a fresh clone has no ../shared
    monkeypatch.chdir(REPO)  # recipes name paths relative to the repository root
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(ift.data.sources, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(ift.data.sources, "reachable", lambda address, timeout=3.0: False)
    sources = yaml.safe_load(text)["data"]["sources"]
    remote = [s for s in sources if looks_like_hub_id(s["path"]) or ift.data.sources.is_url(s["path"])]
    problems = check(str(recipe), [])
    assert len(problems) == len(remote)
    for problem, src in zip(problems, remote):
        if ift.data.sources.is_url(src["path"]):  # a data file on the web (FastChat's, for vicuna_identity)
            assert problem.what.endswith(f"so the data file {src['path']} cannot be downloaded")
        else:
            assert problem.what.startswith(f"the Hugging Face Hub is not reachable, so dataset '{src['path']}'")
        assert "data.data_map" in problem.fix


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate_on_the_shared_data_map(recipe, monkeypatch):
    """With the data map of ../shared/data (tests/shared_data.yaml) every shipped recipe validates clean."""
    from ift.cli.validate import check

    if not (REPO.parent / "shared" / "data").is_dir():
        pytest.skip("../shared/data is not present")
    monkeypatch.chdir(REPO)
    assert [e.line() for e in check(str(recipe), ["data.data_map=tests/shared_data.yaml"])] == []


def _run_cli(*args: str, timeout: int = 900):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "ift", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_tiny_recipe_runs_end_to_end(tmp_path):
    out = tmp_path / "tiny"
    proc = _run_cli("train", "recipes/tiny.yaml", f"training.output_dir={out}", "training.max_steps=6",
                    "training.eval_steps=6", "training.save_steps=6", "training.report_to=[none]")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "final" / "model.safetensors").exists() and (out / "README.md").exists()
    assert "accuracy" in __import__("json").loads((out / "metrics.json").read_text())["test"]


def test_the_metrics_registry_is_what_recipes_accept():
    from ift.metrics import FAMILIES, METRICS, computed_by, evaluate_modules, higher_is_better
    from ift.recipe import EvaluationConfig

    # every family is accepted; any other entry names an evaluate module
    assert EvaluationConfig(metrics=list(FAMILIES)).metrics == list(FAMILIES)
    assert evaluate_modules([*FAMILIES, "sacrebleu"]) == ["sacrebleu"]
    assert {m.family for m in METRICS.values()} == set(FAMILIES)
    assert computed_by(["rouge"]) == ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    assert not higher_is_better("loss") and higher_is_better("rougeL")


def test_pad_to_multiple_of_is_auto_a_positive_count_or_null(tmp_path):
    assert load_recipe(write(tmp_path, GOOD)).data.pad_to_multiple_of == "auto"
    for value, expected in (("8", 8), ("null", None), ("auto", "auto")):
        assert load_recipe(write(tmp_path, GOOD), [f"data.pad_to_multiple_of={value}"]).data.pad_to_multiple_of \
            == expected
    lines = errors_of(tmp_path, merged(data__pad_to_multiple_of=0))
    assert len(lines) == 1 and "data.pad_to_multiple_of" in lines[0], lines
