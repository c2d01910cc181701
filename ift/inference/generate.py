"""Talking to a trained model: the run's own prompt format, and one decoding engine for chat and generate.

    target = resolve_target("runs/quickstart")               # a run folder (or a model folder, .gguf, Hub id)
    ids = target.format.encode(target.tokenizer, [{"role": "user", "content": "Hi"}])
    [out] = decode(target.model, target.tokenizer, target.kind, [ids], Decoding(max_new_tokens=64))

Prompt format (`PromptFormat`): exactly what training put before the completion — the tokenizer's chat
template for runs with `data.chat_template: true` (prompt ids as `ift.data.encoding` builds them, so a single user
turn encodes to the very ids evaluation scores), the bare prompt otherwise; for template runs the prompt part
of a promptsource template can be filled from the user's text (`--template`).

Decoding: ift's own KV-cache loop, the one `ift.evaluation.evaluate` runs (`_prefill`: left padding, position ids from
the mask, a prefix shared by the batch run once; finished rows leave the batch), here with sampling
(temperature, top-p) and a per-token callback for streaming. Measured against transformers' `generate` on
the same batches (bench/eval_throughput.py --decode-paths, docs/benchmarks.md), it is faster and gives the
same tokens, so it stays the single causal path; greedy decoding here equals `ift.evaluation.evaluate.generate` token
for token. Seq2seq models decode through transformers' `generate` (as evaluation does), with a streamer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence, TextIO

from ift import atomic
from ift.errors import IftError

if TYPE_CHECKING:
    from ift.modeling.loading import Loaded
    from ift.recipe import Recipe
    from ift.templates.library import Template

TARGET_HELP = "a run folder (recipe.yaml + final/), a model folder, a .gguf file or a Hub model id"
DEFAULT_MAX_NEW_TOKENS = 256
ROLES = ("system", "user", "assistant")


# ------------------------------------------------------------------------------------------ decoding options


@dataclass(frozen=True)
class Decoding:
    """How tokens are picked: greedy (temperature 0, the default) or sampled with temperature and top-p."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise IftError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}", "--max-new-tokens",
                           "give a whole number >= 1")
        if self.temperature < 0:
            raise IftError(f"temperature must be >= 0, got {self.temperature}", "--temperature",
                           "use 0 for greedy decoding, or e.g. 0.7 to sample")
        if not 0 < self.top_p <= 1:
            raise IftError(f"top_p must be in (0, 1], got {self.top_p}", "--top-p", "e.g. --top-p 0.9 (1 = off)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Generation:
    """New token ids (up to and including the first end-of-sequence token) and why decoding stopped."""

    ids: list[int]
    finish_reason: str  # "stop" (an end-of-sequence token) or "length" (max_new_tokens or the context)


# -------------------------------------------------------------------------------------------- prompt format


@dataclass
class PromptFormat:
    """What a run's model was trained to see before its answer."""

    kind: str = "causal"
    chat_template: bool = False  # wrap in the tokenizer's chat template (data.chat_template: true)
    template: Template | None = None  # the prompt part of a promptsource template, filled from the user's text
    fields: tuple[str, ...] = ()  # the row fields that prompt part reads
    origin: str = ""  # where the format comes from, for messages

    @property
    def multi_turn(self) -> bool:
        return self.chat_template

    def describe(self) -> str:
        parts = ["the tokenizer's chat template" if self.chat_template else "the bare prompt (no chat template)"]
        if self.template is not None:
            parts.append(f"promptsource template {self.template.ref} (your text fills "
                         f"{', '.join(self.fields) or 'nothing: it reads no field'})")
        return " + ".join(parts) + (f", from {self.origin}" if self.origin else "")

    def fill(self, text_or_row: str | dict, where: str | None = None) -> str:
        """The template's prompt for the user's text (its one field) or a row of fields; the text itself without one."""
        if self.template is None:
            if isinstance(text_or_row, dict):
                raise IftError("a row of fields needs a template to render it", where,
                               "give a prompt or messages, or --template REF")
            return text_or_row
        row = text_or_row
        if isinstance(row, str):
            stripped = row.strip()
            if len(self.fields) == 1:
                row = {self.fields[0]: stripped}
            elif stripped.startswith("{"):
                row = _json_object(stripped, where)
            elif not self.fields:
                row = {}
            else:
                example = json.dumps({f: "..." for f in self.fields})
                raise IftError(f"template {self.template.ref} reads several fields ({', '.join(self.fields)})", where,
                               f"type them as one JSON object, e.g. {example}")
        missing = [f for f in self.fields if f not in row]
        if missing:
            raise IftError(f"no field {', '.join(map(repr, missing))} for template {self.template.ref}", where,
                           f"give every field the template reads: {', '.join(self.fields)}")
        prompt, _ = self.template.render(row, truncate=False)
        if not prompt.strip():
            raise IftError(f"template {self.template.ref} renders an empty prompt for this input", where,
                           "check the field values (promptsource templates skip rows they do not apply to)")
        return prompt

    def messages_text(self, tokenizer, messages: Sequence[dict]) -> str:
        """The text the model reads before its answer, for a conversation ending with a user turn."""
        if self.chat_template:
            return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        return messages[-1]["content"]

    def encode(self, tokenizer, messages: Sequence[dict], where: str | None = None) -> list[int]:
        """Prompt ids for a conversation ending with a user turn, exactly as training encoded a prompt.

        One user turn goes through `ift.data.encoding.encode_pairs` itself (the ids evaluation scores and generates
        from); a longer conversation through the same chat template, without special tokens added on top.
        """
        from ift.data.encoding import encode_pairs

        _check_messages(messages, where)
        if not self.chat_template and len(messages) > 1:
            raise IftError("this prompt format has no place for several turns or a system message", where,
                           "the run trained without a chat template: give one prompt (a single user turn)")
        if len(messages) == 1:
            ids = encode_pairs(tokenizer, self.kind, [messages[0]["content"]], [""], chat_template=self.chat_template,
                               add_eos=False)[0][0]
        else:
            ids = tokenizer(self.messages_text(tokenizer, messages), add_special_tokens=False)["input_ids"]
        if not ids:
            raise IftError("the prompt has no tokens", where, "give a non-empty prompt")
        return list(ids)


def _json_object(text: str, where: str | None, example: str = '{"field": "value"}') -> dict:
    """One JSON object from a typed prompt or a JSON Lines line; IftError naming where otherwise."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise IftError(f"not valid JSON: {err.msg} (column {err.colno})", where,
                       f"give one JSON object, e.g. {example}") from None
    if not isinstance(value, dict):
        raise IftError(f"expected a JSON object, got {type(value).__name__}", where, f"e.g. {example}")
    return value


def _check_messages(messages: Sequence[Any], where: str | None) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise IftError("messages must be a non-empty list", where,
                       'give [{"role": "user", "content": "..."}] (the last turn is the user\'s)')
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise IftError(f"message {k} is not a {{role, content}} object with role system, user or assistant",
                           where, 'e.g. {"role": "user", "content": "Hello"}')
    if messages[-1]["role"] != "user":
        raise IftError(f"the last message is the {messages[-1]['role']}'s, not the user's", where,
                       "end the conversation with the user turn the model should answer")


def template_prompt(tpl: Template) -> tuple[Template, tuple[str, ...]]:
    """The prompt part of a template (before '|||') as a template of its own, and the fields it reads."""
    from jinja2 import TemplateSyntaxError, meta

    from ift.templates.library import ENV, SEPARATOR

    prompt_part = tpl.jinja.split(SEPARATOR, 1)[0]
    try:
        tree = ENV.parse(prompt_part)
    except TemplateSyntaxError as err:
        raise IftError(f"the prompt of template {tpl.ref} cannot be rendered on its own: {err.message}", tpl.location,
                       "use --raw and type the whole prompt, or a template whose '|||' is outside any {% block %}") \
            from None
    fields = sorted(meta.find_undeclared_variables(tree) - set(ENV.globals) - {"answer_choices"})
    return dataclasses.replace(tpl, jinja=prompt_part), tuple(fields)


def run_prompt_format(recipe: Recipe, kind: str, *, template: str | None = None, raw: bool = False,
                      origin: str = "") -> PromptFormat:
    """The prompt format a run trained with; `template` ("none" = bare text) overrides the template choice.

    Without `template`: chat-template runs take the user's text as the user turn (free chat); runs without a
    chat template whose first templated source has a template fill the prompt of that source's eval_template
    (else its first template) — the only format such a run has seen.
    """
    chat = recipe.data.chat_run and kind == "causal" and not raw
    fmt = PromptFormat(kind=kind, chat_template=chat, origin=origin)
    if raw or template == "none":
        return fmt
    ref = template
    if ref is None and not chat:
        ref = next((s.eval_template or s.templates[0] for s in recipe.data.sources if s.eval_template or s.templates),
                   None)
    if ref is None:
        return fmt
    from ift.templates.library import TemplateLibrary

    tpl = TemplateLibrary(dirs=tuple(recipe.data.templates_dir)).get(ref)
    fmt.template, fmt.fields = template_prompt(tpl)
    return fmt


# ------------------------------------------------------------------------------------------------- targets


@dataclass
class Target:
    """A loaded model with the prompt format to talk to it in."""

    loaded: Loaded
    format: PromptFormat
    label: str  # "fine-tuned run X", "base model of run X", "model X"
    recipe: Recipe | None = None
    run_dir: Path | None = None

    @property
    def model(self):
        return self.loaded.model

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def kind(self) -> str:
        return self.loaded.kind

    def check_system(self, system: str | None) -> None:
        """A system prompt needs a chat template to go in."""
        if system and not self.format.chat_template:
            raise IftError("this prompt format has no place for a system prompt", "--system",
                           "the model is used without a chat template here (the run trained without one, or "
                           "--raw): drop --system")


def resolve_target(target: str | os.PathLike, *, base: bool = False, template: str | None = None,
                   raw: bool = False, where: str = "RUN_DIR|MODEL") -> Target:
    """Load what `ift chat` / `ift generate` talk to: a run's fine-tuned model (adapters applied, not merged),
    its base (`base=True`), or any model (folder, .gguf file, Hub id), with the prompt format to use."""
    from ift.modeling.loading import load, load_final
    from ift.recipe import AdapterConfig, ModelConfig, load_recipe

    text = str(target)
    if not text.strip():
        raise IftError("no model given", where, f"give {TARGET_HELP}")
    path = Path(text).expanduser()
    run_dir = _run_folder(path)
    if run_dir is not None:
        recipe = load_recipe(run_dir / "recipe.yaml")
        if path.resolve() != run_dir.resolve() and (path / "config.json").is_file() and not base:
            # a model folder inside a run (RUN_DIR/merged): the run's format, that folder's weights
            loaded = load(ModelConfig(name_or_path=str(path)), AdapterConfig())
            label = f"model {path}"
        elif base:
            loaded = load(recipe.model, AdapterConfig())
            label = f"base model of run {run_dir}"
        else:
            final = run_dir / "final"
            if not final.is_dir():
                raise IftError("the run has no final model", str(final),
                               "let training finish (it writes final/), or talk to the base model with --base")
            # a QLoRA adapter runs on the 4-bit base it was trained on, as `ift eval` scores it
            loaded = load_final(final, recipe.model, adapter=recipe.adapter)
            label = f"fine-tuned run {run_dir}"
        fmt = run_prompt_format(recipe, loaded.kind, template=template, raw=raw,
                                origin=f"{run_dir / 'recipe.yaml'} (data.chat_template: {recipe.data.chat_template}"
                                       + (", conversational sources)" if recipe.data.conversational else ")"))
        _to_accelerator(loaded.model)
        return Target(loaded, fmt, label, recipe, run_dir)
    if base:
        raise IftError("--base needs a run folder (its recipe names the base model)", where,
                       "give a run folder, or the base model itself without --base")
    if path.is_file() and path.suffix == ".gguf":
        cfg = ModelConfig(gguf_file=str(path))
    elif path.is_file():
        raise IftError(f"'{text}' is a file, not a model", where, f"give {TARGET_HELP}")
    elif path.is_dir() or _looks_like_path(text):
        if not path.exists():
            raise IftError(f"no run folder or model at {text}", where, f"give {TARGET_HELP}")
        if not (path / "config.json").is_file():
            raise IftError(f"{text} is neither a run folder (recipe.yaml) nor a model folder (config.json)", where,
                           f"give {TARGET_HELP}")
        cfg = ModelConfig(name_or_path=str(path))
    else:
        cfg = ModelConfig(name_or_path=text)  # a Hub id: modeling explains unreachable / unknown ids
    loaded = load(cfg, AdapterConfig())
    has_template = bool(getattr(loaded.tokenizer, "chat_template", None))
    if template not in (None, "none"):
        raise IftError("--template needs a run folder (its recipe names the template library)", where,
                       "give a run folder, or type the whole prompt")
    fmt = PromptFormat(kind=loaded.kind, chat_template=has_template and loaded.kind == "causal" and not raw,
                       origin="the model's tokenizer")
    _to_accelerator(loaded.model)
    return Target(loaded, fmt, f"model {text}")


def _run_folder(path: Path) -> Path | None:
    """The run folder `path` is, or whose final/ or merged/ it is; None for anything else."""
    if path.is_dir() and (path / "recipe.yaml").is_file():
        return path
    if path.name in ("final", "merged") and path.is_dir() and (path.parent / "recipe.yaml").is_file():
        return path.parent
    return None


def _looks_like_path(text: str) -> bool:
    return text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text


def _to_accelerator(model) -> None:
    """Use a GPU when there is one; 4-bit models are placed by their loader."""
    import torch

    if torch.cuda.is_available() and not getattr(model, "is_loaded_in_4bit", False) \
            and next(model.parameters()).device.type == "cpu":
        model.to("cuda")


# ------------------------------------------------------------------------------------------------ decoding


def stop_ids(model, tokenizer) -> list[int]:
    """Every id that ends an answer: the tokenizer's EOS and the model's generation config's (end of turn)."""
    from ift.evaluation.evaluate import _eos_ids

    return _eos_ids(model, tokenizer)


def decode(model, tokenizer, kind: str, prompts: Sequence[Sequence[int]], decoding: Decoding = Decoding(), *,
           batch_size: int = 16, on_token: Callable[[int, int], None] | None = None,
           progress: Callable[[int], None] | None = None) -> list[Generation]:
    """New tokens for each prompt (token ids), batched by length with left padding and a KV cache.

    on_token(prompt_index, token_id) is called for every new token as soon as it is chosen (streaming);
    progress(n) after each finished batch of n prompts.
    """
    import torch

    from ift.evaluation.evaluate import _batches, _device, _inference, _pad_id, check_can_generate

    check_can_generate(model)
    if kind not in ("causal", "seq2seq"):
        raise IftError(f"unknown model kind '{kind}'", None, "use 'causal' or 'seq2seq'")
    eos = stop_ids(model, tokenizer)
    pad = _pad_id(tokenizer, eos)
    device = _device(model)
    generator = None
    if not decoding.greedy:
        generator = torch.Generator()
        if decoding.seed is None:
            generator.seed()
        else:
            generator.manual_seed(decoding.seed)
    limit = _context_limit(model)
    out: list[Generation | None] = [None] * len(prompts)
    with _inference(model):
        for idx in _batches([len(p) for p in prompts], batch_size):
            batch = [list(prompts[i]) for i in idx]
            if kind == "causal":
                budgets = [_budget(len(p), decoding.max_new_tokens, limit) for p in batch]
                new = _decode_causal(model, batch, budgets, decoding, generator, eos, pad, device,
                                     (lambda r, t, idx=idx: on_token(idx[r], t)) if on_token else None)
            else:
                new = _decode_seq2seq(model, tokenizer, batch, decoding, eos, pad, device,
                                      (lambda r, t, idx=idx: on_token(idx[r], t)) if on_token else None)
            for i, ids in zip(idx, new):
                ids = _until_stop(ids, eos)
                out[i] = Generation(ids, "stop" if ids and ids[-1] in eos else "length")
            if progress:
                progress(len(idx))
    return out  # type: ignore[return-value]


def _context_limit(model) -> int | None:
    from ift.evaluation.evaluate import _unwrap

    value = getattr(_unwrap(model).config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def _budget(prompt_len: int, max_new: int, limit: int | None) -> int:
    """New tokens a prompt may get: max_new, fewer where the model's context ends first (at least one)."""
    if limit is None:
        return max_new
    return max(1, min(max_new, limit - prompt_len))


def _until_stop(ids: list[int], eos: Sequence[int]) -> list[int]:
    for k, t in enumerate(ids):
        if t in eos:
            return ids[: k + 1]
    return ids


def _pick(logits, decoding: Decoding, generator):
    """Next token per row: argmax (greedy), or a draw from the temperature-scaled top-p distribution (on the CPU,
    so a seed gives the same draws on every device)."""
    import torch

    if decoding.greedy:
        return logits.argmax(-1).cpu()
    probs = torch.softmax(logits.float().cpu() / decoding.temperature, dim=-1)
    if decoding.top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p >= decoding.top_p  # keep the smallest set reaching top_p
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _decode_causal(model, prompts: list[list[int]], budgets: list[int], decoding: Decoding, generator,
                   eos: list[int], pad: int, device, on_token) -> list[list[int]]:
    """ift's KV-cache loop (`ift.evaluation.evaluate._greedy_causal`, same prefill, cache handling and stopping) with a
    token picker and a callback; a row leaves the batch once it emits EOS or spends its budget."""
    import torch

    from ift.evaluation.evaluate import _prefill, _returned_cache, _select_cache, _with_cache

    logits, cache, mask = _prefill(model, prompts, pad, device)
    out: list[list[int]] = [[] for _ in prompts]
    alive = torch.arange(len(prompts))  # batch row -> prompt index
    pos = mask.sum(-1)  # the next token's position in each row
    left = torch.tensor(budgets)
    stop = torch.tensor(eos)
    for _ in range(max(budgets)):
        nxt = _pick(logits, decoding, generator)
        for r, i in enumerate(alive.tolist()):
            out[i].append(int(nxt[r]))
            if on_token is not None:
                on_token(i, int(nxt[r]))
        left = left - 1
        going = ~torch.isin(nxt, stop) & (left > 0)
        if not going.any():
            break
        if not going.all():
            keep = going.nonzero().squeeze(1)
            alive, nxt, pos, mask, left = alive[keep], nxt[keep], pos[keep], mask[keep], left[keep]
            cache = _select_cache(cache, keep.to(device))
        mask = torch.cat([mask, torch.ones((len(alive), 1), dtype=mask.dtype)], dim=1)
        step = model(input_ids=nxt.unsqueeze(1).to(device), attention_mask=mask.to(device),
                     position_ids=pos.unsqueeze(1).to(device), **_with_cache(model, cache), use_cache=True)
        logits, cache, pos = step.logits[:, -1].float(), _returned_cache(step), pos + 1
    return out


def _decode_seq2seq(model, tokenizer, prompts: list[list[int]], decoding: Decoding, eos: list[int], pad: int,
                    device, on_token) -> list[list[int]]:
    """transformers' generate (as ift.evaluation.evaluate decodes seq2seq models), the model's generation config with
    ift's decoding options; streamed through a BaseStreamer."""
    import copy

    import torch
    from transformers.generation.streamers import BaseStreamer

    from ift.evaluation.evaluate import _pad, _unwrap

    base = _unwrap(model)
    config = copy.deepcopy(base.generation_config)
    config.update(max_new_tokens=decoding.max_new_tokens, do_sample=not decoding.greedy, num_beams=1,
                  eos_token_id=eos, pad_token_id=pad, use_cache=True,
                  temperature=decoding.temperature if not decoding.greedy else None,
                  top_p=decoding.top_p if not decoding.greedy else None, top_k=None)
    start = getattr(base.config, "decoder_start_token_id", None)
    if start is not None:
        config.decoder_start_token_id = start

    class Stream(BaseStreamer):
        first = True

        def put(self, value):
            if self.first:  # the decoder start tokens
                self.first = False
                return
            for r, t in enumerate(value.reshape(len(prompts), -1)[:, -1].tolist()):
                on_token(r, int(t))

        def end(self):
            pass

    if decoding.seed is not None:
        torch.manual_seed(decoding.seed)
    ids, mask = _pad(prompts, pad, left=False)
    gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                         streamer=Stream() if on_token is not None else None)
    return gen[:, 1:].tolist()  # the output starts with the decoder start token


def text_of(tokenizer, ids: Sequence[int]) -> str:
    """An answer's text as evaluation reads it: special tokens skipped, surrounding whitespace stripped."""
    return tokenizer.decode(list(ids), skip_special_tokens=True).strip()


class TextStream:
    """Prints an answer while its tokens arrive: decoded as a whole each time (so multi-byte characters and
    merged spaces come out right), only the new text written; leading whitespace and special tokens dropped."""

    def __init__(self, tokenizer, write: Callable[[str], Any], stop: Sequence[int] = ()):
        self.tokenizer, self.write, self.stop = tokenizer, write, set(stop)
        self.ids: list[int] = []
        self.sent = 0
        self.started = False

    def add(self, token_id: int) -> None:
        if token_id in self.stop:
            return
        self.ids.append(token_id)
        self._emit(final=False)

    def finish(self) -> None:
        """Write what is still held back (an incomplete character at the very end)."""
        self._emit(final=True)

    def _emit(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") and not final:  # half of a multi-byte character: wait for the rest
            return
        new = text[self.sent:]
        self.sent = len(text)
        if not self.started:
            new = new.lstrip()
            self.started = bool(new)
        if new:
            self.write(new)


# ---------------------------------------------------------------------------------------------------- chat


@dataclass
class ChatSession:
    """A conversation with a target: the history (chat-template runs) and the system prompt."""

    target: Target
    decoding: Decoding = Decoding()
    system: str | None = None
    history: list[dict] = field(default_factory=list)

    def messages(self, text: str) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system and self.target.format.chat_template else []
        if not self.target.format.multi_turn:
            return head + [{"role": "user", "content": text}]
        return head + self.history + [{"role": "user", "content": text}]

    def reset(self) -> None:
        self.history.clear()

    def reply(self, text: str, write: Callable[[str], Any]) -> tuple[str, list[str]]:
        """Answer `text`, streaming through `write`; (answer, notices). Raises IftError for unusable input."""
        fmt, tok = self.target.format, self.target.tokenizer
        prompt = fmt.fill(text)
        notices: list[str] = []
        messages = self.messages(prompt)
        ids = fmt.encode(tok, messages)
        limit = _context_limit(self.target.model)
        # keep the newest turns when the conversation outgrows the context (room for one token at least)
        while limit is not None and len(ids) >= limit and len(self.history) >= 2:
            del self.history[:2]
            notices.append("earlier turns dropped to fit the model's context")
            messages = self.messages(prompt)
            ids = fmt.encode(tok, messages)
        if limit is not None and len(ids) >= limit:
            raise IftError(f"the prompt is {len(ids)} tokens, the model's context is {limit}", "chat",
                           "send a shorter message")
        stream = TextStream(tok, write, stop_ids(self.target.model, tok))
        [gen] = decode(self.target.model, tok, self.target.kind, [ids], self.decoding, batch_size=1,
                       on_token=lambda _i, t: stream.add(t))
        stream.finish()
        answer = text_of(tok, gen.ids)
        if fmt.multi_turn:
            self.history += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        if gen.finish_reason == "length":
            notices.append(f"stopped after {len(gen.ids)} new tokens (--max-new-tokens)")
        return answer, notices


CHAT_HELP = ("commands: /reset (forget the conversation), /system TEXT (set the system prompt; /system alone "
             "clears it),\n          /exit (or Ctrl-D). Ctrl-C stops an answer.")


def chat_loop(session: ChatSession, read: Callable[[], str | None], out: TextIO, *, prompt_label: str = "") -> int:
    """The interactive loop: read a line (None = end of input), answer it streaming to `out`, handle commands."""

    def say(text: str) -> None:
        out.write(text)
        out.flush()

    fmt, d = session.target.format, session.decoding
    how = "greedy" if d.greedy else f"sampling, temperature {d.temperature:g}, top-p {d.top_p:g}"
    say(f"chatting with the {session.target.label}\nprompt format: {fmt.describe()}\n"
        f"decoding: {how}, at most {d.max_new_tokens} new tokens\n{CHAT_HELP}\n")
    if not fmt.multi_turn:
        say("each message is a new prompt: this run trained single prompts, without a chat template\n")
    while True:
        if prompt_label:
            say(prompt_label)
        line = read()
        if line is None:
            say("\n")
            return 0
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command, _, rest = text.partition(" ")
            if command in ("/exit", "/quit"):
                return 0
            if command == "/reset":
                session.reset()
                say("(conversation reset)\n")
            elif command == "/system":
                if not fmt.chat_template:
                    say("(this prompt format has no system prompt: the run trained without a chat template)\n")
                    continue
                session.system = rest.strip() or None
                session.reset()
                say(f"(system prompt {'set' if session.system else 'cleared'}; conversation reset)\n")
            elif command == "/help":
                say(CHAT_HELP + "\n")
            else:
                say(f"(unknown command {command}; {CHAT_HELP})\n")
            continue
        try:
            _, notices = session.reply(text, say)
        except IftError as err:
            say(f"error: {err.line()}\n")
            continue
        except KeyboardInterrupt:
            say("\n(stopped)\n")
            continue
        say("\n")
        for notice in notices:
            say(f"({notice})\n")


# ------------------------------------------------------------------------------------------------ generate


@dataclass
class PromptRow:
    line: int  # 1-based line number in the input file (1 for --prompt)
    record: dict  # the input line as read (written back with the prediction added)
    messages: list[dict]


def read_records(path: Path, *, field_name: str = "prediction") -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a JSON Lines file; each problem names its line."""
    path = Path(path)
    where_file = str(path)
    if not path.exists():
        raise IftError("input file not found", where_file, "give an existing .jsonl file (--input) or --prompt TEXT")
    if not path.is_file():
        raise IftError("input is not a file", where_file, "give a .jsonl file with one JSON object per line")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise IftError(f"input is not UTF-8 text (byte {err.start})", where_file, "save the file as UTF-8") from None
    records: list[tuple[int, dict]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        record = _json_object(line, where, '{"prompt": "..."} per line (JSON Lines)')
        if field_name in record:
            raise IftError(f"the line already has a '{field_name}' field, which the output would overwrite", where,
                           "rename that field, or choose another output field with --field")
        if "prompt" not in record and "messages" not in record and not record:
            raise IftError("the line is an empty object", where, 'give {"prompt": "..."} or {"messages": [...]}')
        records.append((number, record))
    if not records:
        raise IftError("the input file has no prompts (it is empty)", where_file,
                       'give one JSON object per line, e.g. {"prompt": "..."} or {"messages": [...]}')
    return records


def to_rows(records: Sequence[tuple[int, dict]], fmt: PromptFormat, *, source: str = "input",
            system: str | None = None) -> list[PromptRow]:
    """The conversation each record asks for, in `fmt`; a problem names the record's line."""
    return [PromptRow(number, record, row_messages(record, fmt, f"{source}, line {number}", system))
            for number, record in records]


def read_prompts(path: Path, fmt: PromptFormat, *, system: str | None = None, field_name: str = "prediction") \
        -> list[PromptRow]:
    """The prompts of a JSON Lines file: one object per line with `prompt` (text) or `messages` (a conversation
    ending with the user's turn), or, with a template, the fields it reads."""
    return to_rows(read_records(path, field_name=field_name), fmt, source=str(path), system=system)


def row_messages(record: dict, fmt: PromptFormat, where: str, system: str | None = None) -> list[dict]:
    """The conversation an input line asks the model to continue.

    `prompt` and `messages` are taken as they are (a prompt as in evaluation's rows: a template run's prompt is
    already rendered); a line with neither is a row of fields for the format's template, rendered by it.
    """
    if "messages" in record:
        messages = record["messages"]
        _check_messages(messages, where)
        if not fmt.chat_template:
            if len(messages) > 1:
                raise IftError("the line has a conversation, but this prompt format has no chat template", where,
                               "give one user turn (or a prompt), or use a model/run with a chat template")
        messages = [dict(m) for m in messages]
    elif "prompt" in record:
        prompt = record["prompt"]
        if not isinstance(prompt, str):
            raise IftError(f"prompt must be a string, got {type(prompt).__name__}", where, 'e.g. {"prompt": "Hello"}')
        if not prompt.strip():
            raise IftError("the prompt is empty", where, "give every line a non-empty prompt")
        messages = [{"role": "user", "content": prompt}]
    elif fmt.template is not None:
        messages = [{"role": "user", "content": fmt.fill(record, where)}]
    else:
        raise IftError("the line has neither a 'prompt' nor a 'messages' field", where,
                       'give {"prompt": "..."} or {"messages": [{"role": "user", "content": "..."}]}, '
                       "or --template REF to render the line's fields")
    if system and fmt.chat_template and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}] + messages
    return messages


