"""ift.data.data_map: local copies standing in for Hub datasets. Reading a map (every bad entry reported at once),
the copy's renames composed with the recipe's, the data section that results (and that a run saves), and the
shipped map (tests/shared_data.yaml) reaching the very rows the shipped recipes prepared from ../shared/data
spelled directly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ift.cli import main
from ift.data.sources import is_url
from ift.data.data_map import LocalCopy, apply_data_map, compose, read_data_map
from ift.data.prepare import build_splits
from ift.errors import IftError
from ift.locations import looks_like_hub_id
from ift.recipe import SPLITS, load_recipe
from ift.templates.library import TemplateLibrary

REPO = Path(__file__).resolve().parents[1]
SHARED_MAP = REPO / "tests" / "shared_data.yaml"
SHARED = REPO.parent / "shared" / "data"
NAMES = ["negative", "neutral", "positive"]
PHRASEBANK = ["financial_phrasebank/sentiment_choices_in_prompt", "financial_phrasebank/classify_statement"]
# each Hub dataset of the shipped recipes as they named its ../shared/data copy directly: (folder, columns)
FASTCHAT = ("https://raw.githubusercontent.com/lm-sys/FastChat/0e6d3e4beaab66f4d3f93db72541a4abab8af28d/data/"
            "dummy_conversation.json")  # a data file on the web (recipes/vicuna_identity.yaml)
SPELLED_DIRECTLY = {
    "takala/financial_phrasebank": ("financial_phrasebank_allagree", {}),
    "nyu-mll/glue": ("glue_sst2", {}),
    "knkarthick/dialogsum": ("dialogsum", {"summary1": "summary", "topic1": "topic"}),
    "tatsu-lab/alpaca": ("alpaca_5000", {}),
    "cardiffnlp/tweet_eval": ("tweet_eval_emotion", {}),
    FASTCHAT: ("vicuna_identity", {}),
}


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """One datasets cache for the module (a copy and its direct spelling share their cache files)."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "hf_datasets_cache")
    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sentences(n: int = 90) -> list[dict]:
    return [{"sentence": f"Company {i} reported quarter {i % 4} results .", "sentiment": NAMES[(i * 7) % 3]}
            for i in range(n)]


