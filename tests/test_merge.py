"""`ift merge`: the merged model's outputs equal the adapter-applied model's, in the base's own dtype."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
import torch

from conftest import build_tiny_llama, build_tiny_t5, build_tiny_tokenizer
from ift.cli import main
from ift.errors import IftError
from ift.publish.merge import merge
from ift.recipe import load_recipe

TEXTS = ["Headline: profits up. Sentiment:", "The bank reported a loss and its stock fell sharply."]


def _make_run(root: Path, kind: str = "causal", method: str = "lora", dtype: torch.dtype = torch.float32) -> Path:
    """A tiny base saved to root/base (in `dtype`) and a run whose final/ holds a LoRA adapter with random B weights."""
    from peft import LoraConfig, get_peft_model

    tokenizer = build_tiny_tokenizer()
    model = (build_tiny_llama(tokenizer) if kind == "causal" else build_tiny_t5(tokenizer)).to(dtype)
    base = root / "base"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    targets = ["q_proj", "v_proj", "up_proj"] if kind == "causal" else ["q", "v", "wi"]
    task = "CAUSAL_LM" if kind == "causal" else "SEQ_2_SEQ_LM"
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type=task))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # B starts at zero: randomise it so the adapter changes the outputs
                p.normal_(0, 0.3)
    run = root / "run"
    peft_model.save_pretrained(run / "final")
    tokenizer.save_pretrained(run / "final")
    (root / "recipe.yaml").write_text(f"""
model: {{name_or_path: {base}}}
adapter: {{method: {method}, r: 4, alpha: 8, target_modules: [{", ".join(targets)}]}}
data: {{sources: [{{path: {root / 'rows.jsonl'}}}]}}
training: {{output_dir: {run}}}
""")
    load_recipe(root / "recipe.yaml").save(run / "recipe.yaml")
    return run


def _logits(model, tokenizer, kind: str) -> torch.Tensor:
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        if kind == "seq2seq":
            return model(**batch, decoder_input_ids=batch["input_ids"][:, :5]).logits
        return model(**batch).logits


def _reference(run: Path, kind: str):
    """The base in float32 with the adapter applied by peft, without merging; and the bare base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    auto = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    base = _logits(auto.from_pretrained(run.parent / "base", dtype=torch.float32), tokenizer, kind)
    adapted = PeftModel.from_pretrained(auto.from_pretrained(run.parent / "base", dtype=torch.float32), run / "final")
    return _logits(adapted.eval(), tokenizer, kind), base, tokenizer, auto


@pytest.mark.parametrize("kind, method", [("causal", "lora"), ("causal", "qlora"), ("seq2seq", "lora")])
def test_merged_outputs_equal_the_adapter_applied_model(tmp_path, kind, method):
    from safetensors import safe_open

    run = _make_run(tmp_path, kind, method)
    out = merge(run)
    assert out == run / "merged"
    expected, base, tokenizer, auto = _reference(run, kind)
    assert (expected - base).abs().max() > 1e-2, "the adapter must not be a no-op for this test to mean anything"
    merged = auto.from_pretrained(out).eval()
    assert (_logits(merged, tokenizer, kind) - expected).abs().max() < 1e-5

    # a standalone float32 model in safetensors, with no adapter left and never quantized (even for QLoRA)
    names = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in names and "config.json" in names and "tokenizer.json" in names
    assert not any(n.endswith((".bin", ".pt")) or n.startswith("adapter_") for n in names)
    assert not list(tmp_path.glob("run/.merged*")), "temporary folder left behind"
    with safe_open(out / "model.safetensors", "pt") as fh:
        keys = list(fh.keys())
        assert not any("lora" in k for k in keys)
        assert {fh.get_tensor(k).dtype for k in keys} == {torch.float32}
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers" and "merged" in card.data.tags


def test_merge_replaces_an_earlier_merge_and_honours_out(tmp_path, capsys):
    run = _make_run(tmp_path)
    custom = tmp_path / "exports" / "standalone"
    assert main(["merge", str(run), "--out", str(custom)]) == 0
    assert f"merged model: {custom}" in capsys.readouterr().out
    (custom / "stale.txt").write_text("from an earlier merge")
    assert main(["merge", str(run), "--out", str(custom)]) == 0
    assert not (custom / "stale.txt").exists() and (custom / "model.safetensors").is_file()


