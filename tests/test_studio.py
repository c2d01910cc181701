"""ift studio: sources, drafts, tokens, saving and runs called directly; the app's error handling and binding; and
the whole flow driven in headless Chromium (Debian's package, through Playwright), with screenshots.

    python tests/test_studio.py docs/images     # the browser flow alone, writing the docs' screenshots
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="ift studio needs the studio extra (pip install 'ift[studio]')")

from starlette.testclient import TestClient  # noqa: E402

from ift.errors import IftError  # noqa: E402
from ift.studio import drafts, runs, saving, server, sources, tokens  # noqa: E402
from ift.studio.app import StudioConfig, create_app  # noqa: E402
from ift.templates.files import read_file, save_template  # noqa: E402
from ift.templates.library import TemplateLibrary  # noqa: E402
from ift.templates.template import Template  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
HEADLINES = [
    ("Quarry Cement operating margin up 17.5% on higher demand", "positive"),
    ("Keller Logistics suspends dividend after a weak first half", "negative"),
    ("Meridian Chemicals to publish second quarter results on Thursday", "neutral"),
    ("Juniper Pharma beats forecasts as order intake climbs", "positive"),
    ("Pinecrest Hotels names new site manager", "neutral"),
    ("Harbor Steel cuts outlook as demand slows", "negative"),
]


def write_data(folder: Path, rows: int = 36) -> Path:
    """A folder with train.jsonl and test.jsonl of headlines and labels."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", rows), ("test", 6)):
        lines = [json.dumps({"headline": f"{HEADLINES[i % 6][0]} ({split} {i})", "label": HEADLINES[i % 6][1]})
                 for i in range(n)]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def write_run(folder: Path) -> Path:
    """A run folder as training writes it: metrics.json with history and base/fine-tuned test figures, a
    predictions file and the plots drawn from the history."""
    from ift.evaluation.evaluate import write_predictions
    from ift.run import RunDir
    from ift.training.plots import write_plots

    rd = RunDir(folder)
    history = [{"step": s, "train_loss": 2.0 / s, "learning_rate": 1e-3 * (1 - s / 12),
                **({"validation": {"loss": 2.2 / s, "accuracy": 0.3 + 0.05 * s}} if s % 4 == 0 else {})}
               for s in range(1, 13)]
    figures = {"accuracy": 0.5, "macro_f1": 0.45, "loss": 1.2}
    tuned = {"accuracy": 0.83, "macro_f1": 0.82, "loss": 0.4}
    rd.record_training(history=history, best={"step": 12, "metric": "accuracy", "value": 0.9},
                       test=tuned, base={"test": figures})
    predictions = []
    for i, (headline, label) in enumerate(HEADLINES * 2):
        guess = label if i % 3 else "neutral"
        predictions.append({"prompt": f"Headline: {headline}\nSentiment?", "target": label, "prediction": guess,
                            "correct": guess == label, "correct_norm": guess == label, "choice_scores": None,
                            "mode": "rank", "source": "news", "template": "news/" + ("short" if i % 2 else "long")})
    write_predictions(rd.predictions("test"), predictions)
    write_plots(rd.path)
    return folder


