"""`ift chat` and `ift generate`: the run's prompt format, one decoding engine, clear errors on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from conftest import build_tiny_llama, build_tiny_tokenizer
from ift.cli import main
from ift.errors import IftError
from ift.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
# A ChatML-like template in the tiny tokenizer's own special tokens, with a default system prompt (as SmolLM2's)
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<s>system\nYou are tiny.</s>\n{% endif %}"
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
PROMPTS = ["Headline: profits up. Sentiment:", "The bank reported a loss and its stock fell sharply.",
           "Summarize the conversation.", "Is the news positive?"]


def make_run(root: Path, *, chat: bool = True, templates: bool = False, adapter: bool = True) -> Path:
    """A tiny Llama base in root/base and a run whose final/ holds a LoRA adapter (random B weights) or, with
    adapter=False, a full model; chat: trained in the tokenizer's chat template; templates: a template run."""
    from peft import LoraConfig, get_peft_model

    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    model = build_tiny_llama(tokenizer)
    base = root / "base"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    run = root / "run"
    if adapter:
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "up_proj"],
                            task_type="CAUSAL_LM")
        with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
            peft_model = get_peft_model(model, config)
        torch.manual_seed(1)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.3)
        peft_model.save_pretrained(run / "final")
    else:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        model.save_pretrained(run / "final")
    tokenizer.save_pretrained(run / "final")
    extra = ", templates: [finance_news/headline_sentiment]" if templates else ""
    source = "{path: %s%s}" % (root / "rows.jsonl", extra)
    method = "lora" if adapter else "none"
    targets = ", target_modules: [q_proj, k_proj, v_proj, up_proj]" if adapter else ""
    (root / "recipe.yaml").write_text(f"""
model: {{name_or_path: {base}}}
adapter: {{method: {method}, r: 4, alpha: 8{targets}}}
data: {{sources: [{source}], chat_template: {str(chat).lower()}}}
training: {{output_dir: {run}}}
""")
    load_recipe(root / "recipe.yaml").save(run / "recipe.yaml")
    return run


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("chat"), chat=True)


@pytest.fixture(scope="module")
def template_run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("template"), chat=False, templates=True)


@pytest.fixture(scope="module")
def chat_target(chat_run):
    from ift.inference.target import resolve_target

    return resolve_target(chat_run)


