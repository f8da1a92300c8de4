"""A small instruction task with verifiable answers, written here from a fixed seed (no downloads).

    python tools/make_task_data.py [--out data/task] [--train 4000] [--heldout 250] [--seed 1234]

Five families of user requests, each with one short correct reply (the assistant turn):

    date          "Write 5 March 2021 in YYYY-MM-DD format. ..."                -> 2021-03-05
    units         "Convert 4.75 km to m. ..."                                   -> 4750
    number_words  "Write two thousand and fourteen in digits. ..."              -> 2014
    addition      "Maya had 38 stamps and was given 47 more. How many ..."      -> 85
    json          "Extract the name, age and city ... as JSON ...: Ana ..."     -> {"name": "Ana Silva", "age": 34, "city": "Lisbon"}

Files (JSONL, one chat example a line, the layout `lorasp_edge.train.data.PackedStream` reads; `family`
and `answer` ride along for scoring):

    {"family": "units", "answer": "4750",
     "messages": [{"role": "user", "content": "Convert 4.75 km to m. ..."}, {"role": "assistant", "content": "4750"}]}

`train.jsonl` and `heldout.jsonl` share no user prompt. Families are interleaved in a fixed
random order. The files are rebuilt bit for bit from the seed, so they are not committed (`/data/`
is git-ignored).

Scoring (`exact_match`): the reply, stripped of surrounding white space, equals the answer; for
`json` the reply must parse as a JSON object equal to the answer's (key order and spacing free).
`answer_found` is a looser diagnostic: the answer appears anywhere in the reply (numbers not inside
a longer number), which separates "knows the answer" from "uses the requested format".
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

from lorasp_edge.files import write_text_atomic

FAMILIES = ("date", "units", "number_words", "addition", "json")

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"]
DAYS_IN_MONTH = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]  # February: the generator never draws the 29th

# unit, target unit, factor: every conversion multiplies by a power of ten, so answers are exact integers.
CONVERSIONS = [("km", "m", 1000), ("kg", "g", 1000), ("L", "mL", 1000), ("m", "cm", 100), ("cm", "mm", 10)]

ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
        "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]

FIRST_NAMES = ["Ana", "Ben", "Chloe", "David", "Elena", "Farid", "Grace", "Hugo", "Irene", "Jonas", "Keiko", "Liam",
               "Maya", "Nikolai", "Olivia", "Pedro", "Quinn", "Rosa", "Samir", "Tara", "Umar", "Vera", "Wei", "Yara"]
LAST_NAMES = ["Silva", "Okafor", "Novak", "Larsen", "Moreau", "Tanaka", "Fischer", "Rossi", "Khan", "Jensen",
              "Costa", "Becker", "Ivanova", "Murphy", "Santos", "Weber", "Haddad", "Nguyen", "Kowalski", "Berg"]
CITIES = ["Lisbon", "Denver", "Osaka", "Nairobi", "Krakow", "Toronto", "Lyon", "Porto", "Austin", "Bergen",
          "Seville", "Leeds", "Perth", "Dublin", "Quito", "Tallinn", "Adelaide", "Munich", "Cork", "Valencia"]
ITEMS = ["stamps", "marbles", "apples", "books", "coins", "shells", "pencils", "stickers", "cards", "buttons"]


def number_words(n: int) -> str:
    """English words for 0 <= n < 10000, British style ("two hundred and five")."""
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("-" + ONES[n % 10] if n % 10 else "")
    if n < 1000:
        rest = n % 100
        return ONES[n // 100] + " hundred" + (" and " + number_words(rest) if rest else "")
    rest = n % 1000
    joiner = " and " if 0 < rest < 100 else " "
    return ONES[n // 1000] + " thousand" + (joiner + number_words(rest) if rest else "")


def ordinal(day: int) -> str:
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def make_date(rng: random.Random) -> tuple[str, str]:
    year, month = rng.randint(1950, 2049), rng.randint(1, 12)
    day = rng.randint(1, DAYS_IN_MONTH[month - 1])
    name = MONTHS[month - 1]
    written = rng.choice([f"{name} {day}, {year}", f"{day} {name} {year}", f"the {ordinal(day)} of {name} {year}", f"{name[:3]} {day} {year}"])
    prompt = f"Write {written} in YYYY-MM-DD format. Reply with the date only."
    return prompt, f"{year:04d}-{month:02d}-{day:02d}"


def make_units(rng: random.Random) -> tuple[str, str]:
    unit, target, factor = rng.choice(CONVERSIONS)
    decimals = rng.randint(0, len(str(factor)) - 1)  # at most as many decimals as the factor has zeros
    scaled = rng.randint(1, 99 * 10**decimals)  # the value times 10^decimals, so the answer is an integer
    value = f"{scaled / 10**decimals:.{decimals}f}"
    prompt = f"Convert {value} {unit} to {target}. Reply with the number only."
    return prompt, str(scaled * factor // 10**decimals)


def make_number_words(rng: random.Random) -> tuple[str, str]:
    n = rng.choice([rng.randint(0, 99), rng.randint(100, 999), rng.randint(1000, 9999)])
    prompt = f"Write {number_words(n)} in digits. Reply with the number only."
    return prompt, str(n)


def make_addition(rng: random.Random) -> tuple[str, str]:
    name, item = rng.choice(FIRST_NAMES), rng.choice(ITEMS)
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    story = rng.choice([
        f"{name} had {a} {item} and was given {b} more.",
        f"{name} collected {a} {item} on Monday and {b} {item} on Tuesday.",
        f"A box holds {a} {item} and a bag holds {b} {item}. {name} puts them all together.",
    ])
    prompt = f"{story} How many {item} does {name} have now? Reply with the number only."
    return prompt, str(a + b)


def make_json(rng: random.Random) -> tuple[str, str]:
    name = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
    age, city = rng.randint(18, 90), rng.choice(CITIES)
    text = rng.choice([
        f"{name}, {age}, lives in {city}.",
        f"Our new member is {name} from {city}, aged {age}.",
        f"{city} resident {name} turned {age} this year.",
        f"Meet {name}: {age} years old, based in {city}.",
    ])
    prompt = f'Extract the name, age and city as JSON with keys "name", "age", "city": {text}'
    return prompt, json.dumps({"name": name, "age": age, "city": city})


MAKERS = {"date": make_date, "units": make_units, "number_words": make_number_words, "addition": make_addition, "json": make_json}


def example(family: str, prompt: str, answer: str) -> dict:
    return {
        "family": family,
        "answer": answer,
        "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
    }


def make_examples(train: int, heldout: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, heldout): families in equal shares and shuffled; no user prompt appears in both,
    and none twice within the held-out split."""
    rng = random.Random(seed)
    heldout_examples, seen = [], set()
    for index in range(heldout):
        family = FAMILIES[index % len(FAMILIES)]
        while (drawn := MAKERS[family](rng))[0] in seen:
            pass
        seen.add(drawn[0])
        heldout_examples.append(example(family, *drawn))
    train_examples = []
    for index in range(train):
        family = FAMILIES[index % len(FAMILIES)]
        while (drawn := MAKERS[family](rng))[0] in seen:
            pass
        train_examples.append(example(family, *drawn))
    rng.shuffle(heldout_examples)
    rng.shuffle(train_examples)
    return train_examples, heldout_examples


