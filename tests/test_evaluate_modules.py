"""`evaluate` modules in evaluation.metrics: loaded once, computed on the generated answers, recorded as
<module>.<key> beside the built-in figures, usable as metric_for_best_model; clear errors when one cannot load."""

from __future__ import annotations

import json

import evaluate
import pytest

from ift.errors import IftError
from ift.evaluation import compare
from ift.evaluation import evaluate as ev
from ift.evaluation import modules
from ift.recipe import EvaluationConfig, Recipe

CHARMATCH = '''
import datasets
import evaluate


class Charmatch(evaluate.Metric):
    """Character agreement of a prediction with its reference, and the length ratio."""

    def _info(self):
        return evaluate.MetricInfo(
            description="character agreement", citation="", inputs_description="",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}))

    def _compute(self, predictions, references):
        same = [sum(a == b for a, b in zip(p, r)) / max(len(p), len(r), 1) for p, r in zip(predictions, references)]
        return {"agreement": sum(same) / len(same),
                "length_ratio": sum(map(len, predictions)) / max(sum(map(len, references)), 1),
                "per_pair": same, "counts": [1, 2, 3, 4, 5, 6, 7], "version": "1.0"}
'''

NEEDS = CHARMATCH.replace("import datasets\n", "import datasets\nimport ift_no_such_package\n") \
    .replace("class Charmatch", "class Needs")

ROWS = [{"prompt": "Summarize: the cat sat.", "completion": "A cat sat.", "choices": [], "source": "s1",
         "template": "sum"},
        {"prompt": "Summarize: rain fell all day.", "completion": "It rained.", "choices": [], "source": "s2",
         "template": "sum"},
        {"prompt": "Is it good? good or bad", "completion": "good", "choices": ["good", "bad"], "source": "s1",
         "template": "cls"}]


@pytest.fixture()
def charmatch(tmp_path):
    path = tmp_path / "metrics" / "charmatch.py"
    path.parent.mkdir()
    path.write_text(CHARMATCH)
    return str(path)  # a new path for every test: loaded afresh


def test_a_local_module_is_recorded_as_computing_it_directly_on_the_saved_predictions(charmatch, tiny_tokenizer,
                                                                                       tiny_llama, tmp_path):
    cfg = EvaluationConfig(metrics=["accuracy", charmatch], max_new_tokens=5)
    metrics, preds = ev.evaluate(tiny_llama, tiny_tokenizer, "causal", ROWS, cfg, batch_size=2, desc="test")
    path = tmp_path / "predictions.jsonl"
    ev.write_predictions(path, preds)
    saved = [json.loads(line) for line in path.read_text().splitlines()]
    generated = [p for p in saved if p["mode"] == "generate"]
    assert len(generated) == 2 and [p["mode"] for p in saved][2] == "rank"  # rows with choices stay ranked
    direct = evaluate.load(charmatch).compute(predictions=[p["prediction"] for p in generated],
                                              references=[p["target"] for p in generated])
    assert metrics["charmatch.agreement"] == pytest.approx(direct["agreement"], abs=1e-12)
    assert metrics["charmatch.length_ratio"] == pytest.approx(direct["length_ratio"], abs=1e-12)
    # per-pair lists are averaged; other values (counts, strings) are left out
    assert metrics["charmatch.per_pair"] == pytest.approx(sum(direct["per_pair"]) / 2, abs=1e-12)
    assert "charmatch.counts" not in metrics and "charmatch.version" not in metrics
    assert "accuracy" in metrics and "exact_match" not in metrics  # free-form rows: the module, not exact match
    one = evaluate.load(charmatch).compute(predictions=[generated[0]["prediction"]],
                                           references=[generated[0]["target"]])
    assert metrics["by_source"]["s1"]["charmatch.agreement"] == pytest.approx(one["agreement"], abs=1e-12)
    assert "charmatch.agreement" not in metrics["by_template"]["cls"]