@pytest.fixture(scope="module")
def template_target(template_run):
    from ift.inference.target import resolve_target

    return resolve_target(template_run)


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _error_line(capsys) -> str:
    """The one error line on stderr (loading progress bars aside)."""
    err = [line for line in capsys.readouterr().err.splitlines() if "%|" not in line and line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# ------------------------------------------------------------------------------------------------ generate


@pytest.mark.parametrize("run_fixture, chat", [("chat_run", True), ("template_run", False)])
def test_generate_equals_evaluation_greedy_predictions(request, tmp_path, run_fixture, chat):
    """`ift generate` (prompt and messages lines) = ift.evaluation.decoding.generate on the same prompts, token for token."""
    from ift.evaluation.decoding import generate
    from ift.inference.target import resolve_target

    run = request.getfixturevalue(run_fixture)
    lines = [{"prompt": p, "id": k} for k, p in enumerate(PROMPTS)]
    lines.append({"messages": [{"role": "user", "content": PROMPTS[1]}], "id": "m"})
    source = _write_jsonl(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    assert main(["generate", str(run), "--input", str(source), "--output", str(out), "--max-new-tokens", "12",
                 "--batch-size", "3"]) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    target = resolve_target(run)
    expected = generate(target.model, target.tokenizer, "causal", PROMPTS, max_new_tokens=12, batch_size=16,
                        chat_template=chat)
    assert [g["prediction"] for g in got[:4]] == expected
    assert got[4]["prediction"] == expected[1]  # one user turn = the same prompt
    assert [g["id"] for g in got] == [0, 1, 2, 3, "m"]  # input order and fields kept
    assert any(expected), "the tiny model should say something"


def test_generate_keeps_fields_and_writes_atomically(tmp_path, chat_run, monkeypatch, capsys):
    source = _write_jsonl(tmp_path / "in.jsonl", [{"prompt": PROMPTS[0], "meta": {"k": [1, 2]}, "n": 1}])
    out = tmp_path / "out.jsonl"
    assert main(["generate", str(chat_run), "--input", str(source), "--output", str(out),
                 "--max-new-tokens", "4"]) == 0
    [row] = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["meta"] == {"k": [1, 2]} and row["n"] == 1 and row["prompt"] == PROMPTS[0]
    assert isinstance(row["prediction"], str)
    before = out.read_text()

    # a failure while writing leaves the earlier file whole and no partial file
    import ift.atomic as atomic

    def broken(fh, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "fsync", broken)
    with pytest.raises(OSError):
        main(["generate", str(chat_run), "--input", str(source), "--output", str(out), "--max-new-tokens", "4",
              "--field", "answer"])
    assert out.read_text() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # a bad line fails before anything is written
    monkeypatch.undo()
    capsys.readouterr()
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine"}, "{not json"])
    fresh = tmp_path / "fresh.jsonl"
    assert main(["generate", str(chat_run), "--input", str(bad), "--output", str(fresh)]) == 2
    assert "line 2" in _error_line(capsys) and not fresh.exists()


def test_generate_one_prompt_prints_the_answer(chat_run, chat_target, capsys):
    from ift.evaluation.decoding import generate

    assert main(["generate", str(chat_run), "--prompt", PROMPTS[2], "--max-new-tokens", "6"]) == 0
    expected = generate(chat_target.model, chat_target.tokenizer, "causal", [PROMPTS[2]], max_new_tokens=6,
                        chat_template=True)[0]
    assert capsys.readouterr().out.rstrip("\n") == expected


@pytest.mark.parametrize("lines, expect", [
    (None, "input file not found"),
    ([], "has no prompts (it is empty)"),
    ([{"prompt": "ok"}, "{oops"], "line 2"),
    ([{"prompt": "ok"}, {"text": "no prompt here"}], "neither a 'prompt' nor a 'messages' field"),
    ([{"prompt": "   "}], "the prompt is empty"),
    ([{"prompt": "ok", "prediction": "old"}], "already has a 'prediction' field"),
    ([["a", "list"]], "expected a JSON object"),
    ([{"messages": [{"role": "assistant", "content": "hi"}]}], "not the user's"),
    ([{"messages": "hello"}], "messages must be a non-empty list"),
])
def test_generate_bad_input_is_one_clear_error(tmp_path, chat_run, capsys, lines, expect):
    path = tmp_path / "in.jsonl"
    if lines is not None:
        _write_jsonl(path, lines)
    assert main(["generate", str(chat_run), "--input", str(path), "--output", str(tmp_path / "o.jsonl")]) == 2
    line = _error_line(capsys)
    assert expect in line and " — " in line
    assert not (tmp_path / "o.jsonl").exists()


def test_generate_line_numbers_count_blank_lines(tmp_path, chat_run, capsys):
    path = tmp_path / "in.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"text": "b"}\n')
    assert main(["generate", str(chat_run), "--input", str(path)]) == 2
    assert f"{path}, line 3" in _error_line(capsys)


@pytest.mark.parametrize("argv, expect", [
    (["generate", "{missing}", "--prompt", "hi"], "no run folder or model at"),
    (["generate", "{run}", "--prompt", "  "], "the prompt is empty"),
    (["generate", "{run}"], "no prompts given"),
    (["generate", "{run}", "--prompt", "hi", "--temperature", "-1"], "temperature must be >= 0"),
    (["generate", "{run}", "--prompt", "hi", "--top-p", "0"], "top_p must be in (0, 1]"),
    (["chat", "{missing}"], "no run folder or model at"),
    (["chat", "{base}", "--base"], "--base needs a run folder"),
    (["generate", "{run}", "--prompt", "hi", "--raw", "--system", "Be brief."], "no place for a system prompt"),
])
def test_bad_targets_and_options(tmp_path, chat_run, capsys, argv, expect):
    fill = {"missing": str(tmp_path / "nope"), "run": str(chat_run), "base": str(chat_run.parent / "base")}
    assert main([a.format(**fill) for a in argv]) == 2
    assert expect in _error_line(capsys)


def test_run_without_final_model_is_explained(tmp_path, capsys):
    run = make_run(tmp_path)
    import shutil

    shutil.rmtree(run / "final")
    assert main(["generate", str(run), "--prompt", "hi"]) == 2
    assert "the run has no final model" in _error_line(capsys)


def test_template_run_fills_its_template_and_generate_renders_fields(tmp_path, template_run, template_target):
    """A template run's format is its promptsource prompt: the user's text fills the template's one field."""
    from ift.evaluation.decoding import _encode_prompts

    fmt = template_target.format
    assert not fmt.chat_template and fmt.fields == ("headline",)
    assert fmt.template.ref == "finance_news/headline_sentiment"
    rendered = "Headline: Shares jump\nIs the news positive, negative or neutral?"
    assert fmt.fill("Shares jump") == rendered
    ids = fmt.encode(template_target.tokenizer, [{"role": "user", "content": fmt.fill("Shares jump")}])
    assert ids == _encode_prompts(template_target.tokenizer, "causal", [rendered], chat_template=False)[0]
    # generate: a row of the template's fields is rendered by it; a prompt line is taken as it is
    source = _write_jsonl(tmp_path / "rows.jsonl", [{"headline": "Shares jump", "id": 1}, {"prompt": rendered}])
    out = tmp_path / "out.jsonl"
    assert main(["generate", str(template_run), "--input", str(source), "--output", str(out),
                 "--max-new-tokens", "5"]) == 0
    a, b = [json.loads(line) for line in out.read_text().splitlines()]
    assert a["headline"] == "Shares jump" and a["id"] == 1 and a["prediction"] == b["prediction"]


# ---------------------------------------------------------------------------------------------------- chat


def _script(lines: list[str]):
    it = iter(lines)
    return lambda: next(it, None)


def test_chat_streams_resets_sets_system_and_exits(chat_target):
    """Scripted input through the loop: answers stream, /system and /reset change the conversation, /exit stops."""
    from ift.evaluation.decoding import Decoding, decode, text_of
    from ift.inference.chat import ChatSession, chat_loop

    chunks: list[str] = []

    class Out:
        def write(self, text):
            chunks.append(text)

        def flush(self):
            pass

    session = ChatSession(chat_target, Decoding(max_new_tokens=8))
    rc = chat_loop(session, _script(["Hello there", "Tell me more", "/system Be brief.", "Hi", "/reset",
                                     "/exit", "never read"]), Out())
    assert rc == 0
    text = "".join(chunks)
    assert "prompt format: the tokenizer's chat template" in text
    assert "(system prompt set; conversation reset)" in text and "(conversation reset)" in text
    assert session.system == "Be brief." and session.history == []  # reset after the last answer

    # the first answer is what decode gives for the same prompt ids, streamed in several pieces
    tok = chat_target.tokenizer
    ids = chat_target.format.encode(tok, [{"role": "user", "content": "Hello there"}])
    [gen] = decode(chat_target.model, tok, "causal", [ids], Decoding(max_new_tokens=8))
    first = text_of(tok, gen.ids)
    start = next(k for k, c in enumerate(chunks) if c.endswith("/exit (or Ctrl-D). Ctrl-C stops an answer.\n"))
    streamed = ""
    for c in chunks[start + 1:]:
        if c == "\n":
            break
        streamed += c
    assert streamed.strip() == first and len(first) > 0
    assert sum(1 for c in chunks[start + 1:start + 10] if c != "\n") > 1, "tokens should arrive one by one"


def test_chat_keeps_the_conversation_for_chat_template_runs(chat_target):
    from ift.evaluation.decoding import Decoding
    from ift.inference.chat import ChatSession

    session = ChatSession(chat_target, Decoding(max_new_tokens=4))
    answer, _ = session.reply("Hello there", lambda _t: None)
    assert session.history == [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": answer}]
    messages = session.messages("And now?")
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    text = chat_target.format.messages_text(chat_target.tokenizer, messages)
    assert text.startswith("<s>system\nYou are tiny.</s>\n<s>user\nHello there</s>\n<s>assistant\n")
    session.system = "Be brief."
    assert session.messages("x")[0] == {"role": "system", "content": "Be brief."}


def test_chat_template_run_vs_template_run_prompt_ids(chat_target, template_target):
    """One user turn encodes to exactly the ids evaluation generates from, in either format."""
    from ift.evaluation.decoding import Decoding, _encode_prompts
    from ift.inference.chat import ChatSession

    chat_ids = chat_target.format.encode(chat_target.tokenizer, [{"role": "user", "content": "Revenue was flat"}])
    assert chat_ids == _encode_prompts(chat_target.tokenizer, "causal", ["Revenue was flat"], chat_template=True)[0]
    assert chat_target.tokenizer.decode(chat_ids).endswith("<s>assistant\n")

    session = ChatSession(template_target, Decoding(max_new_tokens=3))
    session.reply("Revenue was flat", lambda _t: None)
    assert session.history == []  # no chat template: every message is a new prompt
    [message] = session.messages(template_target.format.fill("Revenue was flat"))
    assert message["content"] == "Headline: Revenue was flat\nIs the news positive, negative or neutral?"


def test_chat_loop_commands_on_a_template_run(template_target):
    from ift.evaluation.decoding import Decoding
    from ift.inference.chat import ChatSession, chat_loop

    chunks: list[str] = []

    class Out:
        write = chunks.append

        def flush(self):
            pass

    rc = chat_loop(ChatSession(template_target, Decoding(max_new_tokens=3)),
                   _script(["/system x", "/bogus", "", "Shares jump"]), Out())
    text = "".join(chunks)
    assert rc == 0  # end of input
    assert "promptsource template finance_news/headline_sentiment" in text
    assert "each message is a new prompt" in text and "has no system prompt" in text and "unknown command" in text


def test_chat_cli_through_stdin(chat_run):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "ift", "chat", str(chat_run), "--max-new-tokens", "4"],
                          input="Hello\n/reset\nHi again\n/exit\n", capture_output=True, text=True, env=env,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "chatting with the fine-tuned run" in proc.stdout and "(conversation reset)" in proc.stdout
    assert "error" not in proc.stdout


@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pseudo-terminal")
def test_chat_cli_in_a_pseudo_terminal(chat_run):
    """On a terminal: a `you> ` prompt (readline), answers, /reset, and /exit end the session with status 0."""
    import pty
    import select
    import time

    master, slave = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TERM": "dumb"}
    proc = subprocess.Popen([sys.executable, "-m", "ift", "chat", str(chat_run), "--max-new-tokens", "4"],
                            stdin=slave, stdout=slave, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
    os.close(slave)
    seen = b""

    def until(marker: bytes, count: int, limit: float = 120) -> None:
        nonlocal seen
        end = time.monotonic() + limit
        while seen.count(marker) < count and time.monotonic() < end:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    seen += os.read(master, 4096)
                except OSError:  # the child closed the terminal
                    return

    try:
        until(b"you> ", 1)
        os.write(master, b"Hello\n")
        until(b"you> ", 2)
        os.write(master, b"/reset\n")
        until(b"you> ", 3)
        os.write(master, b"/exit\n")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    text = seen.decode(errors="replace")
    assert "chatting with the fine-tuned run" in text and "(conversation reset)" in text and text.count("you> ") >= 3


# ------------------------------------------------------------------------------------------------ decoding


def test_decode_equals_transformers_generate_greedy(chat_target):
    """The engine gives transformers' greedy tokens (left padding, the same batch) — what the benchmark measured."""
    import copy

    from ift.evaluation.decoding import Decoding, decode, stop_ids
    from ift.data.encoding import pad_rows

    tok, model = chat_target.tokenizer, chat_target.model
    prompts = [chat_target.format.encode(tok, [{"role": "user", "content": p}]) for p in PROMPTS]
    ours = decode(model, tok, "causal", prompts, Decoding(max_new_tokens=10), batch_size=4)
    eos = stop_ids(model, tok)
    ids, mask = pad_rows(prompts, tok.pad_token_id, left=True)
    config = copy.deepcopy(model.generation_config)
    config.update(max_new_tokens=10, do_sample=False, eos_token_id=eos, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        theirs = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, ids.shape[1]:]
    for g, row in zip(ours, theirs.tolist()):
        assert g.ids == row[: len(g.ids)]


def test_sampling_is_seeded_and_top_p_near_zero_is_greedy(chat_target):
    from ift.evaluation.decoding import Decoding, decode

    tok, model = chat_target.tokenizer, chat_target.model
    prompts = [chat_target.format.encode(tok, [{"role": "user", "content": p}]) for p in PROMPTS[:2]]
    greedy = decode(model, tok, "causal", prompts, Decoding(max_new_tokens=8))
    a = decode(model, tok, "causal", prompts, Decoding(max_new_tokens=8, temperature=1.5, seed=3))
    b = decode(model, tok, "causal", prompts, Decoding(max_new_tokens=8, temperature=1.5, seed=3))
    assert [g.ids for g in a] == [g.ids for g in b]
    assert [g.ids for g in a] != [g.ids for g in greedy]
    nucleus = decode(model, tok, "causal", prompts, Decoding(max_new_tokens=8, temperature=1.0, top_p=1e-6, seed=0))
    assert [g.ids for g in nucleus] == [g.ids for g in greedy]


def test_budget_and_finish_reason(chat_target):
    from ift.evaluation.decoding import Decoding, decode

    tok, model = chat_target.tokenizer, chat_target.model
    ids = chat_target.format.encode(tok, [{"role": "user", "content": PROMPTS[0]}])
    [g] = decode(model, tok, "causal", [ids], Decoding(max_new_tokens=5))
    assert len(g.ids) <= 5 and g.finish_reason == ("stop" if g.ids[-1] == tok.eos_token_id else "length")
    # the model's context (max_position_embeddings = 256) caps a long prompt's answer
    long = ids + ids[-1:] * (254 - len(ids))
    [g] = decode(model, tok, "causal", [long], Decoding(max_new_tokens=50))
    assert len(g.ids) <= 2


def test_messages_need_a_chat_template_for_several_turns(template_target):
    from ift.inference.prompts import row_messages

    with pytest.raises(IftError, match="no chat template"):
        row_messages({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                   {"role": "user", "content": "c"}]}, template_target.format, "line 1")


# ------------------------------------------------------------------------------------------- tools and reasoning

WEATHER_TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]
# CHAT_TEMPLATE with a tools block in the system turn (the tiny tokenizer's own tokens)
TOOLS_TEMPLATE = (
    "<s>system\nYou are tiny.{% if tools %} Tools:{% for t in tools %} {{ t | tojson }}{% endfor %}{% endif %}</s>\n"
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def test_tools_file_is_read_and_checked(tmp_path):
    from ift.inference.tools import read_tools

    good = tmp_path / "tools.json"
    good.write_text(json.dumps({"tools": [WEATHER_TOOLS[0]["function"]]}))
    assert read_tools(good) == WEATHER_TOOLS  # a bare schema becomes {"type": "function", "function": ...}
    for text, expect in (("[{", "not valid JSON"), ("[]", "lists no tools"), ('[{"parameters": {}}]', "no function name"),
                         ('"get_weather"', "not valid JSON")):
        good.write_text(text)
        with pytest.raises(IftError, match=expect) as err:
            read_tools(good)
        assert str(good) in str(err.value)


def test_tools_reach_the_prompt_and_answers_keep_calls_apart(tmp_path):
    from ift.inference.batch import _answer
    from ift.inference.prompts import PromptFormat

    tok = build_tiny_tokenizer()
    tok.chat_template = TOOLS_TEMPLATE
    fmt = PromptFormat(chat_template=True, tools=WEATHER_TOOLS)
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    expected = tok.apply_chat_template(messages, tools=WEATHER_TOOLS, tokenize=False, add_generation_prompt=True)
    assert "get_weather" in expected
    assert fmt.encode(tok, messages) == tok(expected, add_special_tokens=False)["input_ids"]
    # a conversation that goes on after the call: the tool's result is the turn the model answers
    history = messages + [{"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "21 C"}]
    assert fmt.encode(tok, history)
    out = _answer({"prompt": "p"}, "prediction", '<think>\nhm\n</think>\n\n{"name": "get_weather", "parameters": {}}',
                  tools=True)
    assert out == {"prompt": "p", "prediction": "", "reasoning": "hm",
                   "tool_calls": [{"name": "get_weather", "arguments": {}}]}
    assert _answer({"prompt": "p"}, "prediction", "It is 21 C.", tools=True) == {"prompt": "p",
                                                                                 "prediction": "It is 21 C."}


def test_stream_shows_reasoning_apart_from_the_answer():
    from ift.inference.chat import TextStream, shown

    tok = build_tiny_tokenizer()
    tok.add_tokens(["<think>", "</think>"])  # added, not special: decoding keeps them, as Qwen3's vocabulary does
    for text, opened in (("<think>\nweigh it up\n</think>\n\nIt is positive.", False),
                         ("weigh it up\n</think>\n\nIt is positive.", True)):
        ids = tok(text, add_special_tokens=False)["input_ids"]  # each tag one token, "<th" never on screen alone
        chunks: list[str] = []
        stream = TextStream(tok, chunks.append)
        stream.thinking = opened
        for t in ids:
            stream.add(t)
        stream.finish()
        assert "".join(chunks) == shown(("<think>" if opened else "") + text) == \
            "(thinking) weigh it up\n\n(answer) It is positive."


def test_generate_and_chat_take_a_tools_file(tmp_path, chat_run, capsys):
    from conftest import build_tiny_llama

    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(WEATHER_TOOLS))
    # the run's template has no tools block: refused, not silently ignored
    assert main(["generate", str(chat_run), "--prompt", "hi", "--tools", str(tools)]) == 2
    assert "does not render tools" in _error_line(capsys)
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    assert main(["chat", str(chat_run), "--tools", str(bad)]) == 2
    assert "not valid JSON" in _error_line(capsys)
    # a model whose template takes tools: the answer comes back with the tools in its prompt
    tok = build_tiny_tokenizer()
    tok.chat_template = TOOLS_TEMPLATE
    model_dir = tmp_path / "model"
    build_tiny_llama(tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    assert main(["generate", str(model_dir), "--prompt", "Weather in Paris?", "--tools", str(tools),
                 "--max-new-tokens", "3"]) == 0
    printed = capsys.readouterr().out.rstrip("\n")
    from ift.evaluation.decoding import Decoding
    from ift.inference.batch import generate_rows
    from ift.inference.prompts import PromptRow
    from ift.inference.target import resolve_target

    target = resolve_target(str(model_dir))
    target.use_tools(WEATHER_TOOLS)
    row = PromptRow(1, {"prompt": "Weather in Paris?"}, [{"role": "user", "content": "Weather in Paris?"}])
    assert "get_weather" in target.tokenizer.decode(target.format.encode(target.tokenizer, row.messages))
    [result] = generate_rows(target, [row], Decoding(max_new_tokens=3), show_progress=False)
    assert printed == result["prediction"]


def test_base_of_a_run_answers_in_the_runs_chat_template(tmp_path, chat_run):
    """A run that trained with a template of its own (a named one or a .jinja file): --base gets it too, not the
    base tokenizer's (whose template here has no tools block)."""
    import shutil

    import yaml

    from ift.inference.target import resolve_target

    run = tmp_path / "run"
    shutil.copytree(chat_run, run)
    template = tmp_path / "tools.jinja"
    template.write_text(TOOLS_TEMPLATE)
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["data"]["chat_template"] = str(template)
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    base = resolve_target(run, base=True)
    assert base.tokenizer.chat_template == TOOLS_TEMPLATE
    base.use_tools(WEATHER_TOOLS)
    ids = base.format.encode(base.tokenizer, [{"role": "user", "content": "Weather?"}])
    assert "get_weather" in base.tokenizer.decode(ids)
