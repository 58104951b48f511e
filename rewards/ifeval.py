"""IFEval's instructions (Zhou et al., 2023, arXiv:2311.07911) by their ids, checked strict or loose.

A sample in IFEval's format carries `meta.instruction_id_list` (e.g. ["punctuation:no_comma"]) and
`meta.kwargs`, one dict per id as in IFEval's data (keys that are None are ignored, as IFEval's
own loader drops them). `check_instructions(text, ids, kwargs, loose)` says which are followed:

- strict: the response as it is (an empty response follows nothing);
- loose: also the response with its first line removed, its last line removed, both, and each of
  those four with every '*' removed; an instruction is followed if any non-empty variant passes.

Why a port and not lm-eval's `lm_eval.tasks.ifeval`: that module cannot run offline here. It
imports `langdetect` and `immutabledict` (not installed), downloads nltk's `punkt_tab` at import
(no network; its sentence counter then raises LookupError) and would put nltk data on every Ray
reward worker. So the checks below are written from IFEval's instruction descriptions and
google-research's `instruction_following_eval/instructions_test.py`, whose cases
`tests/rewards/test_ifeval.py` replays. Where this port departs from IFEval, on purpose:

- sentences are counted by a regex splitter (after . ! ? before whitespace, not after common
  abbreviations, initials or a list number), not nltk's punkt model; it agrees with IFEval's test
  cases but can differ by one on unusual punctuation;
- `change_case:english_capital` / `english_lowercase` check the case only, not langdetect's "is it
  English" (IFEval counts a detection failure as a pass; short answers often fail detection);
- keywords, keyword frequency and a generic postscript marker match as literal text (IFEval hands
  them to `re` unescaped; no id in its data has a regex metacharacter other than in "P.S.", which
  both treat alike).

Not supported (one clear error naming the id): language:response_language (needs langdetect),
change_case:capital_word_frequency (needs nltk's word tokenizer).
"""

from __future__ import annotations

import inspect
import json
import re
from typing import Any, Callable, Sequence

RELATIONS = ("less than", "at least")


def _compare(n: int, relation: str, threshold: int) -> bool:
    if relation == "less than":
        return n < threshold
    if relation == "at least":
        return n >= threshold
    raise ValueError(f"relation must be one of {RELATIONS}, got {relation!r}")


def count_words(text: str) -> int:
    """Runs of word characters, as IFEval counts words (a hyphenated word is two).

    >>> count_words("Hyphenated-word has two word counts.")
    6
    """
    return len(re.findall(r"\w+", text))


# Where a period does not end a sentence (punkt learns these; a short list covers answers' prose).
_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "e.g", "i.e", "inc", "ltd",
                  "co", "fig", "no", "u.s", "a.m", "p.m", "ph.d", "approx", "dept", "est", "jan", "feb", "aug",
                  "sept", "oct", "nov", "dec"}


def count_sentences(text: str) -> int:
    """Sentences: text up to . ! or ? before whitespace, plus any unterminated tail.

    >>> count_sentences("xx,x. xx,x! xx/x. x{x}x? x."), count_sentences("Dr. Who met J. Smith. Then left")
    (5, 2)
    """
    n, start = 0, 0
    for m in re.finditer(r"[.!?]+[\"'”’)\]]*(?=\s|$)", text):
        before = text[start:m.start()]
        words = before.split()
        word = words[-1].lstrip("(\"'“‘[").lower() if words else ""
        if m.group() == "." and (word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha())
                                 or (word.isdigit() and len(words) == 1)):
            continue  # "Dr.", an initial "J.", a list's "1."
        if before.strip():
            n += 1
        start = m.end()
    return n + bool(text[start:].strip())


def number_words(text: str, num_words: int, relation: str) -> bool:
    """Answer with less than / at least `num_words` words."""
    return _compare(count_words(text), relation, num_words)


def number_sentences(text: str, num_sentences: int, relation: str) -> bool:
    """Less than / at least `num_sentences` sentences."""
    return _compare(count_sentences(text), relation, num_sentences)


def number_paragraphs(text: str, num_paragraphs: int) -> bool:
    """Exactly `num_paragraphs` paragraphs separated by the markdown divider ***.

    >>> number_paragraphs("one\\n***\\ntwo\\n***\\n", 2), number_paragraphs("one\\n***\\n***\\ntwo", 2)
    (True, False)
    """
    parts = re.split(r"\s?\*\*\*\s?", text)
    inner = parts[1:-1]
    if any(not p.strip() for p in inner):
        return False  # an empty paragraph between two dividers
    return len([p for p in parts if p.strip()]) == num_paragraphs


def nth_paragraph_first_word(text: str, num_paragraphs: int, nth_paragraph: int, first_word: str) -> bool:
    """Exactly `num_paragraphs` paragraphs (split by blank lines), the nth starting with `first_word`."""
    paragraphs = text.split("\n\n")
    count = sum(1 for p in paragraphs if p.strip())
    if nth_paragraph > count or not paragraphs[nth_paragraph - 1].strip():
        return False
    word = paragraphs[nth_paragraph - 1].split()[0].lstrip("'").lstrip('"')
    word = re.split(r"[.,?!'\"]", word)[0].lower()
    return count == num_paragraphs and word == first_word.lower()


