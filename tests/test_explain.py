"""The explainer's prompt and the parsing of what small models answer."""

import pytest

from sae.errors import UserError
from service.config import ScoreConfig
from service.explainers import create_explainers
from service.explainers.llm import parse_explanation
from service.llm.prompts import load_prompt


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ('{"explanation": "the word \'return\' in code"}', "the word 'return' in code"),
        ('```json\n{"explanation": "digits in dates"}\n```', "digits in dates"),
        ('{"explanation": "opening parenth', "opening parenth"),
        ('{\n  "explanation": "a \\"quoted\\" word"\n}', 'a "quoted" word'),
        ("Explanation: capitalised words\nMore chatter", "capitalised words"),
        ('"Python keywords"', "Python keywords"),
        ("  \n  the word class  \n", "the word class"),
        ("The marked tokens have the following:\n- the keyword return", "the keyword return"),
    ],
)
def test_parse_explanation_accepts_what_models_write(raw, expected):
    assert parse_explanation(raw) == expected


@pytest.mark.parametrize("raw", ["", "   ", "{", '{"explanation": ""}', "{}", '"..."'])
def test_parse_explanation_fails_on_nothing_usable(raw):
    assert parse_explanation(raw) is None


def test_parse_explanation_caps_the_length():
    parsed = parse_explanation('{"explanation": "' + "word " * 100 + '"}')
    assert parsed is not None and len(parsed) <= 200


def test_unknown_explainer_and_prompt_are_user_errors():
    with pytest.raises(UserError, match="unknown explainer 'oracle'"):
        create_explainers(ScoreConfig(explainers=["llm", "oracle"]))
    with pytest.raises(UserError, match="no prompt template 'explain_v9'"):
        load_prompt("explain_v9")