def save_tiny_tokenizer(folder: Path) -> Path:
    from conftest import build_tiny_tokenizer

    build_tiny_tokenizer().save_pretrained(folder)
    return folder


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def validate_cli(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ift", "templates", "validate", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


# ------------------------------------------------------------------------------------------------ sources


def test_a_local_folder_opens_with_splits_columns_rows_and_labels(tmp_path):
    opened = sources.open_source(sources.SourceSpec("path", path=str(write_data(tmp_path / "news"))))
    assert sorted(opened.splits) == ["test", "train"] and opened.first_split() == "train"
    assert opened.columns("train") == [("headline", "string"), ("label", "string")]
    page = opened.rows("train", 30, 10)
    assert [i for i, _ in page] == list(range(30, 36)) and page[0][1]["headline"].endswith("(train 30)")
    assert opened.label_columns("train") == ["label"]
    assert opened.label_counts("train", "label") == [("positive", 12), ("negative", 12), ("neutral", 12)]
    with pytest.raises(IftError, match="split 'dev' is not in"):
        opened.split("dev")


def test_a_recipe_source_opens_as_training_reads_it(tmp_path):
    data = write_data(tmp_path / "news")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""model: {{name_or_path: x}}
data:
  sources:
    - path: {data}
      columns: {{headline: text}}
      labels: {{label: [negative, neutral, positive]}}
      templates: [finance_news/headline_sentiment]
training: {{output_dir: {tmp_path / "run"}}}
""")
    opened = sources.open_source(sources.SourceSpec("recipe", recipe=str(recipe), index=0))
    assert "text" in opened.split("train").column_names  # the recipe's renames applied
    assert opened.template_refs == ["finance_news/headline_sentiment"]
    with pytest.raises(IftError, match="no source 3"):
        sources.open_source(sources.SourceSpec("recipe", recipe=str(recipe), index=3))


def test_a_hub_id_reads_its_local_copy_through_the_data_map(shared_data):
    spec = sources.SourceSpec("hub", path="takala/financial_phrasebank", config="sentences_allagree",
                              data_map=str(ROOT / "tests" / "shared_data.yaml"))
    opened = sources.open_source(spec)
    assert "label" in opened.split("train").column_names and opened.declared.path == "takala/financial_phrasebank"
    counts = dict(opened.label_counts("train", "label"))
    assert sum(counts.values()) == len(opened.split("train")) and len(counts) == 3


def test_a_missing_file_is_one_clear_error(tmp_path):
    with pytest.raises(IftError, match="data file or folder not found"):
        sources.open_source(sources.SourceSpec("path", path=str(tmp_path / "nowhere.jsonl")))


# ------------------------------------------------------------------------------------------------ drafts


def _rows(n: int = 6) -> list[dict]:
    return [{"headline": h, "label": lab} for h, lab in (HEADLINES * 2)[:n]]


def test_a_draft_renders_as_the_library_renders():
    draft = drafts.Draft(dataset="news", name="short", jinja="Headline: {{headline}}\n|||\n{{label}}",
                         choices="negative ||| neutral ||| positive")
    tpl = draft.template()
    rows = _rows()
    rendered = drafts.render(tpl, list(enumerate(rows)))
    assert [(r.prompt, r.target) for r in rendered] == [tpl.render(row) for row in rows]
    assert rendered[0].choices == ["negative", "neutral", "positive"] and not rendered[0].skipped
    assert drafts.check(tpl, rows, ["headline", "label"]) == []


def test_a_draft_reports_what_templates_validate_reports():
    rows, columns = _rows(), ["headline", "label"]
    broken = drafts.Draft(name="b", jinja="{{ headline ||| {{label}}").template()
    assert "Jinja syntax error" in drafts.check(broken, rows, columns)[0].what
    unknown = drafts.check(drafts.Draft(name="u", jinja="{{title}} ||| {{label}}").template(), rows, columns)
    assert "unknown variable 'title'" in unknown[0].what
    off = drafts.check(drafts.Draft(name="o", jinja="{{headline}} ||| {{label}}", choices="up ||| down").template(),
                       rows, columns)
    assert "is not among answer_choices" in off[0].what
    assert "has no name" in drafts.check(drafts.Draft(jinja="{{headline}} ||| x").template(), rows, columns)[0].what


def test_the_sandbox_refuses_an_unsafe_draft():
    tpl = drafts.Draft(name="evil", jinja="{{ headline.__class__.__mro__ }} ||| x").template()
    rendered = drafts.render(tpl, [(0, _rows(1)[0])])
    assert rendered[0].error is not None and "unsafe operation blocked" in rendered[0].error.what
    assert "unsafe operation blocked" in drafts.check(tpl, _rows(), ["headline", "label"])[0].what


def test_a_template_that_skips_rows_says_so():
    tpl = drafts.Draft(name="s", jinja="{% if label == 'neutral' %}{{headline}} ||| {{label}}{% endif %}").template()
    rendered = drafts.render(tpl, list(enumerate(_rows(3))))
    assert [r.skipped for r in rendered] == [True, True, False]


# ------------------------------------------------------------------------------------------------ tokens


def test_the_token_view_marks_the_completion_as_training_encodes_it(tmp_path):
    from ift.data.encoding import encode_pairs

    folder = save_tiny_tokenizer(tmp_path / "tok")
    encoder = tokens.load_encoder(tokens.TokenizerSpec(str(folder), kind="causal", chat_template="none"))
    prompt, target = "Headline: profits up. Sentiment:", "positive"
    [row] = tokens.token_rows(encoder, [(4, prompt, target, ["negative", "positive"])])
    [(p_ids, c_ids)] = encode_pairs(encoder.tokenizer, "causal", [prompt], [target])
    assert row.index == 4 and len(row.tokens) == len(p_ids) + len(c_ids) and row.loss == len(c_ids)
    assert [loss for _, loss in row.tokens] == [False] * len(p_ids) + [True] * len(c_ids)
    loss_text = "".join(piece for piece, loss in row.tokens if loss)
    assert loss_text.strip().startswith(target) and loss_text.endswith(encoder.tokenizer.eos_token)


def test_the_token_view_truncates_and_wraps_as_the_data_settings_say(tmp_path):
    folder = save_tiny_tokenizer(tmp_path / "tok")
    long_prompt = "Revenue was flat compared with the previous year. " * 20
    cut = tokens.load_encoder(tokens.TokenizerSpec(str(folder), kind="causal", max_length=24))
    [row] = tokens.token_rows(cut, [(0, long_prompt, "neutral", None)])
    assert len(row.tokens) == 24 and row.truncated == tokens.CUT_NOTES[1]
    chat = tokens.load_encoder(tokens.TokenizerSpec(str(folder), kind="causal", chat_template="chatml"))
    [row] = tokens.token_rows(chat, [(0, "Is it good?", "yes", None)])
    text = "".join(piece for piece, _ in row.tokens)
    assert text.startswith("<|im_start|>user") and "<|im_end|>" in "".join(p for p, loss in row.tokens if loss)


def test_a_tokenizer_alone_needs_the_model_kind(tmp_path):
    folder = save_tiny_tokenizer(tmp_path / "tok")
    with pytest.raises(IftError, match="cannot tell the model kind"):
        tokens.load_encoder(tokens.TokenizerSpec(str(folder)))


# ------------------------------------------------------------------------------------------------ saving


def test_saving_keeps_ids_and_every_other_entry_byte_for_byte(tmp_path):
    path = tmp_path / "tpl" / "finance_news" / "templates.yaml"
    path.parent.mkdir(parents=True)
    shutil.copy(ROOT / "templates" / "finance_news" / "templates.yaml", path)
    before = path.read_text()
    first, *others = read_file(path).templates
    edited = Template(name=first.name, id=first.id, jinja="News: {{headline}}\n|||\n{{label}}",
                      answer_choices_jinja=first.answer_choices_jinja, metadata=first.metadata)
    save_template(path, edited)
    after = read_file(path).templates
    assert [t.id for t in after] == [first.id, *(t.id for t in others)]
    assert after[0].jinja == edited.jinja and [t.jinja for t in after[1:]] == [t.jinja for t in others]
    for entry in others:  # each untouched entry's lines are still in the file, exactly
        block = before[before.index(f"  {entry.id}: !Template"):]
        block = block[:block.find("\n  ", block.find("reference:"))]
        assert block in path.read_text()
    with pytest.raises(IftError, match="already exists in this file"):
        save_template(path, Template(name=others[0].name, id="f" * 8, jinja="{{headline}} ||| {{label}}"))


def test_save_writes_only_the_named_file_which_validates_and_the_snippet_resolves(tmp_path):
    data = write_data(tmp_path / "news")
    before = tree(tmp_path)
    draft = drafts.Draft(dataset="news", name="short", jinja="{{headline}}\n|||\n{{label}}",
                         choices="negative ||| neutral ||| positive", original_task=True, metrics=["Accuracy"])
    target = tmp_path / "mine" / "news" / "templates.yaml"
    saved = saving.save(draft.template(), str(target), {"path": str(data)})
    after = tree(tmp_path)
    assert set(after) - set(before) == {"mine/news/templates.yaml"}
    assert all(after[k] == v for k, v in before.items())
    assert saved.findings == [] and saved.template.id == draft.id
    result = validate_cli(target)
    assert result.returncode == 0, result.stderr
    assert "ok: 1 templates in 1 file(s)" in result.stdout
    snippet = __import__("yaml").safe_load(saved.snippet)["data"]
    library = TemplateLibrary(dirs=snippet["templates_dir"], promptsource=False)
    assert library.get(snippet["sources"][0]["templates"][0]).id == draft.id
    assert snippet["sources"][0]["path"] == str(data)
    draft.jinja = "Headline: {{headline}}\n|||\n{{label}}"  # saved again: the same entry, rewritten
    again = saving.save(draft.template(), str(target))
    assert [t.id for t in read_file(target).templates] == [draft.id] and again.template.jinja == draft.jinja


def test_save_refuses_what_is_not_a_templates_file(tmp_path):
    other = tmp_path / "notes.txt"
    with pytest.raises(IftError, match="ends in .yaml"):
        saving.save(drafts.Draft(dataset="d", name="n", jinja="{{a}} ||| {{b}}").template(), str(other))
    assert not other.exists()


# ------------------------------------------------------------------------------------------------ runs


def test_a_run_shows_its_curves_comparison_and_predictions(tmp_path):
    run = write_run(tmp_path / "runs" / "news")
    view = runs.open_run(run)
    assert {"loss.png", "metrics.png"} <= set(view.plots)
    rows = {r["metric"]: r for r in view.comparisons["test"]}
    assert rows["accuracy"]["base"] == 0.5 and rows["accuracy"]["fine-tuned"] == 0.83
    assert view.predictions == ["test"] and runs.list_runs(tmp_path / "runs") == [run]
    every = runs.read_predictions(run, "test")
    wrong = runs.filter_predictions(every, result="wrong")
    assert wrong.total == 12 and len(wrong.rows) == sum(not r["correct"] for r in every) > 0
    short_pos = runs.filter_predictions(every, template="news/short", label="positive")
    assert short_pos.rows and all(r["template"] == "news/short" and r["target"] == "positive" for r in short_pos.rows)
    by_template = {name: acc for name, _, acc in wrong.by_template}
    assert by_template["news/long"] == sum(r["correct"] for r in every if r["template"] == "news/long") / 6
    with pytest.raises(IftError, match="no plot"):
        runs.plot_path(run, "../metrics.json")


def test_a_broken_run_file_is_named(tmp_path):
    run = write_run(tmp_path / "run")
    (run / "predictions" / "test.jsonl").write_text('{"prompt": "a"}\nnot json\n')
    with pytest.raises(IftError, match=r"test.jsonl:2"):
        runs.read_predictions(run, "test")
    (run / "metrics.json").write_text("{broken")
    with pytest.raises(IftError, match="metrics file is not valid JSON"):
        runs.open_run(run)


# ------------------------------------------------------------------------------------------------ the app


def _opened(html: str) -> str:
    import html as html_lib

    return html_lib.unescape(re.search(r'name="opened" value="([^"]*)"', html).group(1))


def test_the_app_shows_errors_in_the_page_and_keeps_serving(tmp_path, monkeypatch):
    data = write_data(tmp_path / "news")
    client = TestClient(create_app(StudioConfig(runs_dir=str(tmp_path))), raise_server_exceptions=False)
    missing = client.post("/source", data={"origin": "path", "source": str(tmp_path / "nope.jsonl"), "action": "open"})
    assert missing.status_code == 200 and "data file or folder not found" in missing.text
    assert "Traceback" not in missing.text
    opened = client.post("/source", data={"origin": "path", "source": str(data), "action": "open"})
    assert 'id="rows"' in opened.text and "my_template" in opened.text  # a starter over the source's columns
    form = {"opened": _opened(opened.text), "opened_split": "train", "rows": ["0", "1"], "name": "t",
            "dataset": "news", "jinja": "Headline: {{headline}}\r\n|||\r\n{{label}}", "sample_n": "2"}
    good = client.post("/preview", data=form)
    assert "no problems" in good.text and "Headline: " + HEADLINES[0][0] in good.text
    bad = client.post("/preview", data={**form, "jinja": "{% for %} ||| x"})
    assert "Jinja syntax error" in bad.text
    broken_file = tmp_path / "broken" / "templates.yaml"
    broken_file.parent.mkdir()
    broken_file.write_text("dataset: news\ntemplates: [unclosed\n")
    refused = client.post("/save", data={**form, "save_path": str(broken_file)})
    assert "YAML syntax error" in refused.text and broken_file.read_text() == "dataset: news\ntemplates: [unclosed\n"
    (tmp_path / "badrun").mkdir()
    (tmp_path / "badrun" / "metrics.json").write_text("[1, 2")
    assert "metrics file is not valid JSON" in client.post("/runs/view", data={"run": str(tmp_path / "badrun")}).text

    def explode(*args, **kwargs):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(drafts, "render", explode)  # a bug in the studio: one line in the page, not a dead server
    crashed = client.post("/preview", data=form)
    assert crashed.status_code == 200 and "RuntimeError: kaboom" in crashed.text and "Traceback" not in crashed.text
    monkeypatch.undo()
    assert client.get("/").status_code == 200 and "no problems" in client.post("/preview", data=form).text


def test_start_from_a_shipped_or_a_p3_template(tmp_path):
    from ift.templates.files import promptsource_templates_dir

    client = TestClient(create_app(StudioConfig()))
    opened = client.post("/source", data={"origin": "path", "source": str(ROOT / "data" / "finance_news"),
                                          "action": "open"})
    assert 'value="finance_news"' in opened.text  # the library key the source's name matches
    shipped = TemplateLibrary(promptsource=False).get("finance_news/headline_sentiment")
    assert shipped.id in opened.text  # the editor starts from the dataset's first template, its id kept
    listed = client.post("/start", data={"library_key": "finance_news"})
    assert "finance_news/headline_sentiment" in listed.text
    loaded = client.post("/template", data={"start_from": "finance_news/headline_sentiment"})
    assert shipped.id in loaded.text and 'id="save_path"' in loaded.text and "hx-swap-oob" in loaded.text
    if promptsource_templates_dir() is None:
        return
    p3 = TemplateLibrary().list("promptsource:ag_news")[0]
    copied = client.post("/template", data={"start_from": p3.ref})
    assert "answer choices" in copied.text and p3.id not in copied.text  # a copy: an id of its own
    assert 'id="save_path"' not in copied.text


def test_a_post_from_another_site_is_refused(tmp_path):
    client = TestClient(create_app(StudioConfig()))
    target = tmp_path / "t" / "templates.yaml"
    form = {"dataset": "d", "name": "n", "jinja": "{{a}} ||| {{b}}", "save_path": str(target)}
    refused = client.post("/save", data=form, headers={"Origin": "http://evil.example"})
    assert refused.status_code == 403 and not target.exists()
    assert "saved" in client.post("/save", data=form, headers={"Origin": "http://testserver"}).text
    assert target.exists()


def test_the_studio_binds_loopback_unless_told(tmp_path):
    from ift.cli import build_parser

    args = build_parser().parse_args(["studio"])
    assert args.host == "127.0.0.1"
    running = server.start(StudioConfig(runs_dir=str(tmp_path)))
    try:
        assert running.address[0] == "127.0.0.1" and running.url.startswith("http://127.0.0.1:")
        import urllib.error
        import urllib.request

        with urllib.request.urlopen(running.url, timeout=10) as response:
            assert response.status == 200 and b"ift studio" in response.read()
        rebound = urllib.request.Request(running.url, headers={"Host": f"evil.example:{running.address[1]}"})
        with pytest.raises(urllib.error.HTTPError) as refused:  # another name resolving to 127.0.0.1
            urllib.request.urlopen(rebound, timeout=10)
        assert refused.value.code == 400
    finally:
        running.stop()
    assert server.is_loopback("127.0.0.1") and server.is_loopback("::1") and not server.is_loopback("0.0.0.0")


def test_ift_studio_serves_on_loopback_and_opens_the_data_given(tmp_path):
    import urllib.request

    data = write_data(tmp_path / "news")
    proc = subprocess.Popen([sys.executable, "-u", "-m", "ift", "studio", "--port", "0", "--data", str(data),
                             "--runs", str(tmp_path), "--no-promptsource"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        url = re.search(r"http://\S+/", line)
        assert url and url.group(0).startswith("http://127.0.0.1:"), line
        with urllib.request.urlopen(url.group(0), timeout=30) as response:
            page = response.read().decode()
        assert f'value="{data}"' in page and 'hx-trigger="load"' in page  # the source opens as the page loads
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_busy_port_is_one_clear_error():
    held = server.bind("127.0.0.1", 0)
    try:
        with pytest.raises(IftError, match="cannot listen on 127.0.0.1"):
            server.bind("127.0.0.1", held.getsockname()[1])
    finally:
        held.close()


# ------------------------------------------------------------------------------------------------ the browser


def launch_chromium(playwright):
    """Debian's chromium, headless, in a fresh profile (Playwright makes a new user data dir for each launch); the
    reason it cannot start when it cannot."""
    if not Path(CHROMIUM).exists():
        return None, f"{CHROMIUM} is not installed (apt-get install -y chromium)"
    try:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, timeout=60_000,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"])
    except Exception as err:  # noqa: BLE001 - any launch failure is a reason to skip, said as it is
        return None, f"chromium did not start: {type(err).__name__}: {str(err).splitlines()[0]}"
    return browser, ""


def browser_flow(page, base: str, work: Path, shots: Path) -> dict:
    """The studio's flow as a person goes through it; a screenshot of each screen into `shots`."""
    from playwright.sync_api import expect

    data, tokenizer, run = work / "news", work / "tokenizer", work / "runs" / "news"
    target = work / "my_templates" / "news" / "templates.yaml"
    page.set_viewport_size({"width": 1500, "height": 1000})
    page.goto(base)
    # 1. open a local dataset: columns, labels, rows; a starter template over its columns is previewed
    page.fill("#source-path", str(data))
    page.click("#open-source")
    expect(page.locator("#rows")).to_contain_text("(train 0)")
    expect(page.locator("#labels")).to_contain_text("positive")
    expect(page.locator("#selected-rows .rendered").first).to_be_visible()
    page.screenshot(path=str(shots / "studio-source.png"))
    # 2. edit: the preview follows the text
    page.fill("#name", "headline_sentiment")
    page.fill("#jinja", "Headline: {{headline}}\nIs this news positive, negative or neutral?\n|||\n{{label}}")
    page.fill("#choices", "negative ||| neutral ||| positive")
    expect(page.locator("#selected-rows .prompt").first).to_contain_text("Is this news positive")
    expect(page.locator("#findings")).to_contain_text("no problems")
    # the tokenized view for a tokenizer, the loss-carrying tokens marked
    page.fill("input[name=tokenizer]", str(tokenizer))
    page.select_option("select[name=kind]", "causal")
    expect(page.locator("#tokens .tok.loss").first).to_be_visible(timeout=60_000)
    page.screenshot(path=str(shots / "studio-preview.png"), full_page=True)
    # 3. a broken template: the error in the page, the sandbox refusing Python internals
    page.fill("#jinja", "Headline: {{ headline.__class__.__mro__ }}\n|||\n{{label}}")
    expect(page.locator("#findings .error").first).to_contain_text("unsafe operation blocked")
    page.screenshot(path=str(shots / "studio-error.png"))
    page.fill("#jinja", "Headline: {{headline}}\n{% if x %}\n|||\n{{label}}")
    expect(page.locator("#findings .error").first).to_contain_text("Jinja syntax error")
    # 4. fixed again, saved into the file named, which validates
    page.fill("#jinja", "Headline: {{headline}}\nIs this news positive, negative or neutral?\n|||\n{{label}}")
    expect(page.locator("#findings")).to_contain_text("no problems")
    page.fill("#save_path", str(target))
    page.click("#save")
    expect(page.locator("#validated")).to_contain_text("ok")
    expect(page.locator("#snippet")).to_contain_text("news/headline_sentiment")
    page.locator("#save-panel").scroll_into_view_if_needed()
    page.screenshot(path=str(shots / "studio-save.png"))
    # 5. runs: curves, base vs fine-tuned, predictions filtered to the wrong ones
    page.goto(base + "runs")
    page.fill("#run-path", str(run))
    page.click("#open-run")
    expect(page.locator("#compare-test")).to_contain_text("accuracy")
    expect(page.locator("#prediction-count")).to_contain_text("12 of 12")
    page.select_option("#result-filter", "wrong")
    expect(page.locator("#prediction-count")).to_contain_text("4 of 12")
    page.screenshot(path=str(shots / "studio-runs.png"), full_page=True)
    return {"target": target}


def prepare(work: Path) -> None:
    write_data(work / "news")
    save_tiny_tokenizer(work / "tokenizer")
    write_run(work / "runs" / "news")


@pytest.mark.slow
def test_the_flow_in_a_real_browser(tmp_path):
    playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    prepare(tmp_path)
    shots = tmp_path / "shots"
    shots.mkdir()
    running = server.start(StudioConfig(runs_dir=str(tmp_path / "runs"), promptsource=False))
    try:
        with playwright_api.sync_playwright() as p:
            browser, why = launch_chromium(p)
            if browser is None:
                pytest.skip(why)
            try:
                page = browser.new_page()
                page.set_default_timeout(30_000)
                result = browser_flow(page, running.url, tmp_path, shots)
            finally:
                browser.close()
    finally:
        running.stop()
    target = result["target"]
    assert validate_cli(target).returncode == 0
    [saved] = read_file(target).templates
    assert saved.name == "headline_sentiment" and saved.answer_choices_jinja == "negative ||| neutral ||| positive"
    names = sorted(p.name for p in shots.iterdir())
    assert names == ["studio-error.png", "studio-preview.png", "studio-runs.png", "studio-save.png",
                     "studio-source.png"]
    assert all((shots / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names)
    # nothing but the named file was written next to the data
    assert sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "my_templates").rglob("*") if p.is_file()) \
        == ["my_templates/news/templates.yaml"]


def main(out: str) -> None:
    """Write the docs' screenshots (palette-compressed PNGs) from the same flow."""
    from PIL import Image
    from playwright.sync_api import sync_playwright

    sys.path.insert(0, str(Path(__file__).parent))
    out_dir = Path(out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(work)
        os.chdir(work)  # paths in the screenshots read short: news, runs/news, my_templates/...
        running = server.start(StudioConfig(runs_dir="runs", promptsource=False))
        try:
            with sync_playwright() as p:
                browser, why = launch_chromium(p)
                if browser is None:
                    raise SystemExit(why)
                page = browser.new_page()
                page.set_default_timeout(60_000)
                shots = work / "shots"
                shots.mkdir()
                relative = Path(".")
                browser_flow(page, running.url, relative, shots)
                browser.close()
        finally:
            running.stop()
        for png in sorted(shots.glob("*.png")):
            image = Image.open(png).convert("RGB").quantize(colors=64, method=Image.Quantize.MEDIANCUT)
            image.save(out_dir / png.name, optimize=True)
            print(out_dir / png.name, (out_dir / png.name).stat().st_size)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/images")