def keyword_existence(text: str, keywords: Sequence[str]) -> bool:
    """Every keyword appears (case-insensitive, inside words too: IFEval searches, it does not tokenize).

    >>> keyword_existence("The romantic river Seine", ["Romantic", "river"]), keyword_existence("x", ["y"])
    (True, False)
    """
    return all(re.search(re.escape(k), text, re.I) for k in keywords)


def forbidden_words(text: str, forbidden_words: Sequence[str]) -> bool:
    """None of the words appears as a whole word (case-insensitive)."""
    return not any(re.search(rf"\b{re.escape(w)}\b", text, re.I) for w in forbidden_words)


def keyword_frequency(text: str, keyword: str, frequency: int, relation: str) -> bool:
    """`keyword` appears less than / at least `frequency` times (case-insensitive)."""
    return _compare(len(re.findall(re.escape(keyword.strip()), text, re.I)), relation, frequency)


def letter_frequency(text: str, letter: str, let_frequency: int, let_relation: str) -> bool:
    """`letter` appears less than / at least `let_frequency` times (case-insensitive)."""
    return _compare(text.lower().count(letter.strip().lower()), let_relation, let_frequency)


def number_bullet_lists(text: str, num_bullets: int) -> bool:
    """Exactly `num_bullets` markdown bullet lines ("* " or "- "; a "**bold**" line is not one)."""
    n = 0
    for line in text.split("\n"):
        s = line.lstrip()
        n += s.startswith("-") or (len(s) > 1 and s[0] == "*" and s[1] != "*")
    return n == num_bullets


def constrained_response(text: str) -> bool:
    """Contains "My answer is yes.", "My answer is no." or "My answer is maybe."."""
    return any(o in text for o in ("My answer is yes.", "My answer is no.", "My answer is maybe."))


def number_highlighted_sections(text: str, num_highlights: int) -> bool:
    """At least `num_highlights` non-empty *highlighted* or **bold** spans, each within one line.

    >>> number_highlighted_sections("*one* and **two** and ** **", 2)
    True
    """
    single = [h for h in re.findall(r"\*[^\n*]*\*", text) if h.strip("*").strip()]
    double = [h for h in re.findall(r"\*\*[^\n*]*\*\*", text) if h[2:-2].strip()]
    return len(single) + len(double) >= num_highlights


def multiple_sections(text: str, section_spliter: str, num_sections: int) -> bool:
    """At least `num_sections` sections, each opened by `section_spliter` and a number ("Section 1")."""
    return len(re.split(rf"\s?{re.escape(section_spliter)}\s?\d+\s?", text)) - 1 >= num_sections


def json_format(text: str) -> bool:
    """The whole response parses as JSON, a ``` or ```json fence around it allowed."""
    body = text.strip()
    for fence in ("```json", "```Json", "```JSON", "```"):
        if body.startswith(fence):
            body = body[len(fence):]
            break
    body = body.removesuffix("```").strip()
    try:
        json.loads(body)
    except ValueError:
        return False
    return True


def title(text: str) -> bool:
    """A non-blank title in double angular brackets on one line, like <<poem of joy>>."""
    return any(t.strip("<>").strip() for t in re.findall(r"<<[^\n]+>>", text))


def postscript(text: str, postscript_marker: str) -> bool:
    """A postscript starting with `postscript_marker` ("P.S." also matches "p. s.")."""
    marker = postscript_marker.strip()
    if marker == "P.P.S":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif marker == "P.S.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + re.escape(marker.lower()) + r".*$"
    return re.search(pattern, text.lower(), re.M) is not None


def number_placeholders(text: str, num_placeholders: int) -> bool:
    """At least `num_placeholders` placeholders in square brackets, like [address]."""
    return len(re.findall(r"\[.*?\]", text)) >= num_placeholders


def english_capital(text: str) -> bool:
    """All letters capital (the "in English" half is not checked: see the module docstring)."""
    return text.isupper()


def english_lowercase(text: str) -> bool:
    """All letters lowercase (the "in English" half is not checked: see the module docstring)."""
    return text.islower()


def end_checker(text: str, end_phrase: str) -> bool:
    """Ends with `end_phrase` (case-insensitive; surrounding whitespace and quotes ignored)."""
    return text.strip().strip('"').lower().endswith(end_phrase.strip().lower())


def quotation(text: str) -> bool:
    """The whole response is wrapped in double quotation marks."""
    t = text.strip()
    return len(t) > 1 and t[0] == t[-1] == '"'


def no_comma(text: str) -> bool:
    """No commas at all."""
    return "," not in text


def repeat_prompt(text: str, prompt_to_repeat: str) -> bool:
    """Starts by repeating `prompt_to_repeat` word for word (case-insensitive)."""
    return text.strip().lower().startswith(prompt_to_repeat.strip().lower())


