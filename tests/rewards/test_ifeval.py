"""IFEval's instructions are checked as IFEval checks them, strict and loose, on IFEval's own test cases.

The responses and expectations below are google-research's `instruction_following_eval/
instructions_test.py` and `instructions_util_test.py` (its cases, not its code), plus a case of our
own for the one id its tests leave out (json_format).
"""

import doctest

import pytest

import rewards.ifeval
from rewards.ifeval import IFEVAL, check_instructions, count_sentences, count_words, validate_instructions
from rewards.instruction import InstructionReward

LT, AL = "less than", "at least"

BULLETS_1 = """
  A Markdown bullet point is a way of formatting text to create a list. To
  create a bullet point, start each line with an asterisk (*). For example:
  * This is a bullet point.
  *(no space required)Another bullet point.
  * (no newline ending required)Another bullet point.
  markdown bullet points are often used to create to-do lists or to list items
  in a step-by-step guide."""
BULLETS_2 = """
  Check that inline asterisk (*), *, will not be counted. Only * that starts a
  bullet list will be counted:
    * This is a bullet point.
    * Another bullet point.
    . dot is not counted"""
BULLETS_3 = """
  Here are three bullets starting with asterisk:
  * I am a large language model, also known as a conversational AI.
  * I am trained on a massive amount of text data, and I am able to communicate.
  * I am still under development, but I am learning new things every day."""
BULLETS_4 = """
  Here are three markdown bullets:
  - I am a large language model, also known as a conversational AI.
  - I am trained on a massive amount of text data, and I am able to communicate.
  -I am still under development, but I am learning new things every day."""
BULLETS_5 = """
  Paragraph 1
  ***
  Paragraph 2
  ***
  Paragraph 3
  * only one bullet point
  """
HIGHLIGHT_1 = """
  To highlight text with Markdown, you can use the * character before and after
  the text you want to highlight. For example, if you want to highlight the
  word `hello`, you would type:*hello*, You can also use the ** character to
  create bold text. For example, if you want to bold the word `hello`, you
  would type: **hello** """
HIGHLIGHT_2 = """
  Sure, here are the numerical methods for solving partial differential
  equations highlighted with Markdown:
  *Finite difference methods
  *Finite element methods*
  *Boundary element methods
  *Monte Carlo methods
  I hope this helps!"""
HIGHLIGHT_3 = """
  There is allowed to be *two different* highlighted *sections in the same*
  line. **This is also true** for **double markdown highlights.**
  """
SECTION_1 = """
  Your response must have multiple sections. Mark the beginning of each section
  with "Section X", such as:
  Section 1
  [content of section 1]
  Section 2
  [content of section 2]"""
SECTION_2 = """SECTION 1
  [content of section 1]
  SECTION 2
  [content of section 2]"""
PARAGRAPHS_1 = """
  paragraph 1
  ***
  paragraph 2
  ***
  paragraph 3"""
PARAGRAPHS_2 = """
          ***
  paragraph 1
          ***
      paragraph 2
          ***
      paragraph 3"""
PARAGRAPHS_3 = """
  paragraph 1
          ***
      paragraph 2
          ***
      paragraph 3
          ***"""
PARAGRAPHS_4 = """
  paragraph 1
          ***
      paragraph 2
          ***
          ***"""
PS_1 = """
  I will do my best to follow your instructions and always start my responses
  with "My response is:". I will try to be as consistent as possible, but
  please be patient with me if I make a mistake. I am still under development,
  and I am always learning new things.

  P.S. I hope this is what you were looking for."""
PS_2 = """
  Sure, here is my response with a postscript starting with P.P.S.:

  My response is: I hope this answers your question.

  P.P.S. I am always happy to answer any other questions you may have.

  Do you have any other questions for me?"""
PS_3 = """
  The radius of a unit circle is 1. However, I can give you a funny and wrong
  answer: the radius of a unit circle is 0. This is because a unit circle is a
  circle with a radius of 1, and if the radius is 0, then the circle has no
  size and is just a point. (not starting a new line) P.S. I hope you enjoyed
  my joke!"""
PS_4 = """
  If the length of a square is one, the area of the square will also be one.
  p.p.s what if the entire response was lower case letters?
  """
PS_5 = """
  The mysteries of space and time are mysterious.
  P. S. Sometimes there are even spaces between P. and S..
  """
KEYWORDS_1 = """
  Paris is a city of beauty and romance. The romantic river Seine winds its way
  through the city, past iconic landmarks like the Eiffel Tower and the Louvre
  Museum, where the Mona Lisa resides. Whether you're taking a boat cruise down
  the river or simply strolling along the banks, you're sure to be captivated
  by the city's charm."""