@pytest.mark.parametrize("case, message", [
    ("full_model", "final/ holds a full model, not an adapter: there is nothing to merge"),
    ("no_final", "the run has no final weights (final/ is missing)"),
    ("not_a_run", "run folder not found"),
    ("out_not_a_model", "the output folder exists and does not hold a model"),
    ("out_inside_final", "the merged model cannot be written into final/"),
    ("wrong_base", "the adapter does not fit the base model"),
])
def test_merge_errors_exit_2(tmp_path, capsys, case, message):
    run = _make_run(tmp_path)
    args = ["merge", str(run)]
    if case == "full_model":
        (run / "final" / "adapter_config.json").unlink()
    elif case == "no_final":
        import shutil

        shutil.rmtree(run / "final")
    elif case == "not_a_run":
        args = ["merge", str(tmp_path / "nowhere")]
    elif case == "out_not_a_model":
        (tmp_path / "notes").mkdir()
        (tmp_path / "notes" / "todo.txt").write_text("keep me")
        args += ["--out", str(tmp_path / "notes")]
    elif case == "out_inside_final":
        args += ["--out", str(run / "final" / "merged")]
    elif case == "wrong_base":  # a base of another width: the adapter's shapes cannot fit
        from transformers import LlamaConfig, LlamaForCausalLM

        tok = build_tiny_tokenizer()
        LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path / "base")
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and lines[-1].startswith("error: ") and message in lines[-1]
    if case == "out_not_a_model":
        assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    assert not (run / "merged").exists()


def test_merge_refuses_a_scratch_base(tmp_path):
    run = _make_run(tmp_path)
    raw = yaml.safe_load((run / "recipe.yaml").read_text())
    raw["model"].update(init="scratch", name_or_path=None, config={"model_type": "llama"})
    (run / "recipe.yaml").write_text(yaml.safe_dump(raw))
    # LoRA on a random base is refused as soon as the recipe is read, before any weights load
    with pytest.raises(IftError, match="a scratch model has none"):
        merge(run)


def _dtypes(folder: Path) -> set:
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as fh:
        return {fh.get_tensor(k).dtype for k in fh.keys()}


def test_merge_keeps_a_bf16_base_in_bf16(tmp_path, capsys):
    """A bf16 base merges to bf16 (half the float32 size) by default; --dtype chooses another."""
    run = _make_run(tmp_path, dtype=torch.bfloat16)
    assert main(["merge", str(run)]) == 0
    out = run / "merged"
    assert _dtypes(out) == {torch.bfloat16}
    assert "loading the base model in bfloat16" in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    # the base's bf16 weights with the adapter applied by peft in float32, unmerged: the reference
    expected, base, tokenizer, auto = _reference(run, "causal")
    assert (expected - base).abs().max() > 1e-2
    merged = auto.from_pretrained(out).eval()
    assert merged.dtype == torch.bfloat16
    got = _logits(merged, tokenizer, "causal").float()
    # bf16 keeps 8 bits of mantissa: weights and activations round at about 2**-8 relative
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2 * float(expected.abs().max()))
    assert (got - base).abs().max() > 10 * (got - expected).abs().max()  # the adapter is in, not rounded away

    assert main(["merge", str(run), "--out", str(tmp_path / "fp32"), "--dtype", "fp32"]) == 0
    assert _dtypes(tmp_path / "fp32") == {torch.float32}
    size = lambda folder: (folder / "model.safetensors").stat().st_size  # noqa: E731
    assert size(out) < 0.55 * size(tmp_path / "fp32")
    with pytest.raises(SystemExit) as exited:  # argparse: an unknown --dtype
        main(["merge", str(run), "--dtype", "int8"])
    assert exited.value.code == 2
    with pytest.raises(IftError, match="unknown dtype 'int8'"):
        merge(run, dtype="int8")
