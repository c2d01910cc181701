"""Write a tool-calling dataset built from function schemas: requests in words, answered by the right call.

    python data/make_tool_calls_data.py            # writes data/tool_calls/{tools.json,train,validation,test}.jsonl

Deterministic (Python's `random.Random` with an integer seed): the same files on every machine. No row is copied
from any external dataset. Five functions (tools.json, OpenAI's schema form); each row's `tools` column (JSON text)
offers two of them, the one the request needs and another, in a random order; each row is a `messages` conversation:
a user request phrased from a few patterns with slot values drawn from word lists, and the assistant's call with
the arguments the request states. A third of the training rows go on: the tool's result and the assistant's answer
from it. Validation and test rows end with the call; the test rows are the held-out prompts whose calls are scored
(call exact match, argument F1: `ift eval`, through `ift.evaluation.tool_calls`).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 20261207
SIZES = {"train": 480, "validation": 40, "test": 80}

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"]}}},
    {"type": "function", "function": {
        "name": "convert_currency", "description": "Convert an amount of money between currencies",
        "parameters": {"type": "object", "properties": {
            "amount": {"type": "number"}, "from_currency": {"type": "string"}, "to_currency": {"type": "string"}},
            "required": ["amount", "from_currency", "to_currency"]}}},
    {"type": "function", "function": {
        "name": "set_timer", "description": "Start a countdown timer",
        "parameters": {"type": "object", "properties": {
            "minutes": {"type": "integer"}, "label": {"type": "string"}}, "required": ["minutes", "label"]}}},
    {"type": "function", "function": {
        "name": "search_flights", "description": "Find flights between two cities on a date",
        "parameters": {"type": "object", "properties": {
            "origin": {"type": "string"}, "destination": {"type": "string"},
            "date": {"type": "string", "description": "YYYY-MM-DD"}},
            "required": ["origin", "destination", "date"]}}},
    {"type": "function", "function": {
        "name": "send_email", "description": "Send a short email",
        "parameters": {"type": "object", "properties": {
            "to": {"type": "string"}, "subject": {"type": "string"}}, "required": ["to", "subject"]}}},
]

CITIES = ["Paris", "Lyon", "Berlin", "Madrid", "Lisbon", "Oslo", "Vienna", "Prague", "Dublin", "Rome", "Athens",
          "Warsaw", "Helsinki", "Zurich", "Brussels", "Amsterdam"]
CURRENCIES = {"euros": "EUR", "dollars": "USD", "pounds": "GBP", "yen": "JPY", "francs": "CHF"}
LABELS = ["tea", "pasta", "laundry", "meeting", "workout", "bread", "nap", "call"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
PEOPLE = ["anna", "ben", "chloe", "david", "emma", "farid", "grace", "hugo"]
DOMAINS = ["example.com", "mail.org", "work.net"]
SUBJECTS = ["budget review", "team lunch", "project update", "holiday plans", "invoice", "weekly report"]


def _request(rng: random.Random) -> tuple[str, dict]:
    name = rng.choice([t["function"]["name"] for t in TOOLS])
    if name == "get_weather":
        city, unit = rng.choice(CITIES), rng.choice(["celsius", "fahrenheit"])
        text = rng.choice(["What's the weather in {c} right now, in {u}?", "How warm is it in {c}? Give me {u}.",
                           "Weather for {c} please ({u})."]).format(c=city, u=unit)
        return text, {"name": name, "arguments": {"city": city, "unit": unit}}
    if name == "convert_currency":
        amount = rng.choice([5, 12, 20, 50, 75, 100, 250, 1000])
        a, b = rng.sample(list(CURRENCIES), 2)
        text = rng.choice(["Convert {n} {a} to {b}.", "How many {b} is {n} {a}?",
                           "I have {n} {a}; what is that in {b}?"]).format(n=amount, a=a, b=b)
        return text, {"name": name, "arguments": {"amount": amount, "from_currency": CURRENCIES[a],
                                                  "to_currency": CURRENCIES[b]}}
    if name == "set_timer":
        minutes, label = rng.choice([1, 3, 5, 10, 15, 20, 30, 45]), rng.choice(LABELS)
        text = rng.choice(["Set a {m} minute timer for the {l}.", "Timer: {m} minutes, call it {l}.",
                           "Remind me about the {l} in {m} minutes."]).format(m=minutes, l=label)
        return text, {"name": name, "arguments": {"minutes": minutes, "label": label}}
    if name == "search_flights":
        origin, destination = rng.sample(CITIES, 2)
        month, day = rng.randrange(12), rng.randrange(1, 29)
        text = rng.choice(["Find flights from {o} to {d} on {m} {day}.", "Any flights {o} to {d}, {m} {day}?",
                           "I need to fly from {o} to {d} on {m} {day}."]).format(
            o=origin, d=destination, m=MONTHS[month], day=day)
        return text, {"name": name, "arguments": {"origin": origin, "destination": destination,
                                                  "date": f"2027-{month + 1:02d}-{day:02d}"}}
    person, subject = rng.choice(PEOPLE), rng.choice(SUBJECTS)
    address = f"{person}@{rng.choice(DOMAINS)}"
    text = rng.choice(["Email {a} about the {s}.", "Send {a} a mail with subject '{s}'.",
                       "Write to {a}, subject: {s}."]).format(a=address, s=subject)
    return text, {"name": name, "arguments": {"to": address, "subject": subject}}


def _result(call: dict, rng: random.Random) -> tuple[str, str]:
    """A tool result for the call and the assistant's answer from it."""
    a = call["arguments"]
    if call["name"] == "get_weather":
        t = rng.randrange(-5, 35) if a["unit"] == "celsius" else rng.randrange(20, 95)
        return json.dumps({"temperature": t}), f"It is {t} degrees {a['unit']} in {a['city']}."
    if call["name"] == "convert_currency":
        v = round(a["amount"] * rng.uniform(0.5, 2.0), 2)
        return json.dumps({"converted": v}), f"{a['amount']} {a['from_currency']} is {v} {a['to_currency']}."
    if call["name"] == "set_timer":
        return json.dumps({"ok": True}), f"Your {a['label']} timer is set for {a['minutes']} minutes."
    if call["name"] == "search_flights":
        n = rng.randrange(0, 6)
        return json.dumps({"flights": n}), f"I found {n} flights from {a['origin']} to {a['destination']}."
    return json.dumps({"sent": True}), f"Your email to {a['to']} is sent."