KEYWORDS_2 = """
  Paris is a city of beauty, romance, and history. It is home to some of the
  most iconic landmarks in the world, including the Eiffel Tower, the Louvre
  Museum, and the Notre Dame Cathedral. The city is also known for its romantic
  river cruises, its delicious food, and its stylish people.
  """
FREQUENCY_1 = """
  keyword, Keyword, KEYWORD
  """
FREQUENCY_2 = """
    *keyword
    *Keyword
    *KEYWORD
  """
WORDS_1 = """
  d3sCRi7 lArge lAnguagE M0del w1tH 20 w0RdS."""
WORDS_2 = """
  L4RGE L4NGU4GE M0DEL: AI syst3m th4t und3rstands, g3n3r4tes, or tr4nsforms
  l4ngu4g3 b4s3d on pr3vious l3arning & d4t4."""
FIRST_WORD_1 = """
  paragraph 1

  I paragraph 2

  paragraph 3"""
FIRST_WORD_2 = """
  paragraph 1

  I paragraph 2"""
FIRST_WORD_3 = """
  paragraph 1

  fail paragraph 2

  paragraph 3"""
FIRST_WORD_4 = """
  Wow this is a very long response.

  I can't believe there is more than three paragraphs.

  Really more than three? No way!

  I can't believe it but I guess I am living proof.

  Haha, you go that right."""
FIRST_WORD_5 = """
  Wow this is a very long response.

  I can't believe there is more than three paragraphs.

  "Really?! more than three? No way!"

  I can't believe it but I guess I am living proof.

  Haha, you go that right."""
FIRST_WORD_6 = """
  Wow this is a very long response.

  I can't believe there is more than three paragraphs.

  Rea!lly more than three? No way!

  I can't believe it but I guess I am living proof.

  Haha, you go that right."""
FORBIDDEN_1 = """
  The Nazis came to power in 1933 through a combination of legal and illegal
  means. Hitler was appointed chancellor by President Paul von Hindenburg, and
  the Nazis quickly consolidated their power by passing a series of laws that
  restricted the rights of opposition parties and individuals. By 1934, Hitler
  had become dictator of Germany.
  """
FORBIDDEN_2 = """
  Dinosaurs were a diverse group of reptiles that dominated the Earth for over
  160 million years. They came in all shapes and sizes, from the tiny
  Compsognathus to the massive Argentinosaurus. Dinosaurs were the most
  successful land animals on Earth until they went extinct about 66 million
  years ago. The exact cause of their extinction is still unknown, but it
  is thought to have been a combination of factors, including an asteroid
  impact and climate change.
  """
FORBIDDEN_3 = """
  GPT, or Generative Pre-trained Transformer, is a family of neural network
  models that uses the transformer architecture. GPT models are trained on a
  massive dataset of text and code, and can be used for a variety of tasks,
  including text generation, translation, and question answering. GPT models
  have been shown to be very effective at these tasks, and are being used by
  a variety of companies and organizations like Google.
  """
TWO_1 = """
  This is response 1.
  ******
  This is response 2.
  """
TWO_2 = """
  This is response 1.
  ******
  This is response 1.
  """
TWO_3 = """
  This is response 1.
  ******
  This is response 2.
  ******
  This is response 3.
  """
TWO_4 = """
  ******
  Response 1.
  ******
  ******
  Response 2.
  ******
  """
TWO_5 = """
  ******
  Response 1
  ******
  Response 2
  ******
  """
REPEAT_1 = """Write a CL description. Hi, Le and TJ, please
  check this out. Thanks.
  """
REPEAT_2 = """Hi, Le and TJ. Write a CL description. Thanks.
  """

