"""ift.data.prepare: sources, carved and kept splits, leaks, mixtures, label masks, truncation, errors, collation."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import build_tiny_llama, build_tiny_tokenizer
import ift.data.prepare as D
import ift.data.sources as S
from ift.data.collate import Collator, eval_dataloader, train_dataloader
from ift.data.mixture import mixture_counts
from ift.data.splits import carve_indices
from ift.data.tokenization import INTACT, PROMPT_CUT, TokenEncoder, tokenize
from ift.cli import main as cli_main
from ift.data.encoding import encode_pairs
from ift.errors import IftError
from ift.recipe import DataConfig
from ift.templates.library import TemplateLibrary

TEMPLATES = {
    "toy": """dataset: toy
templates:
  00000000-0000-4000-8000-000000000001: !Template
    id: 00000000-0000-4000-8000-000000000001
    name: cls
    jinja: "Text: {{text}}\\nLabel? ||| {{label}}"
    answer_choices: neg ||| pos
    metadata: !TemplateMetadata {original_task: true, choices_in_prompt: false, metrics: [Accuracy]}
    reference: ''
  00000000-0000-4000-8000-000000000002: !Template
    id: 00000000-0000-4000-8000-000000000002
    name: cls2
    jinja: "{{text}} => ||| {{label}}"
    answer_choices: neg ||| pos
    metadata: !TemplateMetadata {original_task: true, choices_in_prompt: false, metrics: [Accuracy]}
    reference: ''
  00000000-0000-4000-8000-000000000003: !Template
    id: 00000000-0000-4000-8000-000000000003
    name: only_pos
    jinja: "{% if label == 'pos' %}{{text}} ||| {{label}}{% endif %}"
    metadata: !TemplateMetadata {original_task: false, choices_in_prompt: false, metrics: [Accuracy]}
    reference: ''
  00000000-0000-4000-8000-000000000004: !Template
    id: 00000000-0000-4000-8000-000000000004
    name: uses_missing
    jinja: "{{text}} {{author}} ||| {{label}}"
    metadata: !TemplateMetadata {original_task: false, choices_in_prompt: false, metrics: [Accuracy]}
    reference: ''
  00000000-0000-4000-8000-000000000005: !Template
    id: 00000000-0000-4000-8000-000000000005
    name: broken
    jinja: "{{text}} ||| {{ label ~ (1 / (label | length - 3)) }}"
    metadata: !TemplateMetadata {original_task: false, choices_in_prompt: false, metrics: [Accuracy]}
    reference: ''