def generate_rows(target: Target, rows: Sequence[PromptRow], decoding: Decoding, *, batch_size: int = 16,
                  field_name: str = "prediction", show_progress: bool | None = None) -> list[dict]:
    """Each input record with `field_name` added: the model's answer, decoded as evaluation decodes it."""
    from tqdm.auto import tqdm

    tok = target.tokenizer
    encoded = [target.format.encode(tok, r.messages, f"line {r.line}") for r in rows]
    limit = _context_limit(target.model)
    for r, ids in zip(rows, encoded):
        if limit is not None and len(ids) >= limit:
            raise IftError(f"the prompt is {len(ids)} tokens, the model's context is {limit}", f"line {r.line}",
                           "shorten the prompt")
    with tqdm(total=len(rows), desc="generate", unit="prompt", disable=None if show_progress is None
              else not show_progress, leave=False, file=sys.stderr) as bar:
        gens = decode(target.model, tok, target.kind, encoded, decoding, batch_size=batch_size, progress=bar.update)
    return [{**r.record, field_name: text_of(tok, g.ids)} for r, g in zip(rows, gens)]


def write_jsonl(path: Path, records: Iterable[dict]) -> Path:
    """One JSON object per line, written atomically (a temporary file renamed into place)."""
    return atomic.write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