def rows(split: str, n: int, rng: random.Random) -> list[dict]:
    out = []
    for i in range(n):
        text, call = _request(rng)
        call_id = f"call_{split}_{i}"
        messages = [{"role": "user", "content": text},
                    {"role": "assistant", "content": None, "tool_calls": [
                        {"id": call_id, "type": "function",
                         "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])}}]}]
        if split == "train" and i % 3 == 0:
            result, answer = _result(call, rng)
            messages += [{"role": "tool", "tool_call_id": call_id, "content": result},
                         {"role": "assistant", "content": answer}]
        # the row's tools: its function and one other, in a random order (the model must pick by name)
        other = rng.choice([t for t in TOOLS if t["function"]["name"] != call["name"]])
        mine = next(t for t in TOOLS if t["function"]["name"] == call["name"])
        out.append({"messages": messages, "tools": json.dumps(rng.sample([mine, other], 2))})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=HERE / "tool_calls")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tools.json").write_text(json.dumps(TOOLS, indent=1) + "\n", encoding="utf-8")
    rng = random.Random(SEED)
    seen: set[str] = set()
    for split, n in SIZES.items():
        kept = []
        while len(kept) < n:  # held-out prompts are never training prompts
            for r in rows(split, n - len(kept), rng):
                if r["messages"][0]["content"] not in seen:
                    seen.add(r["messages"][0]["content"])
                    kept.append(r)
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept[:n])
        (args.out / f"{split}.jsonl").write_text(lines, encoding="utf-8")
    print(f"wrote {args.out}: " + ", ".join(f"{s} {n}" for s, n in SIZES.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
