"""`ift templates ...` through ift.cli.main: output, exact error lines and exit codes."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path
from typing import Any

import pytest

from ift.cli import main
from ift.templates.files import promptsource_templates_dir
from ift.templates.library import TemplateLibrary

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HAS_PROMPTSOURCE = promptsource_templates_dir() is not None


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["templates", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture()
def news_rows(tmp_path: Path) -> list[dict[str, Any]]:
    rows = [{"headline": "Profit doubles", "label": "positive"},
            {"headline": "Plant closes", "label": "negative"},
            {"headline": "CEO to speak", "label": "neutral"}]
    (tmp_path / "news.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_help_and_list(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys)
    assert code == 0 and all(f"\n    {action} " in out for action in ("list", "show", "new", "preview", "validate"))
    code, out, _ = run(capsys, "list")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["TEMPLATE", "ID", "ORIGINAL_TASK", "ANSWER_CHOICES"]
    tpl = TemplateLibrary(promptsource=False).get("financial_phrasebank/investor_reading")
    assert any(line.split()[:3] == [tpl.ref, tpl.id, "yes"] and line.endswith("negative ||| neutral ||| positive")
               for line in lines)
    if HAS_PROMPTSOURCE:
        assert "+ promptsource: " in out


def test_list_one_dataset_and_unknown(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "list", "glue_sst2")
    assert code == 0 and len(out.splitlines()) == 4 and "glue_sst2/did_reviewer_like" in out
    code, out, err = run(capsys, "list", "nope_nothing", "--no-promptsource")
    assert code == 2 and out == ""
    assert err.startswith("error: no templates for dataset 'nope_nothing' — known datasets: alpaca, dialogsum, ")
    if HAS_PROMPTSOURCE:
        code, _, err = run(capsys, "list", "glue/sst2")
        assert (code, err) == (2, "error: no templates for dataset 'glue/sst2' — promptsource has it: use "
                                  "'promptsource:glue/sst2'\n")
        code, out, _ = run(capsys, "list", "promptsource:ag_news")
        assert code == 0 and "promptsource:ag_news/classify_question_first" in out


def test_show(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "show", "financial_phrasebank/bullish_or_bearish")
    assert code == 0
    assert "answer_choices:    bearish ||| neutral ||| bullish\n" in out
    assert "variables:         sentence, sentiment\n" in out
    assert "jinja:\n  {{sentence}}\n\n  Is this bearish" in out
    code, out, err = run(capsys, "show", "financial_phrasebank/bullish_or_bearis", "--no-promptsource")
    assert (code, out) == (2, "")
    assert err == ("error: unknown template 'financial_phrasebank/bullish_or_bearis' — did you mean: "
                   "financial_phrasebank/bullish_or_bearish\n")


def test_new_round_trip(capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "my_templates"
    code, out, _ = run(capsys, "new", "finance_news", "--name", "first", "--templates-dir", str(root),
                       "--jinja", "{{headline}}\nSentiment?\n|||\n{{label}}", "--choices", "negative ||| positive",
                       "--original-task")
    assert code == 0 and out.startswith("added finance_news/first (id ")
    path = root / "finance_news" / "templates.yaml"
    before = path.read_bytes()
    code, out, _ = run(capsys, "new", "finance_news", "--name", "second", "--templates-dir", str(root))
    assert code == 0 and "my_templates/finance_news/templates.yaml:" in out
    assert path.read_bytes().startswith(before)  # the first entry is byte-for-byte unchanged
    code, out, _ = run(capsys, "list", "finance_news", "--templates-dir", str(root), "--no-promptsource")
    names = [line.split()[0] for line in out.splitlines()[1:]]
    assert names[:2] == ["finance_news/first", "finance_news/second"]  # user folders come first
    assert "finance_news/headline_sentiment" in names  # the repo's templates of the dataset follow
    code, _, err = run(capsys, "new", "finance_news", "--name", "first", "--templates-dir", str(root))
    assert (code, err) == (2, "error: template 'first' already exists for dataset 'finance_news' "
                              "(my_templates/finance_news/templates.yaml) — choose another --name\n")
    code, _, err = run(capsys, "new", "finance_news", "--name", "broken", "--templates-dir", str(root),
                       "--jinja", "{{ headline ||| x")
    assert code == 2 and err.startswith("error: Jinja syntax error in jinja of template 'finance_news/broken' at line 1")
    code, out, _ = run(capsys, "validate", str(root))
    assert (code, out) == (0, "ok: 2 templates in 1 file(s)\n")
    if HAS_PROMPTSOURCE:  # promptsource itself reads the file
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import promptsource.templates as pst
        monkeypatch.setattr(pst, "TEMPLATES_FOLDER_PATH", str(root))
        theirs = pst.DatasetTemplates("finance_news")
        assert theirs.all_template_names == ["first", "second"]
        assert theirs["first"].apply({"headline": "Up", "label": "positive"}) == ["Up\nSentiment?", "positive"]


def test_preview_json_csv_parquet(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                  news_rows: list[dict[str, Any]]) -> None:
    with open(tmp_path / "news.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["headline", "label"])
        writer.writeheader()
        writer.writerows(news_rows)
    import datasets

    datasets.Dataset.from_list(news_rows).to_parquet(str(tmp_path / "news.parquet"))
    capsys.readouterr()  # to_parquet's progress bar
    for name in ("news.jsonl", "news.csv", "news.parquet"):
        code, out, err = run(capsys, "preview", "finance_news/headline_sentiment", "--data", str(tmp_path / name),
                             "--n", "2")
        assert (code, err) == (0, "")
        assert out.count("--- row ") == 2
        assert "[prompt]\nHeadline: Profit doubles\nIs the news positive, negative or neutral?\n[target]\npositive\n" in out
        assert "[answer_choices] negative | neutral | positive" in out


def test_preview_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path, news_rows: list[dict[str, Any]],
                        monkeypatch: pytest.MonkeyPatch) -> None:
    data = str(tmp_path / "news.jsonl")
    code, _, err = run(capsys, "preview", "support_summaries/tldr", "--data", data)
    assert (code, err) == (2, f"error: template 'support_summaries/tldr' uses 'summary', 'text', not a column of the "
                              f"data ({data}) — available columns: headline, label\n")
    # the loader training uses reads --data: the same wording as a recipe's source, with --data as where
    code, _, err = run(capsys, "preview", "finance_news/headline_sentiment", "--data", str(tmp_path / "missing.jsonl"))
    assert (code, err) == (2, f"error: data file or folder not found: {tmp_path / 'missing.jsonl'} (--data) — check "
                              f"the path (relative paths start from {Path.cwd()}), or give a Hub dataset id\n")
    monkeypatch.setattr("ift.data.sources.hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    code, _, err = run(capsys, "preview", "finance_news/headline_sentiment", "--data", "someone/finance_news:default")
    assert code == 2 and err.startswith("error: the Hugging Face Hub is not reachable, so dataset 'someone/finance_news' "
                                        "(config 'default') cannot be loaded (--data) — ")
    assert "local .jsonl/.csv/.parquet file" in err and err.count("\n") == 1
    (tmp_path / "empty.jsonl").write_text("")  # was an IndexError from a second, different loader
    code, _, err = run(capsys, "preview", "finance_news/headline_sentiment", "--data", str(tmp_path / "empty.jsonl"))
    assert (code, err.split(" — ")[0]) == (2, f"error: data file {tmp_path / 'empty.jsonl'} is empty (--data)")
    folder = tmp_path / "splits"
    folder.mkdir()
    (folder / "train.jsonl").write_text(news_rows_text(news_rows))
    (folder / "dev.jsonl").write_text(news_rows_text(news_rows[:1]))
    code, out, _ = run(capsys, "preview", "finance_news/headline_sentiment", "--data", str(folder), "--split", "dev")
    assert code == 0 and out.startswith(f"finance_news/headline_sentiment on 1 rows of {folder} (dev)")
    code, _, err = run(capsys, "preview", "finance_news/headline_sentiment", "--data", str(folder), "--split", "test")
    assert (code, err) == (2, f"error: split 'test' is not in {folder} (it has: validation, train) (--split) — choose "
                              "--split among: validation, train\n")


def news_rows_text(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def test_preview_skipped_rows(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text('{"headline": "a", "label": ""}\n')
    code, out, _ = run(capsys, "preview", "finance_news/headline_sentiment", "--data", str(tmp_path / "d.jsonl"))
    assert code == 0 and "(skipped: the template renders an empty prompt or target for this row)" in out


def test_validate_repo_templates(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "validate")
    assert (code, err) == (0, "")
    assert out.startswith("ok: ") and out.endswith(" file(s)\n")


def test_validate_findings(capsys: pytest.CaptureFixture[str], tmp_path: Path, news_rows: list[dict[str, Any]],
                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t" / "news").mkdir(parents=True)
    (tmp_path / "t" / "news" / "templates.yaml").write_text(
        "dataset: news\ntemplates:\n"
        "  00000000-0000-4000-8000-000000000001: !Template\n"
        "    answer_choices: bad ||| good\n    id: 00000000-0000-4000-8000-000000000001\n"
        "    jinja: '{{headline}} ||| {{label}}'\n    name: off_choices\n    reference: ''\n"
        "  00000000-0000-4000-8000-000000000002: !Template\n"
        "    id: 00000000-0000-4000-8000-000000000002\n"
        "    jinja: '{{headlines}} ||| {{label}}'\n    name: typo\n    reference: ''\n")
    (tmp_path / "t" / "broken").mkdir()
    (tmp_path / "t" / "broken" / "templates.yaml").write_text("dataset: broken\ntemplates:\n  - [\n")
    code, out, err = run(capsys, "validate", "t", "--data", "news.jsonl")
    assert code == 2
    assert out == "2 templates in 2 file(s), against 3 rows of news.jsonl: 3 problem(s)\n"
    lines = err.splitlines()
    # the YAML parser's own wording differs between libyaml and pure-Python PyYAML
    assert lines[0].startswith("error: YAML syntax error: ")
    assert lines[0].endswith(" (t/broken/templates.yaml:4) — fix the YAML")
    assert lines[1:] == [
        "error: template 'news/off_choices': target 'positive' is not among answer_choices for 3 of 3 rows "
        "(t/news/templates.yaml:3, first row 0) — answer_choices are ['bad', 'good']; make the target one of them "
        "(e.g. {{answer_choices[label]}})",
        "error: template 'news/typo' uses unknown variable 'headlines' (t/news/templates.yaml:9) — the data has no "
        "column 'headlines'; available columns: headline, label",
    ]
    code, out, err = run(capsys, "validate", "finance_news/for_investors", "--data", "news.jsonl", "--no-promptsource")
    assert (code, out, err) == (0, "ok: 1 template (finance_news/for_investors), against 3 rows of news.jsonl\n", "")
    code, _, err = run(capsys, "validate", "nothing_here")
    assert (code, err) == (2, "error: no such file, folder or template: 'nothing_here' — pass a templates.yaml, a "
                              "folder of them, or dataset/name\n")


SHIPPED_DATA = [
    ("templates/financial_phrasebank", "financial_phrasebank_allagree/all.jsonl", "train"),
    ("templates/dialogsum", "dialogsum", "validation"),
    ("templates/tweet_eval_emotion", "tweet_eval_emotion", "validation"),
    ("templates/glue_sst2", "glue_sst2", "validation"),
    ("templates/pubmedqa_pqal", "pubmedqa_pqal", "test"),
]


@pytest.mark.parametrize(("templates", "data", "split"), SHIPPED_DATA)
def test_validate_shipped_templates_on_real_data(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                                 templates: str, data: str, split: str) -> None:
    if not (DATA / data).exists():
        pytest.skip(f"{DATA / data} not present")
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    code, out, err = run(capsys, "validate", templates, "--data", str(DATA / data), "--split", split, "--n", "300")
    assert (code, err) == (0, "")
    assert out.startswith("ok: ")