""",
}

WORDS = "shares rose fell bank profit loss revenue flat company stock quarter news answer".split()
CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


# ------------------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """A fresh datasets cache per test module run; no progress bars in test output."""
    import datasets

    cache = tmp_path_factory.getbasetemp() / "hf_datasets_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    root = tmp_path_factory.mktemp("templates")
    for name, text in TEMPLATES.items():
        (root / name).mkdir()
        (root / name / "templates.yaml").write_text(text)
    return TemplateLibrary(dirs=[root], promptsource=False)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def toy_rows(n: int, seed: int = 0, pos_share: float = 0.3) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        words = " ".join(rng.choice(WORDS, size=4))
        rows.append({"text": f"row {i} {words}", "label": "pos" if rng.random() < pos_share else "neg", "id": i})
    return rows


def cfg(**kw) -> DataConfig:
    return DataConfig.model_validate(kw)


def src(path, **kw) -> dict:
    return {"path": str(path), "templates": ["toy/cls"], **kw}


# ------------------------------------------------------------------------------------- splits


def test_kept_splits_and_columns(tmp_path, library):
    folder = tmp_path / "kept"
    for split, n in (("train", 40), ("dev", 7), ("test", 9)):
        write_jsonl(folder / f"{split}.jsonl", toy_rows(n, seed=len(split)))
    prepared = D.build_splits(cfg(sources=[src(folder)]), library)
    sizes = {s: len(prepared.splits[s]) for s in ("train", "validation", "test")}
    assert sizes == {"train": 40, "validation": 7, "test": 9}  # dev.jsonl is the validation split
    row = prepared.splits["validation"][0]
    assert set(row) == {"prompt", "completion", "choices", "source", "template", "messages", "chat"}
    assert row["messages"] == [] and row["chat"] == ""  # a template row is no conversation
    assert row["prompt"].startswith("Text: row ") and row["completion"] in ("neg", "pos")
    assert row["choices"] == ["neg", "pos"] and row["source"] == "kept" and row["template"] == "toy/cls"
    assert prepared.report["sources"]["kept"]["own"] == ["train", "validation", "test"]
    json.dumps(prepared.report)  # JSON-able


def test_carved_splits_are_deterministic_and_sized(tmp_path, library):
    path = write_jsonl(tmp_path / "pool.jsonl", toy_rows(200))
    data = cfg(sources=[src(path)], validation_size=0.1, test_size=30, seed=3)
    a = D.build_splits(data, library)
    b = D.build_splits(data, library)
    assert [len(a.splits[s]) for s in ("train", "validation", "test")] == [150, 20, 30]
    for s in ("train", "validation", "test"):
        assert a.splits[s]["prompt"] == b.splits[s]["prompt"]
    ids = [set(a.splits[s]["prompt"]) for s in ("train", "validation", "test")]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    other = D.build_splits(cfg(sources=[src(path)], validation_size=0.1, test_size=30, seed=4), library)
    assert other.splits["validation"]["prompt"] != a.splits["validation"]["prompt"]


def test_carved_splits_survive_a_saved_and_reloaded_data_section(tmp_path, library):
    # a run saves its recipe with every default written out; a split it carved must stay carved on reload
    # (else `ift eval RUN --split validation` asks the source for a 'validation' split it never had)
    import yaml

    path = write_jsonl(tmp_path / "pool.jsonl", toy_rows(120))
    first = D.build_splits(cfg(sources=[src(path)], validation_size=10, test_size=10), library)
    assert first.data.sources[0].splits.model_dump() == {"train": "train", "validation": None, "test": None}
    dumped = yaml.safe_load(yaml.safe_dump(first.data.model_dump(mode="json")))
    again = D.build_splits(DataConfig.model_validate(dumped), library)
    for split in ("train", "validation", "test"):
        assert again.splits[split]["prompt"] == first.splits[split]["prompt"]


def test_size_zero_means_no_split(tmp_path, library):
    path = write_jsonl(tmp_path / "nozero.jsonl", toy_rows(40))
    prepared = D.build_splits(cfg(sources=[src(path)], validation_size=0.1, test_size=0), library)
    assert [len(prepared.splits[s]) for s in ("train", "validation", "test")] == [36, 4, 0]
    tiny = D.build_splits(cfg(sources=[src(write_jsonl(tmp_path / "five.jsonl", toy_rows(5)))], validation_size=0.05,
                              test_size=0.05), library)
    assert len(tiny.splits["validation"]) == 1 and len(tiny.splits["test"]) == 1  # a fraction gives at least a row


def test_carve_indices_are_machine_independent():
    # PCG64 with a fixed seed: these exact indices on every machine and numpy version we support
    picked = carve_indices(10, {"validation": 2, "test": 2}, np.random.default_rng([42, 7]))
    again = carve_indices(10, {"validation": 2, "test": 2}, np.random.default_rng([42, 7]))
    assert all((picked[k] == again[k]).all() for k in picked)
    assert sorted(np.concatenate(list(picked.values())).tolist()) == list(range(10))


def test_stratified_carving_keeps_label_proportions(tmp_path, library):
    rows = toy_rows(1000, seed=1, pos_share=0.2)
    path = write_jsonl(tmp_path / "strat.jsonl", rows)
    share = sum(r["label"] == "pos" for r in rows) / len(rows)
    prepared = D.build_splits(cfg(sources=[src(path)], validation_size=0.15, test_size=0.1, stratify_by="label"),
                              library)
    for split, n in (("validation", 150), ("test", 100)):
        labels = prepared.splits[split]["completion"]
        assert len(labels) == n
        assert abs(labels.count("pos") - share * n) <= 1  # largest-remainder allocation: within one row
    assert prepared.report["sources"]["strat"]["stratified_by"] == "label"


def test_template_modes_sample_all_and_eval_template(tmp_path, library):
    path = write_jsonl(tmp_path / "modes.jsonl", toy_rows(300))
    sample = D.build_splits(cfg(sources=[src(path, templates=["toy/cls", "toy/cls2"], eval_template="toy/cls")]),
                            library)
    used = Counter(sample.splits["train"]["template"])
    assert set(used) == {"toy/cls", "toy/cls2"} and min(used.values()) > 80  # one drawn per row, both used
    assert set(sample.splits["test"]["template"]) == {"toy/cls"}  # evaluation fixed to one template
    expanded = D.build_splits(cfg(sources=[src(path, templates=["toy/cls", "toy/cls2"], template_mode="all")]),
                              library)
    assert len(expanded.splits["train"]) == 2 * len(sample.splits["train"])


def test_skipped_rows_are_counted(tmp_path, library):
    rows = toy_rows(200, seed=2)
    path = write_jsonl(tmp_path / "skip.jsonl", rows)
    prepared = D.build_splits(cfg(sources=[src(path, templates=["toy/only_pos"])], seed=1), library)
    info = prepared.report["splits"]["train"]["sources"]["skip"]
    assert info["skipped"]["toy/only_pos"] == info["rows_in"] - info["rows"] > 0
    assert set(prepared.splits["train"]["completion"]) == {"pos"}


def test_raw_text_source(tmp_path, library):
    path = write_jsonl(tmp_path / "corpus.jsonl", [{"body": f"domain text number {i}"} for i in range(50)])
    prepared = D.build_splits(cfg(sources=[{"path": str(path), "text_column": "body"}]), library)
    row = prepared.splits["train"][0]
    assert row["prompt"] == "" and row["template"] == "" and row["completion"].startswith("domain text")


# ------------------------------------------------------------------------------------- label names


def _hub_shaped(rows: list[dict], folder: Path) -> Path:
    """The rows as a Hub dataset serves labels: a ClassLabel column of ids, in a parquet file."""
    import datasets

    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"]),
                                  "id": datasets.Value("int64")})
    folder.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(folder / "train.parquet"))
    return folder


def test_label_ids_and_label_names_prepare_the_same_rows(tmp_path, library):
    """`labels` names a column's ids: data served with ids (a ClassLabel, or plain numbers) reaches the rows of the
    same data written with the names, and names already there stay, carving and stratification included."""
    rows = toy_rows(60)
    named = write_jsonl(tmp_path / "named.jsonl", rows)
    numbers = write_jsonl(tmp_path / "ids.jsonl", [{**r, "label": ["neg", "pos"].index(r["label"])} for r in rows])
    hub = _hub_shaped(rows, tmp_path / "hub")
    direct = D.build_splits(cfg(sources=[src(named, name="toy")], stratify_by="label"), library).splits
    assert {r["completion"] for r in direct["train"]} == {"neg", "pos"}
    for path in (numbers, hub, named):
        labelled = cfg(sources=[src(path, name="toy", labels={"label": ["neg", "pos"]})], stratify_by="label")
        got = D.build_splits(labelled, library).splits
        assert {s: got[s].to_list() for s in got} == {s: direct[s].to_list() for s in direct}, path
        assert D.check_sources(labelled, library) == []
    unnamed = D.build_splits(cfg(sources=[src(numbers, name="toy")], stratify_by="label"), library).splits
    assert {r["completion"] for r in unnamed["train"]} == {"0", "1"}  # without them, the ids are the answers


def test_label_names_errors(tmp_path, library):
    rows = toy_rows(30)
    ids = [{**r, "label": ["neg", "pos"].index(r["label"])} for r in rows]
    ids[17]["label"] = 2
    err = _error(cfg(sources=[src(write_jsonl(tmp_path / "three.jsonl", ids), labels={"label": ["neg", "pos"]})]),
                 library)
    assert err.line() == ("value 2 of column 'label' is not one of its 2 labels (data.sources.0.labels.label, "
                          "split 'train', row 17) — list every label name, in the order of the ids (now ids 0 to 1 "
                          "name neg, pos)")
    strings = [dict(r) for r in rows]
    strings[3]["label"] = "maybe"
    path = write_jsonl(tmp_path / "maybe.jsonl", strings)
    err = _error(cfg(sources=[src(path, labels={"label": ["neg", "pos"]})]), library)
    assert "value 'maybe'" in err.what and err.where.endswith("row 3")
    assert [e.what for e in D.check_sources(cfg(sources=[src(path, labels={"label": ["neg", "pos"]})]), library)] \
        == [err.what]  # `ift validate` reads local data as training does
    err = _error(cfg(sources=[src(path, labels={"sentiment": ["neg", "pos"]})]), library)
    assert err.what == "column 'sentiment' given label names is not in the source"
    assert err.where == "data.sources.0.labels" and "id, label, text" in err.fix
    with pytest.raises(ValueError, match="each label name once"):
        cfg(sources=[src(path, labels={"label": ["neg", "neg"]})])
    scores = write_jsonl(tmp_path / "scores.jsonl", [{**r, "label": 0.5} for r in rows])
    err = _error(cfg(sources=[src(scores, labels={"label": ["neg", "pos"]})]), library)
    assert "holds double values" in err.what


def test_a_hub_source_is_loaded_with_its_data_dir_and_revision(tmp_path, library, monkeypatch):
    """config, data_dir and revision go to datasets.load_dataset as they are (the Hub's Parquet export of a
    dataset whose script no longer runs is `revision: refs/convert/parquet` with the config as `data_dir`)."""
    import datasets

    rows = toy_rows(40)
    hub = datasets.load_dataset("parquet", data_dir=str(_hub_shaped(rows, tmp_path / "hub")))
    calls = []
    monkeypatch.setattr(S, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **kw: calls.append((a, kw)) or hub)
    source = src("someone/finance-news", revision="refs/convert/parquet", data_dir="all_agree",
                 labels={"label": ["neg", "pos"]})
    got = D.build_splits(cfg(sources=[source]), library).splits
    assert calls == [(("someone/finance-news",), {"name": None, "data_dir": "all_agree",
                                                  "revision": "refs/convert/parquet", "split": None})]
    assert {r["completion"] for r in got["train"]} == {"neg", "pos"}


# ------------------------------------------------------------------------------------- leaks and mixtures


def test_leaks_leave_the_training_side(tmp_path, library):
    train, val, test = toy_rows(60, seed=1), toy_rows(10, seed=2), toy_rows(10, seed=3)
    for r in val + test:
        r["text"] += " unique"
    train[5] = dict(val[0])  # the same pair in train and validation
    train[6] = dict(test[1])  # ... in train and test
    val[3] = dict(test[2])  # ... in validation and test
    folder = tmp_path / "leaky"
    for name, rows in (("train", train), ("validation", val), ("test", test)):
        write_jsonl(folder / f"{name}.jsonl", rows)
    prepared = D.build_splits(cfg(sources=[src(folder)]), library)
    leaks = prepared.report["leaks"]
    assert leaks["removed"]["leaky"] == {"train": 2, "validation": 1}
    assert len(prepared.splits["train"]) == 58 and len(prepared.splits["validation"]) == 9
    assert len(prepared.splits["test"]) == 10  # test is never touched
    pairs = lambda s: set(zip(prepared.splits[s]["prompt"], prepared.splits[s]["completion"]))  # noqa: E731
    assert not pairs("train") & (pairs("validation") | pairs("test")) and not pairs("validation") & pairs("test")
    kept = D.build_splits(cfg(sources=[src(folder)], leak_check=False), library)
    assert len(kept.splits["train"]) == 60


def test_mixture_counts():
    assert mixture_counts({"a": 100, "b": 50}, None, None, {"a": 30, "b": None}) == {"a": 30, "b": 50}
    assert mixture_counts({"a": 100, "b": 50}, {"a": 0.51, "b": 0.49}, 1000, {}) == {"a": 510, "b": 490}
    # no total: the largest mixture that repeats no source
    assert mixture_counts({"a": 1000, "b": 100}, {"a": 0.5, "b": 0.5}, None, {}) == {"a": 100, "b": 100}


def test_weighted_mixture_on_10k_rows(tmp_path, library):
    a = write_jsonl(tmp_path / "fin.jsonl", [{"text": f"finance {i}"} for i in range(8000)])
    b = write_jsonl(tmp_path / "gen.jsonl", [{"text": f"general {i}"} for i in range(3000)])
    data = cfg(sources=[{"path": str(a), "weight": 0.51}, {"path": str(b), "weight": 0.49}],
               mixture={"strategy": "weighted", "total": 10000}, validation_size=50, test_size=50)
    prepared = D.build_splits(data, library)
    train = prepared.splits["train"]
    assert len(train) == 10000
    shares = Counter(train["source"])
    assert abs(shares["fin"] / 10000 - 0.51) <= 0.01 and abs(shares["gen"] / 10000 - 0.49) <= 0.01
    mix = prepared.report["mixture"]["sources"]
    assert mix["gen"]["repeated"] and mix["gen"]["repeated"] > 1  # 4900 rows from 2900: repeated, and said so
    assert len(set(train.filter(lambda r: r["source"] == "fin")["completion"])) == mix["fin"]["rows"]
    assert {s: len(prepared.splits["validation"].filter(lambda r, s=s: r["source"] == s)) for s in ("fin", "gen")} \
        == {"fin": 50, "gen": 50}  # validation stays per source


def test_proportional_mixture_with_cap(tmp_path, library):
    a = write_jsonl(tmp_path / "big.jsonl", [{"text": f"big {i}"} for i in range(500)])
    b = write_jsonl(tmp_path / "small.jsonl", [{"text": f"small {i}"} for i in range(100)])
    data = cfg(sources=[{"path": str(a)}, {"path": str(b)}], mixture={"strategy": "proportional", "cap": 200},
               validation_size=10, test_size=10)
    shares = Counter(D.build_splits(data, library).splits["train"]["source"])
    assert shares == {"big": 200, "small": 80}


# ------------------------------------------------------------------------------------- tokenization


def _tokenized(prepared, tokenizer, kind, **data_kw):
    data = cfg(sources=[{"path": "unused"}], **data_kw)
    return tokenize(prepared.splits, tokenizer, kind, data)


def _pairs_dataset(prompts, completions, templates=None):
    import datasets

    n = len(prompts)
    return datasets.DatasetDict({"train": datasets.Dataset.from_dict({
        "prompt": prompts, "completion": completions, "choices": [[]] * n, "source": ["s"] * n,
        "template": templates or ["t"] * n})})


def test_causal_label_mask_exact(tiny_tokenizer):
    prepared = D.PreparedData(_pairs_dataset(["Question: what is the answer?", "Headline: profits up."],
                                             ["yes", "positive"]))
    tokens, report = _tokenized(prepared, tiny_tokenizer, "causal")
    for row, prompt, completion in zip(tokens["train"], ["Question: what is the answer?", "Headline: profits up."],
                                       ["yes", "positive"]):
        p, c = encode_pairs(tiny_tokenizer, "causal", [prompt], [completion])[0]
        assert row["input_ids"] == p + c and row["labels"] == [-100] * len(p) + c
        assert c[-1] == tiny_tokenizer.eos_token_id and row["attention_mask"] == [1] * len(p + c)
        assert tiny_tokenizer.decode(c, skip_special_tokens=True).strip() == completion
        assert row["length"] == len(p + c)
    assert report["train"]["loss_tokens"] == sum(sum(t != -100 for t in r["labels"]) for r in tokens["train"])
    on_prompt, _ = _tokenized(prepared, tiny_tokenizer, "causal", train_on_prompt=True)
    assert on_prompt["train"][0]["labels"] == on_prompt["train"][0]["input_ids"]


def test_seq2seq_labels_are_the_completion(tiny_tokenizer):
    prepared = D.PreparedData(_pairs_dataset(["Summarize the conversation."], ["The agent agreed."]))
    tokens, _ = _tokenized(prepared, tiny_tokenizer, "seq2seq")
    row = tokens["train"][0]
    assert row["input_ids"] == tiny_tokenizer("Summarize the conversation.")["input_ids"]
    assert row["labels"] == tiny_tokenizer("The agent agreed.")["input_ids"] + [tiny_tokenizer.eos_token_id]
    assert len(row["attention_mask"]) == len(row["input_ids"])


def test_chat_wrapped_loss_is_the_assistant_turn():
    tok = build_tiny_tokenizer()
    tok.chat_template = CHAT
    prepared = D.PreparedData(_pairs_dataset(["Is the news positive?"], ["positive"]))
    tokens, _ = _tokenized(prepared, tok, "causal", chat_template=True)
    row = tokens["train"][0]
    loss = [t for t in row["labels"] if t != -100]
    first = row["labels"].index(loss[0])
    assert all(t == -100 for t in row["labels"][:first]) and row["labels"][first:] == row["input_ids"][first:]
    assert tok.decode(row["input_ids"][:first]) == "<|user|>Is the news positive?</s><|assistant|>"
    assert tok.decode(loss) == "positive</s>"  # the template's closing token carries loss too


def test_chat_template_closing_newline_gets_no_second_eos():
    tok = build_tiny_tokenizer()
    tok.chat_template = CHAT.replace("</s>{% endfor %}", "</s>\n{% endfor %}")  # ChatML closes turns with eos + "\n"
    prepared = D.PreparedData(_pairs_dataset(["Is the news positive?"], ["positive"]))
    row = _tokenized(prepared, tok, "causal", chat_template=True)[0]["train"][0]
    loss = [t for t in row["labels"] if t != -100]
    assert tok.decode(loss) == "positive</s>\n" and loss.count(tok.eos_token_id) == 1


def test_eos_keeps_its_label_when_pad_is_eos(tiny_tokenizer):
    tok = build_tiny_tokenizer()
    tok.pad_token = tok.eos_token
    prepared = D.PreparedData(_pairs_dataset(["Headline: profits up.", "Question: what is the answer? yes no"],
                                             ["positive", "no"]))
    tokens, _ = _tokenized(prepared, tok, "causal")
    batch = Collator(tok, "causal")(list(tokens["train"]))
    short = int(batch["attention_mask"].sum(1).argmin())
    n = int(batch["attention_mask"][short].sum())
    assert batch["labels"][short, n - 1] == tok.eos_token_id  # the real EOS is learned
    assert (batch["labels"][short, n:] == -100).all() and (batch["input_ids"][short, n:] == tok.pad_token_id).all()


def test_truncation_accounting(tiny_tokenizer):
    long_prompt = "Shares of the company rose after strong quarterly earnings. " * 6
    prompts = [long_prompt, "Revenue was flat.", long_prompt]
    completions = ["positive", "neutral", "The bank reported a loss and its stock fell sharply. " * 4]
    prepared = D.PreparedData(_pairs_dataset(prompts, completions))
    tokens, report = _tokenized(prepared, tiny_tokenizer, "causal", max_length=24, truncation="left")
    rows = tokens["train"]
    assert report["train"]["truncated"] == 1 and report["train"]["dropped"] == 1  # target too long: dropped
    cut = rows[0]
    p, c = encode_pairs(tiny_tokenizer, "causal", [long_prompt], ["positive"])[0]
    assert len(cut["input_ids"]) == 24 and cut["input_ids"][-len(c):] == c  # the target survives whole
    assert cut["input_ids"][: 24 - len(c)] == p[-(24 - len(c)):]  # left side of the prompt went
    assert cut["truncated"] == PROMPT_CUT and rows[1]["truncated"] == INTACT
    right, _ = _tokenized(prepared, tiny_tokenizer, "causal", max_length=24, truncation="right")
    assert right["train"][0]["input_ids"][: 24 - len(c)] == p[: 24 - len(c)]
    dropped, rep = _tokenized(prepared, tiny_tokenizer, "causal", max_length=24, truncation="drop")
    assert len(dropped["train"]) == 1 and rep["train"]["dropped"] == 2 and rep["train"]["truncated"] == 0


def test_error_split_empty_after_truncation(tiny_tokenizer):
    prepared = D.PreparedData(_pairs_dataset(["Revenue was flat."], ["The bank reported a loss. " * 5]))
    with pytest.raises(IftError) as info:
        _tokenized(prepared, tiny_tokenizer, "causal", max_length=8)
    assert "split 'train' ends up empty" in info.value.what and info.value.where == "data.max_length"


def test_chat_truncation_keeps_the_template_frame():
    tok = build_tiny_tokenizer()
    tok.chat_template = CHAT
    prompt = "The bank reported a loss and its stock fell sharply. " * 4 + "Is the news positive?"
    prepared = D.PreparedData(_pairs_dataset([prompt], ["negative"]))
    row = _tokenized(prepared, tok, "causal", chat_template=True, max_length=24)[0]["train"][0]
    text = tok.decode(row["input_ids"])
    assert len(row["input_ids"]) == 24 and row["truncated"] == PROMPT_CUT
    assert text.startswith("<|user|>") and text.endswith("positive?</s><|assistant|>negative</s>")
    assert "The bank" not in text  # the content was cut from the left, not the chat frame
    assert tok.decode([t for t in row["labels"] if t != -100]) == "negative</s>"
    with pytest.raises(IftError, match="no chat template"):
        _tokenized(prepared, build_tiny_tokenizer(), "causal", chat_template=True)


def test_long_raw_text_is_split_into_windows(tiny_tokenizer):
    text = "The bank reported a loss and its stock fell sharply. " * 10
    prepared = D.PreparedData(_pairs_dataset([""], [text], templates=[""]))
    tokens, report = _tokenized(prepared, tiny_tokenizer, "causal", max_length=32)
    rows = tokens["train"]
    full = sum((r["input_ids"] for r in rows), [])
    p, c = encode_pairs(tiny_tokenizer, "causal", [""], [text])[0]
    assert full == (p + c)[: len(full)] and len(full) >= len(p + c) - 1  # nothing lost but a 1-token tail
    assert all(len(r["input_ids"]) <= 32 for r in rows) and report["train"]["split_into_windows"] == 1
    assert report["train"]["dropped"] == 0 and report["train"]["windows"] == len(rows) > 1


def test_tokenize_is_cached(tmp_path, library, tiny_tokenizer, monkeypatch):
    path = write_jsonl(tmp_path / "cache.jsonl", toy_rows(120))
    data = cfg(sources=[src(path)])
    first, _ = tokenize(D.build_splits(data, library).splits, tiny_tokenizer, "causal", data)
    calls = []
    original = TokenEncoder.__call__
    monkeypatch.setattr(TokenEncoder, "__call__", lambda self, t: calls.append(1) or original(self, t))
    again, _ = tokenize(D.build_splits(data, library).splits, tiny_tokenizer, "causal", data)
    assert not calls and again["train"].cache_files == first["train"].cache_files
    assert again["train"]["input_ids"] == first["train"]["input_ids"]


# ------------------------------------------------------------------------------------- errors


def _error(data: DataConfig, library) -> IftError:
    with pytest.raises(IftError) as info:
        D.build_splits(data, library)
    return info.value


def test_error_missing_file(tmp_path, library):
    err = _error(cfg(sources=[src(tmp_path / "nope.jsonl")]), library)
    assert "not found" in err.what and err.where == "data.sources.0.path"


def test_error_unknown_format(tmp_path, library):
    path = tmp_path / "rows.xlsx"
    path.write_text("x")
    err = _error(cfg(sources=[src(path)]), library)
    assert "unknown data format '.xlsx'" in err.what and ".jsonl" in err.fix


def test_error_unreadable_file(tmp_path, library):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok", "label": "pos"}\n{not json\n')
    err = _error(cfg(sources=[src(path)]), library)
    assert "cannot read" in err.what and err.where == "data.sources.0.path"


def test_error_hub_unreachable(library, monkeypatch):
    monkeypatch.setattr(S, "hub_reachable", lambda timeout=3.0: False)
    err = _error(cfg(sources=[src("someone/finance-news")]), library)
    assert "Hub is not reachable" in err.what and "local" in err.fix and err.where == "data.sources.0.path"
    assert any("not reachable" in e.what for e in D.check_sources(cfg(sources=[src("someone/finance-news")]), library))


def test_error_template_variable_not_a_column(tmp_path, library):
    path = write_jsonl(tmp_path / "cols.jsonl", toy_rows(30))
    err = _error(cfg(sources=[src(path, templates=["toy/uses_missing"])]), library)
    assert "'author'" in err.what and "id, label, text" in err.fix and err.where == "data.sources.0.templates"


def test_error_split_without_the_label_column(tmp_path, library):
    folder = tmp_path / "unlabeled_test"  # like GLUE's SST-2: the test split has no labels
    write_jsonl(folder / "train.jsonl", toy_rows(40))
    write_jsonl(folder / "test.jsonl", [{"text": r["text"]} for r in toy_rows(5, seed=9)])
    err = _error(cfg(sources=[src(folder)]), library)
    assert "split 'test'" in err.what and "splits.test: null" in err.fix
    assert any("split 'test'" in e.what for e in D.check_sources(cfg(sources=[src(folder)]), library))
    carved = cfg(sources=[src(folder, splits={"test": None})], test_size=5)
    assert D.check_sources(carved, library) == [] and len(D.build_splits(carved, library).splits["test"]) == 5


def test_error_template_fails_on_a_row(tmp_path, library):
    path = write_jsonl(tmp_path / "boom.jsonl", toy_rows(30))
    err = _error(cfg(sources=[src(path, templates=["toy/broken"])]), library)
    assert "toy/broken" in err.what and "ZeroDivisionError" in err.what
    assert err.where.startswith("data.sources.0 (boom), split ") and "row " in err.where


def test_error_unknown_template_ref(tmp_path, library):
    path = write_jsonl(tmp_path / "ref.jsonl", toy_rows(30))
    err = _error(cfg(sources=[src(path, templates=["toy/nope"])]), library)
    assert "toy/nope" in err.what and err.where == "data.sources.0.templates.0"


def test_error_split_named_but_missing(tmp_path, library):
    path = write_jsonl(tmp_path / "one.jsonl", toy_rows(30))
    err = _error(cfg(sources=[src(path, splits={"validation": "dev"})]), library)
    assert "split 'dev'" in err.what and err.where == "data.sources.0.splits.validation" and "null" in err.fix


def test_error_split_ends_up_empty(tmp_path, library):
    folder = tmp_path / "allneg"
    write_jsonl(folder / "train.jsonl", toy_rows(30, pos_share=0.5))
    write_jsonl(folder / "test.jsonl", [dict(r, label="neg") for r in toy_rows(5)])
    err = _error(cfg(sources=[src(folder, templates=["toy/only_pos"])]), library)
    assert "split 'test'" in err.what and "empty" in err.what and "skipped" in err.what


def test_error_stratify_column_missing(tmp_path, library):
    path = write_jsonl(tmp_path / "nostrat.jsonl", toy_rows(30))
    err = _error(cfg(sources=[src(path)], stratify_by="sentiment"), library)
    assert "'sentiment'" in err.what and err.where == "data.stratify_by" and "label" in err.fix


def test_check_sources_reports_every_problem_at_once(tmp_path, library):
    path = write_jsonl(tmp_path / "peek.jsonl", toy_rows(10))
    ok = cfg(sources=[src(path, columns={"id": "row_id"})], stratify_by="label")
    assert D.check_sources(ok, library) == []
    bad = cfg(sources=[src(path, templates=["toy/uses_missing", "toy/nope"], splits={"test": "holdout"}),
                       src(tmp_path / "missing.csv")], stratify_by="sentiment")
    found = [e.line() for e in D.check_sources(bad, library)]
    assert any("toy/nope" in f for f in found) and any("'author'" in f for f in found)
    assert any("holdout" in f for f in found) and any("not found" in f for f in found)
    assert any("stratify" in f for f in found)


def test_cli_reports_data_errors_with_exit_2(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{init: scratch, config: {{model_type: llama}}}}\n"
                      f"data: {{sources: [{{path: {tmp_path / 'absent.jsonl'}}}]}}\ntraining: {{output_dir: {tmp_path}}}\n")
    assert cli_main(["data", "stats", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data file or folder not found") and "data.sources.0.path" in err


# ------------------------------------------------------------------------------------- CLI


def test_cli_preview_marks_loss_tokens_and_stats_json(tmp_path, capsys):
    repo = Path(__file__).resolve().parents[1]
    folder = tmp_path / "fn"
    for split, n in (("train", 60), ("validation", 10), ("test", 10)):
        write_jsonl(folder / f"{split}.jsonl", [{"headline": r["text"], "label": r["label"]} for r in toy_rows(n, len(split))])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: {init: scratch, vocab_size: 300, config: {model_type: llama, hidden_size: 16, intermediate_size: 32,"
        " num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1}}\n"
        f"data:\n  sources: [{{path: {folder}, templates: [finance_news/headline_sentiment]}}]\n"
        f"training: {{output_dir: {tmp_path / 'run'}}}\n")
    if not (repo / "templates" / "finance_news" / "templates.yaml").exists():
        pytest.skip("repo templates for finance_news not present")
    assert cli_main(["data", "preview", str(recipe), "--n", "2", "--split", "validation"]) == 0
    out = capsys.readouterr().out
    assert "source fn" in out and "finance_news/headline_sentiment" in out
    assert D_OPEN in out and "with loss" in out
    assert cli_main(["data", "stats", str(recipe), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["splits"]["train"]["rows"] == 60 and stats["splits"]["test"]["sources"]["fn"]["labels"]
    assert stats["mixture"]["sources"]["fn"]["token_share"] == 1.0
    packing = stats["packing"]  # what data.packing: bfd makes of the training rows
    assert packing["rows"] == 60 and 0 < packing["bins"] < 60 and 0 < packing["efficiency"] <= 1
    assert packing["efficiency"] == pytest.approx(stats["splits"]["train"]["tokens"]["tokens"]
                                                  / (packing["bins"] * packing["capacity"]))
    assert cli_main(["data", "stats", str(recipe)]) == 0
    assert "packing (data.packing: bfd): 60 training rows in" in capsys.readouterr().out


D_OPEN = "⟦"


# ------------------------------------------------------------------------------------- collation


def _token_rows(tokenizer, n=6):
    texts = ["Shares of the company rose", "The bank reported a loss and its stock fell sharply.", "Revenue was flat",
             "Question: what is the answer?", "Headline: profits up.", "Summarize the conversation."][:n]
    pairs = encode_pairs(tokenizer, "causal", texts, ["yes", "positive", "no", "maybe", "neutral", "ok"][:n])
    return [{"input_ids": p + c, "attention_mask": [1] * len(p + c), "labels": [-100] * len(p) + c} for p, c in pairs]


def test_collator_pads_right_with_ignored_labels(tiny_tokenizer):
    rows = _token_rows(tiny_tokenizer, 3)
    batch = Collator(tiny_tokenizer, "causal", pad_to_multiple_of=8)(rows)
    width = batch["input_ids"].shape[1]
    assert width % 8 == 0 and width >= max(len(r["input_ids"]) for r in rows)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        assert batch["input_ids"][i, :n].tolist() == r["input_ids"] and batch["labels"][i, :n].tolist() == r["labels"]
        assert (batch["labels"][i, n:] == -100).all() and batch["attention_mask"][i].sum() == n
    s2s = Collator(tiny_tokenizer, "seq2seq")([{"input_ids": [5, 6, 7], "labels": [8]}, {"input_ids": [5], "labels": [8, 9, 2]}])
    assert s2s["labels"].tolist() == [[8, -100, -100], [8, 9, 2]] and s2s["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packing_equals_padding(tiny_tokenizer, attn):
    model = build_tiny_llama(tiny_tokenizer)
    model.config._attn_implementation = attn
    rows = _token_rows(tiny_tokenizer)
    for r in rows:
        r["labels"] = list(r["input_ids"])  # loss everywhere: the boundary tokens matter
    padded = Collator(tiny_tokenizer, "causal")(rows)
    packed = Collator(tiny_tokenizer, "causal", packing=True)(rows)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    assert packed["position_ids"][0, : len(rows[0]["input_ids"]) + 1].tolist()[-1] == 0  # restarts per example
    with torch.no_grad():
        a = model(**padded, use_cache=False)
        b = model(**packed, use_cache=False)
    assert torch.allclose(a.loss, b.loss, atol=1e-5)
    offset = 0
    for i, r in enumerate(rows):  # every example's logits match: no attention across examples
        n = len(r["input_ids"])
        assert torch.allclose(a.logits[i, :n], b.logits[0, offset:offset + n], atol=1e-4)
        offset += n


def test_packing_refuses_seq2seq(tiny_tokenizer):
    with pytest.raises(IftError):
        Collator(tiny_tokenizer, "seq2seq", packing=True)


def _dataset(n=40):
    import datasets

    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 30, size=n).tolist()
    return datasets.Dataset.from_dict({
        "input_ids": [[i % 50 + 1] * k for i, k in enumerate(lengths)], "labels": [[i % 50 + 1] * k for i, k in enumerate(lengths)],
        "attention_mask": [[1] * k for k in lengths], "length": lengths, "prompt": ["p"] * n})


def _batches(dl, epoch):
    dl.sampler.set_epoch(epoch) if hasattr(dl, "sampler") else dl.set_epoch(epoch)
    return [b["input_ids"][:, 0].tolist() for b in dl]


def test_train_dataloader_is_deterministic_per_seed_and_epoch(tiny_tokenizer):
    ds = _dataset()
    collator = Collator(tiny_tokenizer, "causal")
    a = train_dataloader(ds, 4, collator, seed=7)
    b = train_dataloader(ds, 4, collator, seed=7)
    assert _batches(a, 0) == _batches(b, 0) and _batches(a, 1) == _batches(b, 1)
    assert _batches(a, 0) != _batches(a, 1)
    assert _batches(train_dataloader(ds, 4, collator, seed=8), 0) != _batches(a, 0)
    assert sorted(sum(_batches(a, 3), [])) == sorted(r[0] for r in ds["input_ids"])  # a permutation


def test_accelerate_set_epoch_and_resume_see_the_same_batches(tiny_tokenizer):
    from accelerate import Accelerator

    ds = _dataset()
    collator = Collator(tiny_tokenizer, "causal")
    acc = Accelerator(cpu=True)
    dl = acc.prepare(train_dataloader(ds, 4, collator, seed=3))
    epochs = [[b["input_ids"][:, 0].tolist() for b in dl] for _ in range(2)]  # iteration count drives set_epoch
    assert epochs[0] != epochs[1]
    fresh = acc.prepare(train_dataloader(ds, 4, collator, seed=3))
    fresh.set_epoch(1)
    resumed = acc.skip_first_batches(fresh, 3)
    assert [b["input_ids"][:, 0].tolist() for b in resumed] == epochs[1][3:]


def test_group_by_length_megabatches(tiny_tokenizer):
    ds = _dataset(64)
    dl = train_dataloader(ds, 4, Collator(tiny_tokenizer, "causal"), seed=1, group_by_length=True)
    order = list(iter(dl.sampler))
    lengths = ds["length"]
    assert sorted(order) == list(range(64)) and lengths[order[0]] == max(lengths)
    mega = 4 * max(min(64 // 16, 50), 1)  # HF's default megabatch: batch * min(n // (4 batch), 50)
    for start in range(0, 64, mega):
        chunk = [lengths[i] for i in order[start:start + mega]][1:]
        assert chunk == sorted(chunk, reverse=True)
    assert order == list(iter(train_dataloader(ds, 4, Collator(tiny_tokenizer, "causal"), seed=1,
                                                 group_by_length=True).sampler))


def test_eval_dataloader_keeps_order(tiny_tokenizer):
    ds = _dataset(10)
    dl = eval_dataloader(ds, 4, Collator(tiny_tokenizer, "causal"))
    assert sum((b["input_ids"][:, 0].tolist() for b in dl), []) == [r[0] for r in ds["input_ids"]]


# ------------------------------------------------------------------------------------- shipped data


def test_quickstart_data_is_reproducible(tmp_path):
    import importlib.util

    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("make_quickstart_data", repo / "data" / "make_quickstart_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--out", str(tmp_path)])
    for name, sizes in (("finance_news", (600, 100, 100)), ("support_summaries", (300, 50, 50))):
        for split, size in zip(("train", "validation", "test"), sizes):
            written = (tmp_path / name / f"{split}.jsonl").read_text()
            assert written.count("\n") == size
            shipped = repo / "data" / name / f"{split}.jsonl"
            if shipped.exists():
                assert shipped.read_text() == written  # the committed files are this script's output
    labels = Counter(json.loads(line)["label"] for line in (tmp_path / "finance_news" / "train.jsonl").open())
    assert set(labels) == {"negative", "neutral", "positive"} and min(labels.values()) >= 180


def test_a_source_may_be_a_data_file_on_the_web(tmp_path):
    """A URL is read by datasets' builder for its suffix, as the same file on disk (served here on loopback)."""
    import functools
    import http.server
    import threading

    from ift.data.prepare import build_splits
    from ift.recipe import DataConfig
    from ift.templates.library import TemplateLibrary

    served = tmp_path / "www"
    write_jsonl(served / "rows.jsonl", [{"headline": r["text"], "label": r["label"]} for r in toy_rows(30, 1)])
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/rows.jsonl"
        library = TemplateLibrary()

        def prepared(path):
            cfg = DataConfig(sources=[{"name": "news", "path": path, "templates": ["finance_news/headline_sentiment"]}],
                             validation_size=5, test_size=5)
            return {k: v.to_list() for k, v in build_splits(cfg, library).splits.items()}

        assert prepared(url) == prepared(str(served / "rows.jsonl"))
    finally:
        server.shutdown()
