"""Instruction-following data: prompts with random verifiable constraints, SFT targets, RM pairs.

`if_samples(n, seed)` attaches 1-3 compatible constraints (from `rewards.instruction.CHECKS`) to
base prompts and writes a templated reference answer that meets them all; `preference_pairs`
makes (chosen, rejected) answers where the rejected one breaks exactly the constraint it was built
against. References are templated prose, not good writing: a tiny model learns the *format* from
them, which is what the instruction reward scores. Every target is checked by the same checkers
the reward uses, so a generated record that violates its own constraints is never written.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from pipeline.context import atomic_write_text
from rewards.instruction import CHECKS, check_constraints

TOPICS = [
    "the ocean", "bread", "bicycles", "the moon", "rain", "libraries", "bees", "volcanoes", "chess",
    "trains", "coffee", "forests", "music", "bridges", "deserts", "clocks", "gardens", "maps",
    "snow", "kites", "rivers", "candles", "owls", "markets", "islands", "lighthouses", "tea", "stars",
]
ASKS = ["Write about {t}.", "Describe {t}.", "Tell me something about {t}.", "Explain why {t} matter to people.",
        "Give a short note on {t}."]
SENTENCES = [
    "{T} can be found in many places.", "People have known about {t} for a long time.",
    "Many stories mention {t} in some way.", "Some say {t} make a quiet day better.",
    "Children often ask questions about {t}.", "There is more to {t} than most people think.",
    "{T} change with the seasons of the year.", "A good book can teach a lot about {t}.",
    "Each part of {t} has its own small role.", "Some towns hold a yearly fair about {t}.",
    "Old pictures show {t} from another age.", "It is easy to learn the basics of {t}.",
]
KEYWORDS = ["history", "simple", "future", "careful", "bright", "shared", "local", "patient"]
FORBIDDEN = ["very", "really", "thing", "stuff", "basically", "literally"]  # never in the templates
START = ["In short,", "To begin,", "Here is my answer:", "Well,"]
END = ["Is there anything else I can help with?", "That is all.", "Thanks for reading."]
# At most one constraint per group: the rest combine freely (phrases and JSON do not mix).
GROUPS = {"all_uppercase": "case", "all_lowercase": "case", "json_format": "shape", "bullet_count": "shape",
          "paragraph_count": "shape", "word_count": "length", "sentence_count": "length",
          "start_with": "phrase_start", "end_with": "phrase_end"}
CLASHES = {("json_format", "start_with"), ("json_format", "end_with"), ("json_format", "sentence_count"),
           ("bullet_count", "sentence_count"), ("paragraph_count", "sentence_count")}


def sample_constraint(kind: str, rng: random.Random) -> dict[str, Any]:
    """Random kwargs for one constraint of type `kind`."""
    kw: dict[str, Any] = {}
    if kind == "word_count":
        kw = {"min": rng.choice([25, 40, 60])} if rng.random() < 0.5 else {"max": rng.choice([12, 20, 30])}
    elif kind == "sentence_count":
        n = rng.randint(2, 5)
        kw = {"min": n, "max": n}
    elif kind == "include_keywords":
        kw = {"keywords": rng.sample(KEYWORDS, rng.randint(1, 2))}
    elif kind == "forbid_keywords":
        kw = {"keywords": rng.sample(FORBIDDEN, rng.randint(1, 2))}
    elif kind in ("bullet_count", "paragraph_count"):
        kw = {"n": rng.randint(2, 4)}
    elif kind == "start_with":
        kw = {"phrase": rng.choice(START)}
    elif kind == "end_with":
        kw = {"phrase": rng.choice(END)}
    return {"type": kind, **kw}


def describe(c: dict[str, Any]) -> str:
    """The instruction a user would write for constraint `c`.

    >>> describe({"type": "word_count", "min": 40})
    'Answer in at least 40 words.'
    """
    t = c["type"]
    if t in ("word_count", "sentence_count"):
        unit = "words" if t == "word_count" else "sentences"
        if c.get("min") is not None and c.get("min") == c.get("max"):
            return f"Answer in exactly {c['min']} {unit}."
        return f"Answer in at least {c['min']} {unit}." if c.get("min") is not None else f"Answer in at most {c['max']} {unit}."
    return {
        "include_keywords": lambda: f"Include the words {', '.join(repr(k) for k in c['keywords'])}.",
        "forbid_keywords": lambda: f"Do not use the words {', '.join(repr(k) for k in c['keywords'])}.",
        "json_format": lambda: "Reply only with valid JSON.",
        "bullet_count": lambda: f"Use exactly {c['n']} bullet points starting with '* '.",
        "all_uppercase": lambda: "Write everything in capital letters.",
        "all_lowercase": lambda: "Write everything in lowercase letters.",
        "start_with": lambda: f"Start your answer with '{c['phrase']}'.",
        "end_with": lambda: f"End your answer with '{c['phrase']}'.",
        "paragraph_count": lambda: f"Write exactly {c['n']} paragraphs separated by blank lines.",
    }[t]()


def sample_constraints(rng: random.Random, k: int, types: Sequence[str] = tuple(CHECKS)) -> list[dict[str, Any]]:
    """`k` constraints of distinct, compatible types drawn from `types` (fewer if they run out)."""
    chosen: list[str] = []
    for kind in rng.sample(list(types), len(types)):
        group = GROUPS.get(kind, kind)
        if any(GROUPS.get(c, c) == group or (c, kind) in CLASHES or (kind, c) in CLASHES for c in chosen):
            continue
        chosen.append(kind)
        if len(chosen) == k:
            break
    return [sample_constraint(kind, rng) for kind in chosen]


def reference_answer(topic: str, constraints: Sequence[dict[str, Any]], seed: int) -> str | None:
    """A templated answer about `topic` meeting every constraint, or None if this recipe cannot."""
    by_type = {c["type"]: c for c in constraints}
    rng = random.Random(seed)
    pool = [s.format(t=topic, T=topic[0].upper() + topic[1:]) for s in rng.sample(SENTENCES, len(SENTENCES))]
    keywords = by_type.get("include_keywords", {}).get("keywords", [])
    if keywords:
        pool.insert(0, f"It is a {' and '.join(keywords)} subject.")

    def build(n: int) -> str:
        sents = [pool[i % len(pool)] for i in range(n)]
        if "json_format" in by_type:
            text = json.dumps({"topic": topic, "answer": " ".join(sents)})
        elif "bullet_count" in by_type:
            k = by_type["bullet_count"]["n"]
            text = "\n".join("* " + " ".join(sents[i::k]) for i in range(k))
        elif "paragraph_count" in by_type:
            k = by_type["paragraph_count"]["n"]
            text = "\n\n".join(" ".join(sents[i::k]) for i in range(k))
        else:
            text = " ".join(sents)
        if "start_with" in by_type:
            text = f"{by_type['start_with']['phrase']} {text}"
        if "end_with" in by_type:
            text = f"{text} {by_type['end_with']['phrase']}"
        if "all_uppercase" in by_type:
            text = text.upper()
        if "all_lowercase" in by_type:
            text = text.lower()
        return text

    min_n = max(by_type.get("bullet_count", {}).get("n", 1), by_type.get("paragraph_count", {}).get("n", 1))
    for n in range(min_n, 13):  # the fewest sentences that meet everything (length bounds included)
        text = build(n)
        if all(check_constraints(text, constraints)):
            return text
    return None


def _think(constraints: Sequence[dict[str, Any]]) -> str:
    return "<think>\nRules: " + " ".join(describe(c) for c in constraints) + "\n</think>\n"


def if_samples(n: int, seed: int = 0, k: tuple[int, int] = (1, 3), types: Sequence[str] = tuple(CHECKS),
               think: bool = True) -> list[dict[str, Any]]:
    """`n` instruction-following samples whose `completion` (the SFT target) meets their constraints.

    >>> s = if_samples(1, seed=3)[0]
    >>> sorted(s), s["domain"], all(check_constraints(s["completion"].split("</think>")[-1], s["meta"]["constraints"]))
    (['answer', 'completion', 'domain', 'id', 'messages', 'meta'], 'instruction', True)
    """
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    while len(out) < n:
        topic = rng.choice(TOPICS)
        constraints = sample_constraints(rng, rng.randint(*k), types)
        answer = reference_answer(topic, constraints, rng.randrange(2**31))
        if answer is None:
            continue  # an unlucky combination (e.g. at most 12 words but 4 bullets): draw again
        prompt = rng.choice(ASKS).format(t=topic) + " " + " ".join(describe(c) for c in constraints)
        out.append({
            "id": f"if-{seed}-{len(out)}",
            "domain": "instruction",
            "messages": [{"role": "user", "content": prompt}],
            "completion": (_think(constraints) if think else "") + answer,
            "answer": None,
            "meta": {"constraints": constraints, "topic": topic},
        })
    return out


def _violation(c: dict[str, Any], rng: random.Random) -> dict[str, Any] | None:
    """A constraint whose reference answer breaks `c` (None: just drop `c`)."""
    t = c["type"]
    if t == "all_uppercase":
        return {"type": "all_lowercase"}
    if t == "all_lowercase":
        return {"type": "all_uppercase"}
    if t == "word_count":
        return {"type": "word_count", "max": max(c["min"] // 3, 5)} if c.get("min") else {"type": "word_count", "min": c["max"] * 2}
    if t == "sentence_count":
        return {"type": "sentence_count", "min": c["min"] + 2, "max": c["min"] + 2}
    if t == "forbid_keywords":
        return {"type": "include_keywords", "keywords": c["keywords"]}
    if t in ("bullet_count", "paragraph_count"):
        return {"type": t, "n": c["n"] + rng.randint(1, 2)}
    return None


def preference_pairs(n: int, seed: int = 0, types: Sequence[str] = tuple(CHECKS),
                     k: tuple[int, int] = (1, 2)) -> list[dict[str, Any]]:
    """`n` pairs {"messages", "chosen", "rejected", "violated"}: same prompt, the rejected answer
    breaks the `violated` constraint (checked), the chosen one meets all.

    >>> p = preference_pairs(1, seed=1)[0]
    >>> c = p["constraints"]
    >>> all(check_constraints(p["chosen"], c)), all(check_constraints(p["rejected"], c))
    (True, False)
    """
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    while len(out) < n:
        topic = rng.choice(TOPICS)
        constraints = sample_constraints(rng, rng.randint(*k), types)
        text_seed = rng.randrange(2**31)
        chosen = reference_answer(topic, constraints, text_seed)
        i = rng.randrange(len(constraints))
        broken = _violation(constraints[i], rng)
        others = constraints[:i] + constraints[i + 1:]
        rejected = reference_answer(topic, others + ([broken] if broken else []), text_seed)
        if chosen is None or rejected is None or check_constraints(rejected, [constraints[i]]) != [False]:
            continue
        prompt = rng.choice(ASKS).format(t=topic) + " " + " ".join(describe(c) for c in constraints)
        out.append({"messages": [{"role": "user", "content": prompt}], "chosen": chosen, "rejected": rejected,
                    "violated": constraints[i]["type"], "constraints": constraints})
    return out


def write_jsonl(records: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write records one JSON object a line, atomically."""
    atomic_write_text(Path(path), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return Path(path)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def main(argv: Sequence[str] | None = None, write: Callable[..., Path] = write_jsonl) -> None:
    """`python -m rewards.if_data OUT.jsonl [--n N] [--seed S] [--pairs]`: write IF samples or RM pairs."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("out")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pairs", action="store_true", help="write chosen/rejected pairs instead of SFT samples")
    args = ap.parse_args(argv)
    records = preference_pairs(args.n, args.seed) if args.pairs else if_samples(args.n, args.seed)
    write(records, args.out)


if __name__ == "__main__":
    main()
