"""Write the quickstart datasets from the project's own word lists and sentence patterns.

    python data/make_quickstart_data.py            # writes data/finance_news/ and data/support_summaries/

Deterministic: the same seed gives byte-identical files on every machine (Python's `random.Random`
with an integer seed). No row is copied from any external dataset.

- finance_news/{train,validation,test}.jsonl: `headline`, `label` (negative / neutral / positive),
  600 / 100 / 100 rows. The label follows from what the headline says happened (results up or
  down, a contract won, jobs cut, a date announced), so a model can learn it.
- support_summaries/{train,validation,test}.jsonl: `text` (a short customer-support conversation),
  `summary` (who had which problem with which order, and what the agent did), 300 / 50 / 50 rows.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 20240611

# ------------------------------------------------------------------------------------- word lists

COMPANIES = [
    "Northwind Bank", "Keller Logistics", "Aurora Foods", "Brightline Energy", "Cobalt Mining", "Delta Paper",
    "Evergreen Retail", "Fjord Shipping", "Granite Insurance", "Harbor Telecom", "Ironwood Steel", "Juniper Pharma",
    "Kestrel Airlines", "Lumen Software", "Meridian Chemicals", "Nordic Timber", "Orion Motors", "Pinecrest Hotels",
    "Quarry Cement", "Redwood Media", "Silverline Rail", "Tidewater Utilities", "Upland Dairy", "Vantage Semiconductors",
    "Westfield Textiles", "Yarrow Biotech", "Zenith Machinery", "Alder Packaging", "Baltic Brewing", "Cascade Water",
]
METRICS = ["net sales", "operating profit", "revenue", "quarterly profit", "order intake", "net income",
           "comparable sales", "operating margin"]
PERIODS = ["the first quarter", "the second quarter", "the third quarter", "the fourth quarter", "the first half",
           "the full year", "January-March", "April-June", "July-September", "October-December"]
CITIES = ["Helsinki", "Tallinn", "Stockholm", "Oslo", "Riga", "Gdansk", "Hamburg", "Rotterdam", "Lyon", "Turin",
          "Leeds", "Porto"]
ROLES = ["chief financial officer", "chief executive", "head of sales", "board chair", "head of research",
         "chief operating officer"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]
PRODUCTS = ["packaging line", "software platform", "cargo vessel", "wind farm", "logistics centre", "data centre",
            "paper machine", "rail depot"]

POSITIVE = [
    "{company} {metric} rises {pct}% in {period}",
    "{company} beats forecasts as {metric} climbs {pct}%",
    "{company} raises full-year outlook after strong {period}",
    "{company} wins EUR {amount}m order for a new {product}",
    "{company} shares jump after record {metric} in {period}",
    "{company} swings to a profit in {period}",
    "{company} {metric} up {pct}% on higher demand in {city}",
    "{company} lifts dividend as {metric} grows {pct}%",
]
NEGATIVE = [
    "{company} {metric} falls {pct}% in {period}",
    "{company} misses forecasts as {metric} drops {pct}%",
    "{company} cuts {jobs} jobs at its {city} plant amid weak demand",
    "{company} issues profit warning for {period}",
    "{company} shares slump after {metric} declines {pct}%",
    "{company} swings to a loss in {period}",
    "{company} {metric} down {pct}% as costs rise",
    "{company} suspends dividend after weak {period}",
]
NEUTRAL = [
    "{company} to publish {period} results on {weekday}",
    "{company} appoints new {role}",
    "{company} opens a sales office in {city}",
    "{company} holds annual general meeting in {city} on {weekday}",
    "{company} {metric} unchanged at EUR {amount}m in {period}",
    "{company} completes move of its headquarters to {city}",
    "{company} names {city} site manager",
    "{company} says {period} report will be released on {weekday}",
]

NAMES = ["Anna", "Ben", "Carla", "David", "Elif", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kai", "Lena", "Marco",
         "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tara", "Umar", "Vera", "Wei", "Yusuf", "Zoe"]
ITEMS = ["blender", "laptop bag", "pair of running shoes", "desk lamp", "coffee grinder", "winter jacket",
         "bluetooth speaker", "set of kitchen knives", "yoga mat", "phone case", "office chair", "backpack"]

# issue: (what the customer says, summary phrase, [(agent action line, summary of action)], open item or None)
ISSUES = [
    ("damaged", "my {item} arrived damaged, the box was crushed", "a damaged {item}",
     [("I'm sorry about that. I've issued a full refund to your card; it should show within 5 days.",
       "issued a full refund"),
      ("I'm sorry about that. I've shipped a replacement {item} today at no cost.", "shipped a free replacement")]),
    ("late", "my {item} still hasn't arrived and it's a week late", "a late delivery of a {item}",
     [("I checked with the courier: it is at the local depot and will be delivered tomorrow.",
       "confirmed delivery for the next day"),
      ("The parcel was lost by the courier, so I've sent a new {item} by express shipping.",
       "sent a new one by express shipping")]),
    ("charged", "I was charged twice for my {item}", "a double charge for a {item}",
     [("I see the duplicate payment. I've refunded the second charge; it takes 3 to 5 days.",
       "refunded the duplicate charge"),
      ("I've passed this to our billing team, who will refund the extra charge within 48 hours.",
       "escalated the refund to the billing team")]),
    ("wrong", "I received the wrong {item}, it's not the one I ordered", "receiving the wrong {item}",
     [("I've emailed you a free return label and the right {item} is on its way.",
       "sent a return label and shipped the right item"),
      ("Please keep the wrong one; I've refunded the order in full.", "refunded the order and let them keep the item")]),
    ("cancel", "I'd like to cancel my order for the {item} before it ships", "cancelling an order for a {item}",
     [("Done: the order is cancelled and you won't be charged.", "cancelled the order before it shipped"),
      ("It has already shipped, so I can't cancel it, but you can return it for free once it arrives.",
       "explained it had shipped and offered a free return")]),
]
OPENERS = ["Hi, {name} here.", "Hello, this is {name}.", "Hi there, my name is {name}.", "Good morning, {name} speaking."]
GREETINGS = ["Thanks for contacting support. How can I help?", "Hello {name}, how can I help you today?",
             "Hi {name}, thanks for reaching out. What happened?"]
ASKS = ["Could you give me your order number?", "Can I have the order number, please?",
        "Which order is this about? The order number would help."]
THANKS = ["Great, thank you!", "Thanks, that works for me.", "Perfect, thanks for the quick help.",
          "OK, thank you."]
CLOSINGS = ["You're welcome. Have a nice day!", "Happy to help. Is there anything else?",
            "Glad I could help. Take care!"]


# ------------------------------------------------------------------------------------- generators


def headline(rng: random.Random, label: str) -> str:
    pattern = rng.choice({"positive": POSITIVE, "negative": NEGATIVE, "neutral": NEUTRAL}[label])
    text = pattern.format(
        company=rng.choice(COMPANIES), metric=rng.choice(METRICS), period=rng.choice(PERIODS),
        pct=rng.choice([rng.randint(2, 35), round(rng.uniform(1, 30), 1)]), amount=rng.randint(5, 900),
        product=rng.choice(PRODUCTS), city=rng.choice(CITIES), jobs=rng.choice([40, 60, 85, 120, 200, 350, 500]),
        role=rng.choice(ROLES), weekday=rng.choice(WEEKDAYS),
    )
    return text[0].upper() + text[1:]


def finance_rows(rng: random.Random, n: int) -> list[dict]:
    labels = ["negative", "neutral", "positive"]
    rows, seen = [], set()
    while len(rows) < n:
        label = labels[len(rows) % 3]  # balanced classes
        text = headline(rng, label)
        if text not in seen:  # unique headlines: no pair can sit in two splits
            seen.add(text)
            rows.append({"headline": text, "label": label})
    rng.shuffle(rows)
    return rows


def conversation(rng: random.Random) -> dict:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    order = f"{rng.randint(100000, 999999)}"
    _, complaint, issue, actions = rng.choice(ISSUES)
    action, done = rng.choice(actions)
    complaint = complaint.format(item=item)
    lines = [
        f"Customer: {rng.choice(OPENERS).format(name=name)} {complaint[0].upper() + complaint[1:]}.",
        f"Agent: {rng.choice(GREETINGS).format(name=name)} {rng.choice(ASKS)}",
        f"Customer: Sure, it's order {order}.",
        f"Agent: Thank you. {action.format(item=item)}",
        f"Customer: {rng.choice(THANKS)}",
        f"Agent: {rng.choice(CLOSINGS)}",
    ]
    summary = f"{name} contacted support about {issue.format(item=item)} (order {order}). The agent {done}."
    return {"text": "\n".join(lines), "summary": summary}


def support_rows(rng: random.Random, n: int) -> list[dict]:
    rows, seen = [], set()
    while len(rows) < n:
        row = conversation(rng)
        if row["text"] not in seen:
            seen.add(row["text"])
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------------- writing


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Temp file + rename: a reader never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_splits(folder: Path, rows: list[dict], sizes: tuple[int, int, int]) -> None:
    start = 0
    for split, size in zip(("train", "validation", "test"), sizes):
        write_jsonl(folder / f"{split}.jsonl", rows[start:start + size])
        start += size


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="folder to write into (default: data/)")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    finance = (600, 100, 100)
    write_splits(args.out / "finance_news", finance_rows(random.Random(args.seed), sum(finance)), finance)
    support = (300, 50, 50)
    write_splits(args.out / "support_summaries", support_rows(random.Random(args.seed + 1), sum(support)), support)
    print(f"wrote {args.out / 'finance_news'} ({'/'.join(map(str, finance))}) and "
          f"{args.out / 'support_summaries'} ({'/'.join(map(str, support))})")


if __name__ == "__main__":
    main()