def test_a_module_alone_makes_the_model_answer_and_is_loaded_once(charmatch, tiny_tokenizer, tiny_llama,
                                                                   monkeypatch):
    calls = []
    real = evaluate.load
    monkeypatch.setattr(evaluate, "load", lambda path, *a, **k: calls.append(path) or real(path, *a, **k))
    cfg = EvaluationConfig(metrics=["loss", charmatch], max_new_tokens=3)
    for _ in range(2):
        metrics, preds = ev.evaluate(tiny_llama, tiny_tokenizer, "causal", ROWS[:2], cfg)
        assert {p["mode"] for p in preds} == {"generate"} and "charmatch.agreement" in metrics
    assert len(calls) == 1


@pytest.mark.parametrize("entry, message, fix", [
    ("ift-no-such-metric", "cannot load the evaluate module 'ift-no-such-metric'",
     "huggingface.co/spaces/evaluate-metric/ift-no-such-metric"),
    ("someone/ift-no-such-metric", "cannot load the evaluate module 'someone/ift-no-such-metric'",
     "huggingface.co/spaces/someone/ift-no-such-metric"),
])
def test_a_module_that_cannot_load_is_one_error_naming_it_and_how_to_make_it_local(entry, message, fix):
    with pytest.raises(IftError) as err:
        modules.load_modules(["loss", entry])
    line = err.value.line()
    assert message in line and fix in line and "evaluation.metrics" in line and "local folder" in line


def test_a_module_missing_a_package_names_it(tmp_path):
    path = tmp_path / "needs.py"
    path.write_text(NEEDS)
    with pytest.raises(IftError, match="needs ift_no_such_package.*pip install ift_no_such_package"):
        modules.load_modules([str(path)])


def test_recipe_accepts_modules_and_their_figures_as_metric_for_best_model(charmatch, tmp_path):
    base = {"model": {"name_or_path": "m"}, "data": {"sources": [{"path": "d.jsonl"}]},
            "training": {"output_dir": "out", "metric_for_best_model": "charmatch.agreement"},
            "evaluation": {"metrics": ["loss", charmatch]}}
    assert Recipe.model_validate(base).evaluation.metrics == ["loss", charmatch]
    with pytest.raises(ValueError, match="charmatch.agreement' is not among the computed metrics"):
        Recipe.model_validate({**base, "evaluation": {"metrics": ["loss", "sacrebleu"]}})
    for bad, why in (([str(tmp_path / "nope.py")], "does not exist"), (["sacrebleu", "x/sacrebleu"], "keep one"),
                     (["evaluate-metric/rouge"], "named like the built-in rouge")):
        with pytest.raises(ValueError, match=why):
            EvaluationConfig(metrics=bad)


def test_compare_table_lists_module_figures():
    rows = compare.compare_table({"accuracy": 0.5, "sacrebleu.score": 10.0},
                                 {"accuracy": 0.6, "sacrebleu.score": 14.5, "chrf.score": 40.0})
    assert [r["metric"] for r in rows] == ["accuracy", "sacrebleu.score", "chrf.score"]
    assert rows[1]["delta"] == pytest.approx(4.5) and rows[2]["base"] is None


def test_a_run_picks_its_best_checkpoint_by_a_module_figure(charmatch, tmp_path):
    from test_train import fresh_accelerate_state, run_train, toy_recipe  # noqa: F401 (autouse fixture)

    run = run_train(toy_recipe(tmp_path, max_steps=9, eval_steps=3, save_steps=3,
                               metric_for_best_model="charmatch.agreement",
                               evaluation={"metrics": ["loss", charmatch], "compare_base": True}))
    metrics = json.loads((run / "metrics.json").read_text())
    evals = {h["step"]: h["validation"] for h in metrics["history"] if "validation" in h}
    best = max(evals, key=lambda s: (evals[s]["charmatch.agreement"], -s))
    assert metrics["best"]["step"] == best
    assert {"charmatch.agreement", "charmatch.length_ratio"} <= set(metrics["test"]) \
        and "charmatch.agreement" in metrics["base"]["test"]
    card = (run / "README.md").read_text()
    assert "| `charmatch.agreement` (evaluate) |" in card