def write_jsonl(path: Path, examples: list[dict]) -> Path:
    """One JSON object a line, written to a temp file and renamed (never a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(json.dumps(record) + "\n" for record in examples))
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_task(out: str | Path, train: int = 4000, heldout: int = 250, seed: int = 1234) -> dict[str, Path]:
    out = Path(out)
    train_examples, heldout_examples = make_examples(train, heldout, seed)
    return {"train": write_jsonl(out / "train.jsonl", train_examples), "heldout": write_jsonl(out / "heldout.jsonl", heldout_examples)}


# ------------------------------------------------------------------------------------ scoring


def exact_match(family: str, reply: str, answer: str) -> bool:
    reply = reply.strip()
    if family == "json":
        try:
            return json.loads(reply) == json.loads(answer)
        except json.JSONDecodeError:
            return False
    return reply == answer


def answer_found(family: str, reply: str, answer: str) -> bool:
    if exact_match(family, reply, answer):
        return True
    if family == "json":
        expected = json.loads(answer)
        return all(str(value) in reply for value in expected.values())
    return re.search(rf"(?<![\d.]){re.escape(answer)}(?![\d]|\.\d)", reply.replace(",", "")) is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/task"), help="folder for train.jsonl and heldout.jsonl")
    parser.add_argument("--train", type=int, default=4000, help="training examples")
    parser.add_argument("--heldout", type=int, default=250, help="held-out examples")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    paths = write_task(args.out, args.train, args.heldout, args.seed)
    for split, path in paths.items():
        print(f"{split}: {path} ({len(read_jsonl(path))} examples)")


if __name__ == "__main__":
    main()