def two_responses(text: str) -> bool:
    """Two different responses separated by ******, and nothing else between dividers."""
    parts = text.split("******")
    if any(not p.strip() for p in parts[1:-1]):
        return False
    answers = [p.strip() for p in parts if p.strip()]
    return len(answers) == 2 and answers[0] != answers[1]


IFEVAL: dict[str, Callable[..., bool]] = {
    "length_constraints:number_words": number_words,
    "length_constraints:number_sentences": number_sentences,
    "length_constraints:number_paragraphs": number_paragraphs,
    "length_constraints:nth_paragraph_first_word": nth_paragraph_first_word,
    "keywords:existence": keyword_existence,
    "keywords:forbidden_words": forbidden_words,
    "keywords:frequency": keyword_frequency,
    "keywords:letter_frequency": letter_frequency,
    "detectable_format:number_bullet_lists": number_bullet_lists,
    "detectable_format:constrained_response": constrained_response,
    "detectable_format:number_highlighted_sections": number_highlighted_sections,
    "detectable_format:multiple_sections": multiple_sections,
    "detectable_format:json_format": json_format,
    "detectable_format:title": title,
    "detectable_content:postscript": postscript,
    "detectable_content:number_placeholders": number_placeholders,
    "change_case:english_capital": english_capital,
    "change_case:english_lowercase": english_lowercase,
    "startend:end_checker": end_checker,
    "startend:quotation": quotation,
    "punctuation:no_comma": no_comma,
    "combination:repeat_prompt": repeat_prompt,
    "combination:two_responses": two_responses,
}


def resolve(instruction_id: str, kwargs: dict[str, Any] | None) -> tuple[Callable[..., bool], dict[str, Any]]:
    """The checker for `instruction_id` and its kwargs (None values dropped); ValueError naming what is wrong.

    >>> resolve("language:response_language", {})
    Traceback (most recent call last):
    ...
    ValueError: unsupported IFEval instruction 'language:response_language'; supported: ...
    """
    fn = IFEVAL.get(instruction_id)
    if fn is None:
        raise ValueError(f"unsupported IFEval instruction {instruction_id!r}; supported: {', '.join(IFEVAL)}")
    kw = {k: v for k, v in (kwargs or {}).items() if v is not None}
    params = list(inspect.signature(fn).parameters)[1:]
    unknown = [k for k in kw if k not in params]
    missing = [p for p in params if p not in kw]
    if unknown or missing:
        what = f"unknown kwarg {unknown[0]!r}" if unknown else f"missing kwarg {missing[0]!r}"
        raise ValueError(f"{instruction_id}: {what}; it takes {', '.join(params) or 'none'}")
    for key in ("relation", "let_relation"):
        if key in kw and kw[key] not in RELATIONS:
            raise ValueError(f"{instruction_id}: {key} must be one of {RELATIONS}, got {kw[key]!r}")
    return fn, kw


def validate_instructions(instruction_ids: Sequence[str], kwargs: Sequence[dict[str, Any] | None] | None) -> None:
    """Raise one ValueError line if an id is unsupported, a kwarg wrong, or the two lists differ in length
    (for a data loader to call on each sample before training starts)."""
    if kwargs is not None and len(kwargs) != len(instruction_ids):
        raise ValueError(f"instruction_id_list has {len(instruction_ids)} ids but kwargs has {len(kwargs)} dicts")
    for i, iid in enumerate(instruction_ids):
        resolve(iid, kwargs[i] if kwargs is not None else None)


def response_variants(text: str, loose: bool) -> list[str]:
    """The responses an instruction is tried on: the response itself, or with `loose` IFEval's eight.

    >>> response_variants("Sure!\\n*hi*\\nBye", loose=True)[:5]
    ['Sure!\\n*hi*\\nBye', '*hi*\\nBye', 'Sure!\\n*hi*', '*hi*', 'Sure!\\nhi\\nBye']
    """
    if not loose:
        return [text]
    lines = text.split("\n")
    cut = [text, "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return cut + [v.replace("*", "") for v in cut]


def check_instructions(text: str, instruction_ids: Sequence[str], kwargs: Sequence[dict[str, Any] | None] | None,
                       loose: bool = False) -> list[bool]:
    """Whether `text` follows each instruction, strict or loose; ValueError (one line) on a bad id or kwargs.

    >>> ids = ["punctuation:no_comma", "startend:end_checker"]
    >>> check_instructions("Hi there. Any questions?", ids, [{}, {"end_phrase": "Any questions?"}])
    [True, True]
    >>> [check_instructions("Sure:\\nall in lower case", ["change_case:english_lowercase"], None, loose=loose)
    ...  for loose in (False, True)]
    [[False], [True]]
    """
    validate_instructions(instruction_ids, kwargs)
    variants = [v for v in response_variants(text, loose) if v.strip()]
    out = []
    for i, iid in enumerate(instruction_ids):
        fn, kw = resolve(iid, kwargs[i] if kwargs is not None else None)
        out.append(any(bool(fn(v, **kw)) for v in variants))
    return out