def hub_recipe(tmp_path: Path, **source) -> Path:
    """A recipe naming a Hub dataset the way the Hub serves Financial PhraseBank: `label` ids 0..2."""
    recipe = {
        "model": {"name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"},
        "data": {"sources": [{"path": "someone/phrasebank", "config": "all_agree", "columns": {"label": "sentiment"},
                              "labels": {"label": NAMES}, "templates": PHRASEBANK, **source}],
                 "validation_size": 15, "test_size": 15, "stratify_by": "sentiment"},
        "training": {"output_dir": str(tmp_path / "run")},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def rows(prepared) -> dict[str, list[dict]]:
    return {split: prepared.splits[split].to_list() for split in SPLITS}


# ------------------------------------------------------------------------------------- composing


def test_the_copys_renames_then_the_recipes_make_one_mapping():
    # the copy already holds the names the recipe renames to: nothing is renamed, the labels stay names
    assert compose(LocalCopy(path=".", columns={"sentiment": "label"}), {"label": "sentiment"}, {"label": NAMES},
                   "m") == ({}, {"sentiment": NAMES})
    assert compose(LocalCopy(path=".", columns={"summary1": "summary"}), {}, {}, "m") == ({"summary1": "summary"}, {})
    assert compose(LocalCopy(path="."), {"label": "sentiment"}, {"label": NAMES}, "m") == (
        {"label": "sentiment"}, {"label": NAMES})
    assert compose(LocalCopy(path=".", columns={"y": "label"}), {"label": "answer", "text": "prompt"}, {}, "m") == (
        {"y": "answer", "text": "prompt"}, {})
    assert compose(LocalCopy(path=".", labels={"label": NAMES}), {}, {"label": NAMES}, "m") == ({}, {"label": NAMES})
    with pytest.raises(IftError, match="names the labels of column 'label'"):
        compose(LocalCopy(path=".", labels={"label": ["neg", "neu", "pos"]}), {}, {"label": NAMES}, "m")


# ------------------------------------------------------------------------------------- reading


def test_a_bad_data_map_is_reported_entry_by_entry(tmp_path):
    with pytest.raises(IftError) as err:
        read_data_map(tmp_path / "missing.yaml")
    assert err.value.what.startswith("data map not found") and err.value.where == "data.data_map"
    bad = tmp_path / "bad.yaml"
    bad.write_text("a/b: {path: x\n")
    with pytest.raises(IftError, match=r"YAML syntax error in the data map: .*bad.yaml, line 2"):
        read_data_map(bad)
    bad.write_text("- a/b\n")
    with pytest.raises(IftError, match="a data map is a mapping of Hub dataset ids to local copies"):
        read_data_map(bad)
    bad.write_text("a/b: ../x\nc/d: {columns: {a: b}}\ne/f: {path: y, colums: {a: b}}\ng/h: {path: z}\n")
    with pytest.raises(IftError) as err:
        read_data_map(bad)
    assert err.value.lines() == [
        f"entry 'a/b' is not a mapping ({bad}: a/b) — write one entry per dataset, `ID: {{path: FOLDER}}` or "
        "`ID:SUBSET: {path: FOLDER, columns: {...}}` (docs/data.md)",
        f"missing required key 'path' ({bad}: c/d.path) — an entry has a path (a file or folder, relative to the "
        "map), and may have columns and labels (docs/data.md)",
        f"unknown key 'colums' ({bad}: e/f.colums) — an entry has a path (a file or folder, relative to the map), "
        "and may have columns and labels (docs/data.md)"]


# ------------------------------------------------------------------------------------- recipes


def test_a_recipe_reads_the_copy_a_data_map_names_and_says_so(tmp_path):
    copy = write_jsonl(tmp_path / "copies" / "phrasebank" / "all.jsonl", sentences()).parent
    maps = tmp_path / "maps"
    maps.mkdir()
    (maps / "local.yaml").write_text("someone/phrasebank:all_agree:\n  path: ../copies/phrasebank\n"
                                     "  columns: {sentiment: label}\n")
    recipe = load_recipe(hub_recipe(tmp_path), [f"data.data_map={maps / 'local.yaml'}"])
    assert recipe.data.sources[0].path == "someone/phrasebank"  # the recipe as written; the data stage maps it
    data = apply_data_map(recipe.data)
    src = data.sources[0]
    assert (src.path, src.name, src.config, src.revision, src.data_dir) == (str(copy), "phrasebank", None, None, None)
    assert (src.columns, src.labels, src.templates) == ({}, {"sentiment": NAMES}, PHRASEBANK)
    assert data.data_map is None and apply_data_map(data) is data
    prepared = build_splits(recipe.data, TemplateLibrary(promptsource=False))
    assert prepared.data.sources[0].path == str(copy) and prepared.data.data_map is None
    saved = tmp_path / "saved.yaml"  # what a run saves: the recipe with the data section as prepared
    recipe.model_copy(update={"data": prepared.data}).save(saved)
    assert load_recipe(saved).data == prepared.data
    # a source the map does not name, or names under another subset, stays a Hub source
    for other in ({"config": "50_agree"}, {"config": None}, {"path": "someone/other"}):
        kept = apply_data_map(load_recipe(hub_recipe(tmp_path, **other), [f"data.data_map={maps / 'local.yaml'}"]).data)
        assert kept.sources[0].path == other.get("path", "someone/phrasebank")


def test_the_hubs_label_ids_the_copys_names_and_the_copy_spelled_directly_prepare_the_same_rows(tmp_path):
    """The recipe's `columns` and `labels` turn the Hub's shape (a ClassLabel of ids) into the rows the copy, with
    its names, gives through the map and spelled directly in a recipe."""
    import datasets

    data = sentences()
    copy = write_jsonl(tmp_path / "copy" / "all.jsonl", data).parent
    hub = tmp_path / "hub"  # the Hub's shape: sentence, label ids
    features = datasets.Features({"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=NAMES)})
    hub.mkdir()
    datasets.Dataset.from_list([{"sentence": r["sentence"], "label": r["sentiment"]} for r in data],
                               features=features).to_parquet(str(hub / "train.parquet"))
    (tmp_path / "copy.yaml").write_text("someone/phrasebank:all_agree: {path: copy, columns: {sentiment: label}}\n")
    (tmp_path / "hub.yaml").write_text("someone/phrasebank:all_agree: {path: hub}\n")
    library = TemplateLibrary(promptsource=False)
    recipe = hub_recipe(tmp_path)
    direct = load_recipe(recipe, [f"data.sources.0.path={copy}", "data.sources.0.name=phrasebank",
                                  "data.sources.0.config=null", "data.sources.0.columns={}", "data.sources.0.labels={}"])
    expected = rows(build_splits(direct.data, library))
    assert {r["completion"] for r in expected["train"]} == set(NAMES) and len(expected["test"]) == 15
    for data_map in ("copy.yaml", "hub.yaml"):
        mapped = load_recipe(recipe, [f"data.data_map={tmp_path / data_map}"])
        assert rows(build_splits(mapped.data, library)) == expected, data_map


def test_a_missing_map_or_copy_is_one_line_with_exit_2(tmp_path, capsys):
    recipe = hub_recipe(tmp_path)
    assert main(["validate", str(recipe), f"data.data_map={tmp_path / 'nope.yaml'}"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: data map not found: {tmp_path / 'nope.yaml'} (data.data_map) — give a YAML file naming "
                   "local copies of Hub datasets (docs/data.md), e.g. data.data_map=tests/shared_data.yaml\n")
    (tmp_path / "map.yaml").write_text("someone/phrasebank:all_agree: {path: gone}\n")
    assert main(["validate", str(recipe), f"data.data_map={tmp_path / 'map.yaml'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: the local copy of 'someone/phrasebank:all_agree' is not there: {tmp_path / 'gone'} "
                          f"({tmp_path / 'map.yaml'}: someone/phrasebank:all_agree.path) — fix the path")
    assert "Traceback" not in err and len(err.splitlines()) == 1


# ------------------------------------------------------------------------------------- the shipped map


def test_the_shipped_map_names_copies_beside_the_repository():
    shipped = read_data_map(SHARED_MAP)
    remote = {s["path"] for r in (REPO / "recipes").glob("*.yaml")
              for s in yaml.safe_load(r.read_text())["data"]["sources"] if _remote(s["path"])}
    assert {key if is_url(key) else key.partition(":")[0] for key in shipped.copies} == remote == set(SPELLED_DIRECTLY)
    for key, copy in shipped.copies.items():
        assert copy.path.startswith("../../shared/data/"), key  # ../shared/data from the repository root


def _remote(path: str) -> bool:
    return looks_like_hub_id(path) or is_url(path)


MAPPED = sorted(r for r in (REPO / "recipes").glob("*.yaml")
                if any(_remote(s["path"]) for s in yaml.safe_load(r.read_text())["data"]["sources"]))


@pytest.mark.parametrize("recipe", MAPPED, ids=lambda p: p.name)
def test_shipped_recipes_on_the_shared_map_prepare_the_rows_of_the_copies_spelled_directly(recipe, monkeypatch):
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is not present")
    monkeypatch.chdir(REPO)
    mapped = load_recipe(recipe, [f"data.data_map={SHARED_MAP.relative_to(REPO)}"])
    direct = []
    for i, src in enumerate(yaml.safe_load(recipe.read_text())["data"]["sources"]):
        folder, columns = SPELLED_DIRECTLY[src["path"]]
        direct += [f"data.sources.{i}.path=../shared/data/{folder}", f"data.sources.{i}.columns={json.dumps(columns)}",
                   f"data.sources.{i}.labels={{}}"] + [f"data.sources.{i}.{k}=null" for k in
                                                       ("config", "revision", "data_dir") if k in src]
    spelled = load_recipe(recipe, direct)
    assert [Path(s.path).resolve() for s in apply_data_map(mapped.data).sources] == [
        Path(s.path).resolve() for s in spelled.data.sources]  # the same folders, however reached (links)
    library = TemplateLibrary(dirs=tuple(mapped.data.templates_dir))
    got, expected = rows(build_splits(mapped.data, library)), rows(build_splits(spelled.data, library))
    assert got == expected and all(expected[split] for split in SPLITS)