# (instruction id, kwargs, response, followed?) -- IFEval's own expectations.
CASES = [
    ("length_constraints:number_sentences", {"num_sentences": 4, "relation": LT}, "xx,x. xx,x! xx/x. x{x}x?", False),
    ("length_constraints:number_sentences", {"num_sentences": 5, "relation": LT}, "xxxx. xx,x! xxxx. x(x)x?", True),
    ("length_constraints:number_sentences", {"num_sentences": 4, "relation": AL}, "xxxx. xx,x! xx|x. x&x x?", True),
    ("length_constraints:number_sentences", {"num_sentences": 5, "relation": AL}, "xx-x. xx,x! xx}x. x,xx?", False),
    ("detectable_content:number_placeholders", {"num_placeholders": 5},
     "Sure, here is a short template with 5 placeholders:\n[Name]\n[Email]\n[Phone]\n[Address]\n[Website]\n"
     "This template can be used for a variety of purposes, such ascreating a contact list, sending out surveys, "
     "or creating a sign-up form.", True),
    ("detectable_content:number_placeholders", {"num_placeholders": 7},
     "My [adjective] [noun] is [adjective] [noun]. I [verb] and [verb].", False),
    ("detectable_format:number_bullet_lists", {"num_bullets": 3}, BULLETS_1, True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, BULLETS_2, True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 3}, BULLETS_3, True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 3}, BULLETS_4, True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 1}, BULLETS_5, True),
    ("detectable_format:constrained_response", {}, "\n My answer is no.\n", True),
    ("detectable_format:constrained_response", {}, "My answer is no.   ", True),
    ("detectable_format:constrained_response", {}, "\n  My answer is no. I am still under development.", True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, HIGHLIGHT_1, True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, HIGHLIGHT_2, False),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 4}, HIGHLIGHT_3, True),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 3}, SECTION_1, False),
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2}, SECTION_2, True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 3}, PARAGRAPHS_1, True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 3}, PARAGRAPHS_2, True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 3}, PARAGRAPHS_3, True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, PARAGRAPHS_4, False),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, PS_1, True),
    ("detectable_content:postscript", {"postscript_marker": "PS:"}, PS_1, False),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, PS_2, True),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, PS_3, True),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, PS_4, True),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, PS_5, True),
    ("keywords:existence", {"keywords": ["romantic", "river", "Mona Lisa"]}, KEYWORDS_1, True),
    ("keywords:existence", {"keywords": ["romantic", "river", "Mona Lisa"]}, KEYWORDS_2, False),
    ("keywords:frequency", {"keyword": "  keyword ", "frequency": 4, "relation": LT}, FREQUENCY_1, True),
    ("keywords:frequency", {"keyword": "  keyword ", "frequency": 3, "relation": AL}, FREQUENCY_1, True),
    ("keywords:frequency", {"keyword": "KEYWORD", "frequency": 4, "relation": AL}, FREQUENCY_2, False),
    ("length_constraints:number_words", {"num_words": 8, "relation": LT}, WORDS_1, True),
    ("length_constraints:number_words", {"num_words": 16, "relation": LT}, WORDS_2, False),
    ("length_constraints:number_words", {"num_words": 16, "relation": AL}, WORDS_2, True),
    *[("length_constraints:nth_paragraph_first_word", kw, text, ok) for kw, text, ok in [
        ({"num_paragraphs": 3, "nth_paragraph": 2, "first_word": "I"}, FIRST_WORD_1, True),
        ({"num_paragraphs": 3, "nth_paragraph": 2, "first_word": "I"}, FIRST_WORD_2, False),
        ({"num_paragraphs": 3, "nth_paragraph": 2, "first_word": "I"}, FIRST_WORD_3, False),
        ({"num_paragraphs": 5, "nth_paragraph": 5, "first_word": "haha"}, FIRST_WORD_4, True),
        ({"num_paragraphs": 5, "nth_paragraph": 3, "first_word": "Really"}, FIRST_WORD_5, True),
        ({"num_paragraphs": 5, "nth_paragraph": 3, "first_word": "Really"}, FIRST_WORD_6, False)]],
    *[("keywords:forbidden_words", {"forbidden_words": words}, text, ok) for words, text, ok in [
        (["HOUSE", "POWER", "BECOME"], FORBIDDEN_1, False), (["HOUSE", "POWER", "BECOME"], FORBIDDEN_2, True),
        (["HOUSE", "POWER", "BECOME"], FORBIDDEN_3, True), (["GOOGLE", "TEXT"], FORBIDDEN_1, True),
        (["GOOGLE", "TEXT"], FORBIDDEN_2, True), (["GOOGLE", "TEXT"], FORBIDDEN_3, False),
        (["GENE", "TRANSFORM"], FORBIDDEN_3, True)]],
    ("combination:two_responses", {}, TWO_1, True),
    ("combination:two_responses", {}, TWO_2, False),
    ("combination:two_responses", {}, TWO_3, False),
    ("combination:two_responses", {}, TWO_4, False),
    ("combination:two_responses", {}, TWO_5, True),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a CL description."}, REPEAT_1, True),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a CL description."}, REPEAT_2, False),
    ("startend:end_checker", {"end_phrase": "\n  Any more questions?\n  "},
     "\n  The answer is 7. Any more questions?\n  ", True),
    ("startend:end_checker", {"end_phrase": "\n  This is the end.\n  "},
     "\n  At the end of this prompt I am required to say that this is the end.\n  ", True),
    ("startend:end_checker", {"end_phrase": "\n  This will fail.\n  "}, "\n  This will fail. Paris is cool.\n  ", False),
    ("detectable_format:title", {}, "\n  <<Song of Joy>>\n  La la la. Happy song.\n  ", True),
    ("detectable_format:title", {}, "\n  Is it fine for title to be at the end?\n  <<This is the title>>\n  ", True),
    ("detectable_format:title", {}, "\n  << >>\n  There is no title.\n  ", False),
    ("detectable_format:title", {}, "\n  <<This is not a title.\n  This is a paragraph.>>\n  ", False),
    ("keywords:letter_frequency", {"letter": "T", "let_frequency": 4, "let_relation": AL},
     "\n  There is the T. Four T's.\n  ", True),
    ("keywords:letter_frequency", {"letter": "a", "let_frequency": 4, "let_relation": LT}, "\n  asdfghjkl!!aA\n  ", True),
    ("keywords:letter_frequency", {"letter": "p", "let_frequency": 4, "let_relation": AL}, "\n  asdfghjkl!!aA\n  ", False),
    ("change_case:english_capital", {},
     "\n  THIS IS AN ENGLISH SENTENCE. EVERY LETTER IS CAPITALIZED!!! AMAZING.\n  ", True),
    ("change_case:english_capital", {}, "\n  Every Word Is Capitalized.\n  ", False),
    ("change_case:english_lowercase", {}, "\n  every letter is lowercase.\n  ", True),
    ("change_case:english_lowercase", {}, "\n  Almost every letter is lowercase.\n  ", False),
    ("punctuation:no_comma", {}, "\n  Every sentence is short. There is no need for a comma.\n  ", True),
    ("punctuation:no_comma", {}, "\n  Since the start of time, people have always found a way to punctuate.\n  ", False),
    ("startend:quotation", {}, '\n  "This entire message is wrapped in double quotation marks."\n  ', True),
    ("startend:quotation", {}, '\n  "This message is wrapped in double quotation marks." But not everything.\n  ', False),
    # Not in IFEval's tests: "Entire output should be wrapped in JSON format. You can use markdown ticks such as ```."
    ("detectable_format:json_format", {}, '```json\n{"city": "Paris", "sights": ["Louvre"]}\n```', True),
    ("detectable_format:json_format", {}, '```\n[1, 2]\n```', True),
    ("detectable_format:json_format", {}, 'Here you go: {"city": "Paris"}', False),
]


