"""Answer extraction over a table of answer styles: GSM8K final numbers, markers, regexes, choice letters."""

from __future__ import annotations

import pytest

from imitate.errors import InputError
from imitate.evaluate.extract import (
    choice_letter,
    extract,
    gold_number,
    is_correct,
    normalise_number,
    parse_rule,
)

AUTO = [
    ("She has 3 + 4 = <<3+4=7>>7 apples.\n#### 7", "7"),
    ("The answer is 18.", "18"),
    ("The answer is $1,234.", "1234"),
    ("So the total is 18.0", "18"),
    ("First 12 pens, then 3 more, so 15 pens in all.", "15"),
    ("The answer is: 42 apples. She later buys 5 more.", "42"),  # the marker wins over the last number
    ("#### 1,000,000", "1000000"),
    ("The answer is **18**", "18"),
    ("Final answer: \\boxed{64}", "64"),
    ("It is -3 degrees colder.", "-3"),
    ("It is −4 degrees (Unicode minus).", "-4"),
    ("She uses 3/4 of a cup.", "0.75"),
    ("Each gets 2/3 of the pie.", "2/3"),
    ("Half of 10 is 5", "5"),
    ("It costs 0.50 dollars", "0.5"),
    ("She pays .5 dollars", "0.5"),
    ("Version 2.5.1 costs 7", "7"),
    ("I think 12. Hmm, no: 13.", "13"),
    ("50% of 10 is 5", "5"),
    ("10 - 5 = 5", "5"),
    ("The answer is 1,2 and 3", "3"),  # "1,2" is not a thousands group: three numbers, the sentence's last
    ("So, the answer is 9 * $890 = $8010.", "8010"),  # the marker's sentence ends on the result
    ("#### 30 - 18 = 12 students.\n#### 24 - 18", "18"),  # a spaced minus is an operator, not a sign
    ("The answer is 3.5 cups. Then 2 more.", "3.5"),
    ("no numbers here", None),
    ("The answer is unknown, but 9 is close", "9"),  # no number right after the marker: still the next one
]


@pytest.mark.parametrize(("text", "want"), AUTO)
def test_auto_rule(text, want):
    assert extract(text, parse_rule("auto")) == want


@pytest.mark.parametrize(
    ("rule", "text", "want"),
    [
        ("last-number", "The answer is 42. Check: 6 * 7 = 42, and 2 more is 44", "44"),
        ("first-number", "42 is the answer, not 44", "42"),
        ("marker:Final:", "Steps 1, 2, 3. Final: 27 cows. Then 8", "27"),
        ("marker:Final:", "no marker 27", None),
        ("marker:####", "#### 5\n#### 6", "6"),
        ("regex:Answer: (\\w+)", "Answer: Paris. Answer: Rome.", "rome"),
        ("regex:[0-9]+ cows", "12 cows and 3 cows", "3 cows"),
        ("regex:Answer: (\\d+)", "nothing", None),
        ("choice", "The answer is (B).", "B"),
    ],
)
def test_other_rules(rule, text, want):
    assert extract(text, parse_rule(rule)) == want


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("The answer is (B)", "B"),
        ("Answer: C", "C"),
        ("answer is D.", "D"),
        ("B) Paris", "B"),
        ("**D**", "D"),
        ("(A)", "A"),
        ("C", "C"),
        ("I would pick (C) because it is warm.", "C"),
        ("The correct answer is option A", "A"),
        ("The answer is a dog", None),  # lower-case: the article, not a choice
        ("Paris is the capital", None),
    ],
)
def test_choice_letter(text, want):
    assert choice_letter(text) == want


@pytest.mark.parametrize(
    ("text", "want"),
    [("1,234", "1234"), ("$5", "5"), ("18.00", "18"), ("7.", "7"), ("12%", "12"), ("-0.250", "-0.25"),
     ("6/4", "1.5"), ("1/3", "1/3"), ("1/0", None), ("abc", None), ("1,23", None), ("3 apples", None)],
)  # fmt: skip
def test_normalise_number(text, want):
    assert normalise_number(text) == want


def test_gold_and_comparison():
    assert gold_number("Work...\n#### 1,200") == "1200"
    assert gold_number("#### 3\nmore #### 4") == "4"
    assert gold_number("no marker 12") is None and gold_number("####  ") is None
    assert is_correct("$1,200.00", "1200") and is_correct("Paris.", "paris")
    assert not is_correct(None, "3") and not is_correct("4", "3")


def test_bad_rules_are_one_line():
    with pytest.raises(InputError, match="unknown rule"):
        parse_rule("biggest-number")
    with pytest.raises(InputError, match="not a regular expression"):
        parse_rule("regex:(")
    assert str(parse_rule("marker:####")) == "marker:####" and str(parse_rule(None)) == "auto"
