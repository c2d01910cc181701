"""evaluation.benchmarks: lm-eval tasks on the base and the fine-tuned model through lm-eval's own API, offline on
a task YAML over local files."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import lm_eval
import pytest
import torch
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from conftest import build_tiny_llama
from ift.errors import IftError
from ift.evaluation import benchmarks
from ift.recipe import EvaluationConfig

TASK = """\
task: ift_toy_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{text}}}}"
doc_to_target: label
doc_to_choice: ["good", "bad", "fine", "poor"]
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture()
def task_file(tmp_path):
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps({"text": f"Review {i}: the product is", "label": i % 4}) + "\n"
                            for i in range(16)))
    path = tmp_path / "tasks" / "toy_choice.yaml"
    path.parent.mkdir()
    path.write_text(TASK.format(data=data))
    return str(path)


def _lm_eval_directly(model, tokenizer, task_file, **kwargs):
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4)
    manager = TaskManager(include_path=str(tmp_parent(task_file)), include_defaults=False)
    return lm_eval.simple_evaluate(model=lm, tasks=["ift_toy_choice"], task_manager=manager, log_samples=False,
                                   **kwargs)["results"]["ift_toy_choice"]


def tmp_parent(path):
    from pathlib import Path

    return Path(path).parent


def test_figures_equal_lm_eval_called_directly(task_file, tiny_tokenizer):
    model = build_tiny_llama(tiny_tokenizer)
    ours = benchmarks.run_tasks(model, tiny_tokenizer, [task_file], batch_size=4, limit=12)
    direct = _lm_eval_directly(model, tiny_tokenizer, task_file, limit=12)
    task = ours["ift_toy_choice"]
    assert task["n"] == 12
    for metric in ("acc", "acc_norm"):
        assert task["metrics"][metric]["value"] == direct[f"{metric},none"]
        assert task["metrics"][metric]["stderr"] == direct[f"{metric}_stderr,none"]
        assert task["metrics"][metric]["higher_is_better"] is True