def test_every_supported_id_has_ifevals_cases():
    assert {c[0] for c in CASES} == set(IFEVAL)


@pytest.mark.parametrize("iid, kwargs, response, followed", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_instruction_followed_as_ifeval_says(iid, kwargs, response, followed):
    assert check_instructions(response, [iid], [kwargs]) == [followed]


@pytest.mark.parametrize("text, n", [("word1, word2, word3, word4.", 4), (
    "\n      Bard can you tell me which is the best optimization method for the\n      transition from an "
    "hydro-thermal system to an hydro-renewables system", 24), ("\n      Hyphenated-word has two word counts.\n      ", 6)])
def test_words_counted_as_ifeval_counts_them(text, n):
    assert count_words(text) == n


@pytest.mark.parametrize("text, n", [("xx,x. xx,x! xx/x. x{x}x? x.", 5), ("xx,x! xxxx. x(x)x?", 3),
                                     ("xxxx. xx,x! xx|x. x&x x?", 4), ("xx-x]xx,x! x{x}xx,x.", 2),
                                     ("The U.S.A has many Ph.D. students. They will often have a .com website.", 2),
                                     ("Google is a technology company. It was founded in 1998 by Larry Page\n"
                                      "and Sergey Brin. Its mission is to organize the world's information.", 3)])
def test_sentences_counted_as_ifeval_counts_them(text, n):
    assert count_sentences(text) == n


def test_loose_accepts_a_preamble_line_or_markdown_stars_that_strict_rejects():
    # A chatty first line breaks "all lowercase"; bold markers break "ends with the phrase".
    text = "Sure! Here it is:\nthe sea is calm tonight.\n**that is all.**"
    ids = ["change_case:english_lowercase", "startend:end_checker"]
    kwargs = [{}, {"end_phrase": "That is all."}]
    assert check_instructions(text, ids, kwargs) == [False, False]
    assert check_instructions(text, ids, kwargs, loose=True) == [True, True]


def test_an_empty_answer_follows_nothing():
    assert check_instructions("  \n", ["punctuation:no_comma"], [{}]) == [False]
    assert check_instructions("  \n", ["punctuation:no_comma"], [{}], loose=True) == [False]


def test_hf_style_kwargs_with_every_key_and_nones_are_accepted():
    # google/IFEval on the hub gives every row's kwargs every key, unused ones None.
    kw = {"num_words": 3, "relation": "at least", "keywords": None, "num_bullets": None, "end_phrase": None}
    assert check_instructions("one two three", ["length_constraints:number_words"], [kw]) == [True]


def test_unsupported_id_or_bad_kwargs_is_one_line_naming_it():
    with pytest.raises(ValueError, match=r"^unsupported IFEval instruction 'language:response_language'; supported: "):
        validate_instructions(["punctuation:no_comma", "language:response_language"], [{}, {"language": "fr"}])
    with pytest.raises(ValueError, match=r"^keywords:frequency: missing kwarg 'relation'; it takes keyword, freq"):
        validate_instructions(["keywords:frequency"], [{"keyword": "sea", "frequency": 2}])
    with pytest.raises(ValueError, match=r"relation must be one of .* got 'at most'"):
        validate_instructions(["length_constraints:number_words"], [{"num_words": 3, "relation": "at most"}])
    with pytest.raises(ValueError, match=r"has 2 ids but kwargs has 1"):
        validate_instructions(["punctuation:no_comma", "startend:quotation"], [{}])


def test_reward_scores_ifeval_samples_strict_or_loose_and_a_bad_one_does_not_stop_the_batch():
    ids = ["punctuation:no_comma", "change_case:english_lowercase"]
    good = {"completion": "<think>Plan, Then Write</think>\nthe sea is calm", "meta": {
        "instruction_id_list": ids, "kwargs": [{}, {}]}}
    chatty = {"completion": "Sure! Here it is:\nthe sea is calm", "meta": {"instruction_id_list": ids, "kwargs": [{}, {}]}}
    unsupported = {"completion": "bonjour", "meta": {"instruction_id_list": ["language:response_language"],
                                                     "kwargs": [{"language": "fr"}]}}
    strict = InstructionReward(mode="all")([good, chatty, unsupported])
    assert [r.score for r in strict] == [1.0, 0.0, 0.0]
    assert strict[1].reason == "violated: change_case:english_lowercase"
    assert "unsupported IFEval instruction 'language:response_language'" in strict[2].reason
    assert strict[2].details["failed"] and not strict[1].details.get("failed")
    loose = InstructionReward(mode="all", strictness="loose")([good, chatty])
    assert [r.score for r in loose] == [1.0, 1.0]


def test_strictness_is_checked_when_the_reward_is_built():
    with pytest.raises(ValueError, match="strictness must be 'strict' or 'loose', got 'lenient'"):
        InstructionReward(strictness="lenient")


def test_docstring_examples():
    assert doctest.testmod(rewards.ifeval, optionflags=doctest.ELLIPSIS).failed == 0


def test_ifevals_own_rows_load_as_samples_and_an_unsupported_id_names_its_line(tmp_path):
    """A JSONL in IFEval's own shape (key, prompt, instruction_id_list, kwargs) is data as it is."""
    import json

    from experts.data import DataConfig, load_samples
    from pipeline.config import UserError

    rows = [{"key": 1, "prompt": "Write about cats in lowercase, no commas.",
             "instruction_id_list": ["change_case:english_lowercase", "punctuation:no_comma"], "kwargs": [{}, {}]},
            {"key": 2, "prompt": "Write at least 3 words.", "instruction_id_list": ["length_constraints:number_words"],
             "kwargs": [{"relation": "at least", "num_words": 3}]}]
    path = tmp_path / "ifeval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples = sorted(load_samples(DataConfig(domain="instruction", source="jsonl", path=str(path), heldout=0), "all"),
                     key=lambda s: s["meta"]["instruction_id_list"][0])
    assert samples[0]["meta"]["instruction_id_list"] == ["change_case:english_lowercase", "punctuation:no_comma"]
    for s, text in zip(samples, ["cats purr and nap", "Cats"]):
        s["completion"] = text
    assert [r.score for r in InstructionReward(mode="all")(samples)] == [1.0, 0.0]

    rows.append({"key": 3, "prompt": "Answer in French.", "instruction_id_list": ["language:response_language"],
                 "kwargs": [{"language": "fr"}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError, match=r"ifeval.jsonl:3: instruction_id_list: .*language:response_language"):
        load_samples(DataConfig(domain="instruction", source="jsonl", path=str(path), heldout=0), "all")