def test_relative_data_paths_are_read_against_the_task_files_folder(task_file, tmp_path, tiny_tokenizer,
                                                                   monkeypatch):
    """A task file naming its data relatively (here through a file it includes, as lm-eval task folders do) reads
    the data beside it from any working directory, with the figures of the same task given absolute paths."""
    tasks = tmp_path / "shipped" / "tasks"
    tasks.mkdir(parents=True)
    (tmp_path / "shipped" / "data").mkdir()
    (tmp_path / "shipped" / "data" / "toy.jsonl").write_bytes((tmp_path / "toy.jsonl").read_bytes())
    common = TASK.format(data="unused.jsonl").split("output_type:")[1]
    (tasks / "_common.yaml").write_text("dataset_path: json\noutput_type:" + common)
    (tasks / "toy.yaml").write_text("include: _common.yaml\ntask: ift_toy_choice\n"
                                    "dataset_kwargs:\n  data_files:\n    test: ../data/toy.jsonl\ntest_split: test\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    model = build_tiny_llama(tiny_tokenizer)
    ours = benchmarks.run_tasks(model, tiny_tokenizer, [str(tasks / "toy.yaml")], batch_size=4, limit=12)
    direct = _lm_eval_directly(model, tiny_tokenizer, task_file, limit=12)
    assert ours["ift_toy_choice"]["n"] == 12
    assert ours["ift_toy_choice"]["metrics"]["acc"]["value"] == direct["acc,none"]
    # the shipped file stays as written; what lm-eval reads states the path absolute
    with_paths = benchmarks.with_local_paths(tasks / "toy.yaml", tmp_path / "stand_ins")
    cfg, _ = benchmarks.task_config(with_paths)
    assert cfg["dataset_kwargs"]["data_files"]["test"] == str(tmp_path / "shipped" / "data" / "toy.jsonl")
    assert cfg["task"] == "ift_toy_choice" and cfg["metric_list"][0]["metric"] == "acc"
    assert "../data/toy.jsonl" in (tasks / "toy.yaml").read_text()
    # a Hub dataset's data_files are files inside that dataset: left as they are, and so is a file with nothing to do
    (tasks / "hub.yaml").write_text("task: t\ndataset_path: someone/data\ndataset_kwargs: {data_files: a.jsonl}\n")
    assert benchmarks.with_local_paths(tasks / "hub.yaml", tmp_path / "stand_ins") == tasks / "hub.yaml"
    (tasks / "gone.yaml").write_text((tasks / "toy.yaml").read_text().replace("toy.jsonl", "gone.jsonl"))
    with pytest.raises(IftError, match="data is missing.*gone.jsonl") as err:
        benchmarks.run_tasks(model, tiny_tokenizer, [str(tasks / "gone.yaml")], batch_size=4, limit=12)
    assert "evaluation.benchmarks" in err.value.line()


def test_base_and_fine_tuned_with_an_adapter_switched_off_for_the_base(task_file, tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    base = build_tiny_llama(tiny_tokenizer)
    tuned = get_peft_model(build_tiny_llama(tiny_tokenizer), LoraConfig(r=4, lora_alpha=8,
                                                                        target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 2.0)
    pad_before = tiny_tokenizer.pad_token
    tuned.train()  # as training leaves it: lm-eval evaluates in eval mode, ift puts the mode back
    cfg = EvaluationConfig(benchmarks=[task_file], batch_size=4)
    section = benchmarks.base_and_fine_tuned(tuned, tiny_tokenizer, "causal", cfg, say=lambda *_: None)
    acc = section["tasks"]["ift_toy_choice"]["metrics"]["acc"]
    assert tiny_tokenizer.pad_token == pad_before and tuned.training  # ift's tokenizer and mode untouched
    assert acc["base"] == _lm_eval_directly(base, tiny_tokenizer, task_file)["acc,none"]
    assert acc["fine-tuned"] == _lm_eval_directly(tuned.eval(), tiny_tokenizer, task_file)["acc,none"]
    assert acc["delta"] == pytest.approx(acc["fine-tuned"] - acc["base"])
    assert acc["base_stderr"] > 0 and acc["fine-tuned_stderr"] > 0
    assert section["settings"] == {"tasks": [task_file], "num_fewshot": None, "limit": None, "batch_size": 4,
                                   "lm_eval": section["settings"]["lm_eval"]}
    assert section["settings"]["lm_eval"]


def test_parse_results_names_filtered_metrics_and_drops_missing_errors():
    parsed = benchmarks.parse_results({
        "results": {"gsm": {"alias": "gsm", "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.1,
                            "exact_match,flexible": 0.5, "exact_match_stderr,flexible": "N/A"}},
        "higher_is_better": {"gsm": {"exact_match": True}}, "n-samples": {"gsm": {"original": 9, "effective": 8}}})
    assert parsed == {"gsm": {"n": 8, "metrics": {
        "exact_match,strict-match": {"value": 0.25, "stderr": 0.1, "higher_is_better": True},
        "exact_match,flexible": {"value": 0.5, "stderr": None, "higher_is_better": True}}}}


def test_unknown_tasks_and_missing_files_are_one_clear_error(task_file, tiny_tokenizer, tmp_path):
    model = build_tiny_llama(tiny_tokenizer)
    with pytest.raises(IftError, match="lm-eval does not know the task.*ift_no_such_task") as err:
        benchmarks.run_tasks(model, tiny_tokenizer, [task_file, "ift_no_such_task"])
    assert "evaluation.benchmarks" in err.value.line()
    with pytest.raises(IftError, match="does not exist"):
        benchmarks.run_tasks(model, tiny_tokenizer, [str(tmp_path / "nope.yaml")])
    with pytest.raises(ValueError, match="does not exist"):
        EvaluationConfig(benchmarks=[str(tmp_path / "nope.yaml")])


def test_a_run_records_its_benchmarks_in_metrics_card_and_compare(task_file, tmp_path, capsys):
    from test_train import fresh_accelerate_state, run_train, toy_recipe  # noqa: F401 (autouse fixture)

    from ift.cli import main

    run = run_train(toy_recipe(tmp_path, adapter="lora", max_steps=4, eval_steps=4, save_steps=4,
                               evaluation={"benchmarks": [task_file], "benchmark_limit": 8, "compare_base": True}))
    section = json.loads((run / "metrics.json").read_text())["benchmarks"]
    assert section["settings"]["limit"] == 8 and section["settings"]["tasks"] == [task_file]
    acc = section["tasks"]["ift_toy_choice"]["metrics"]["acc"]
    assert section["tasks"]["ift_toy_choice"]["n"] == 8
    assert {"base", "fine-tuned", "delta", "base_stderr", "fine-tuned_stderr"} <= set(acc)
    card = (run / "README.md").read_text()
    assert "| ift_toy_choice | acc | 8 |" in card and "standard error" in card
    capsys.readouterr()
    assert main(["eval", "--compare", str(run)]) == 0
    out = capsys.readouterr().out
    assert "benchmarks" in out and "ift_toy_choice" in out


def test_ift_eval_benchmarks_on_a_finished_run(task_file, tmp_path, tiny_tokenizer, monkeypatch, capsys):
    import ift.cli.eval as cli_eval
    from ift.cli import main

    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "recipe.yaml").write_text(f"model: {{name_or_path: tiny}}\ndata: {{sources: [{{path: d.jsonl}}]}}\n"
                                     f"training: {{output_dir: {run}}}\n")
    (run / "metrics.json").write_text(json.dumps({"test": {"accuracy": 0.5}}))
    models = {True: build_tiny_llama(tiny_tokenizer, seed=1), False: build_tiny_llama(tiny_tokenizer, seed=0)}
    monkeypatch.setattr(cli_eval, "load_model", lambda recipe, run_dir, tuned: SimpleNamespace(
        model=models[tuned], tokenizer=tiny_tokenizer, kind="causal", source="tiny"))
    assert main(["eval", str(run), "--benchmarks", task_file, "--limit", "8"]) == 0
    out = capsys.readouterr().out
    assert "ift_toy_choice" in out and "wrote the benchmarks section" in out
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"] == {"accuracy": 0.5}  # the run's own figures stay
    acc = metrics["benchmarks"]["tasks"]["ift_toy_choice"]["metrics"]["acc"]
    assert acc["fine-tuned"] == _lm_eval_directly(models[True], tiny_tokenizer, task_file, limit=8)["acc,none"]
    assert acc["base"] == _lm_eval_directly(models[False], tiny_tokenizer, task_file, limit=8)["acc,none"]
    assert main(["eval", str(run), "--benchmarks"]) == 2
    assert "no benchmarks to run" in capsys.readouterr().err


# ---------------------------------------------------------------- the shipped task files over ../shared/data

TASKS = Path(__file__).resolve().parent / "lm_eval_tasks"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
LM_EVAL_TASKS = Path(lm_eval.__file__).resolve().parent / "tasks"


def _pubmedqa_doc_to_text():
    spec = importlib.util.spec_from_file_location("preprocess_pubmedqa", LM_EVAL_TASKS / "pubmedqa" /
                                                  "preprocess_pubmedqa.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.doc_to_text


@pytest.mark.parametrize("name, theirs, split", [("sst2_local", "glue/sst2/default.yaml", "validation"),
                                                 ("pubmedqa_local", "pubmedqa/pubmedqa.yaml", "test")])
def test_shipped_local_tasks_ask_what_lm_evals_own_tasks_ask(name, theirs, split, tmp_path, monkeypatch):
    """tests/lm_eval_tasks: lm-eval's sst2 and pubmedqa over the local copies, read from any working directory:
    every row's prompt, choices and target equal those lm-eval's own task definition gives the same row."""
    from lm_eval.utils import apply_template

    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is not present")
    monkeypatch.chdir(tmp_path)
    manager = TaskManager(include_path=str(TASKS), include_defaults=False)
    ours = manager.load([str(benchmarks.with_local_paths(TASKS / f"{name}.yaml", tmp_path / "stand_ins"))])["tasks"][name]
    reference, _ = benchmarks.task_config(LM_EVAL_TASKS / theirs)
    docs = list(ours.validation_docs() if split == "validation" else ours.test_docs())
    assert len(docs) == {"sst2_local": 872, "pubmedqa_local": 500}[name]
    text = _pubmedqa_doc_to_text() if name == "pubmedqa_local" else lambda d: apply_template(reference["doc_to_text"], d)
    for doc in docs:
        assert ours.doc_to_text(doc) == text(doc)
        assert ours.doc_to_choice(doc) == reference["doc_to_choice"]
        assert ours.doc_to_target(doc) == doc[reference["doc_to_target"]]
    assert ours.config.output_type == reference["output_type"] == "multiple_choice"
    assert [m["metric"] for m in ours.config.metric_list] == [m["metric"] for m in reference["metric_list"]]
