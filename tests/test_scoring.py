"""Detection and fuzzing without a server: answer parsing, answer probabilities, held-out
splits (prompt rendering: test_prompts.py)."""

import math
import random

import pytest

from sae.errors import UserError
from service.cache.windows import LatentExamples, Window, split_examples
from service.config import ScoreConfig
from service.llm.base import TokenLogprob
from service.scorers import create_scorers
from service.scorers.classifier import answer_probability, parse_answers, token_spans
from service.scorers.fuzzing import FuzzingScorer


def values(answers):
    return [None if a is None else a.value for a in answers]


@pytest.mark.parametrize(
    ("text", "n", "expected"),
    [
        ('{"answers": [1, 0, 1]}', 3, [True, False, True]),
        ('{"answers":[1,0,1,1,0]}', 2, [True, False]),
        ('{"answers": [1, 0', 4, [True, False, None, None]),
        ('[1, "maybe", 0]', 3, [True, None, False]),
        ('["yes", "no"]', 2, [True, False]),
        ("1: yes\n2: no\nExample 3. 1", 3, [True, False, True]),
        ("1 0 1", 3, [True, False, True]),
        ("I think the explanation fits well.", 2, [None, None]),
        ("", 2, [None, None]),
        ("{", 1, [None]),
    ],
)
def test_parse_answers(text, n, expected):
    assert values(parse_answers(text, n)) == expected


def test_answer_offsets_point_at_the_answer_characters():
    text = '{"answers": [1, 0, "1"]}'
    answers = parse_answers(text, 3)
    assert [text[a.offset] for a in answers] == ["1", "0", "1"]


def vllm_tokens(pieces_with_top):
    return [TokenLogprob(token, top[token], top) for token, top in pieces_with_top]


def test_answer_probability_from_top_logprobs():
    # As vLLM returns them: the special end token is listed but not part of the text.
    text = '{"answers":[1, 0]}'
    tokens = vllm_tokens(
        [
            ('{"', {'{"': -0.1}),
            ("answers", {"answers": -0.1}),
            ('":', {'":': -0.1}),
            ("[", {"[": -0.1}),
            ("1", {"1": math.log(0.6), "0": math.log(0.2), "\n": math.log(0.1)}),
            (",", {",": -0.1}),
            (" ", {" ": -0.1}),
            ("0", {"0": math.log(0.5), "1": math.log(0.5)}),
            ("]", {"]": -0.1}),
            ("}", {"}": -0.1}),
            ("<|im_end|>", {"<|im_end|>": 0.0}),
        ]
    )
    spans = token_spans(text, tokens)
    assert spans is not None
    answers = parse_answers(text, 2)
    first = answer_probability(tokens, spans, answers[0].offset, text)
    second = answer_probability(tokens, spans, answers[1].offset, text)
    assert first == pytest.approx(0.6 / 0.8)
    assert second == pytest.approx(0.5)


def test_answer_probability_inside_a_merged_token():
    text = "[1]"
    tokens = vllm_tokens([("[1", {"[1": math.log(0.3), "[0": math.log(0.1)}), ("]", {"]": 0.0})])
    spans = token_spans(text, tokens)
    assert spans is not None
    assert answer_probability(tokens, spans, 1, text) == pytest.approx(0.75)


def test_tokens_that_do_not_spell_the_text_give_no_spans():
    assert token_spans("[1]", vllm_tokens([("[0", {"[0": 0.0})])) is None


def window(kind, tokens, activation, quantile_bin=None):
    return Window(tuple(tokens), tuple(activation for _ in tokens), kind, quantile_bin=quantile_bin)


def make_examples() -> LatentExamples:
    windows = [window("top", [f"t{i}", "x"], 10.0 - i) for i in range(8)]
    windows += [
        window("quantile", [f"q{b}{i}", "x"], 1.0 + b, quantile_bin=b)
        for b in range(4)
        for i in range(5)
    ]
    # the same window cached twice, as a top and as a quantile example
    windows.append(window("quantile", ["t0", "x"], 10.0, quantile_bin=3))
    windows += [window("random", [f"r{i}", "x"], 0.0) for i in range(12)]
    windows.append(window("random", ["fires", "x"], 0.5))
    return LatentExamples(7, windows)


def test_held_out_windows_are_never_shown_to_the_explainer():
    split = split_examples(
        make_examples(), n_explain_top=5, n_explain_quantile=4, n_positive=10, n_negative=10
    )
    shown = {w.tokens for w in split.explain}
    assert len(split.explain) == 9
    assert not shown & {w.tokens for w in split.positives}
    assert not shown & {w.tokens for w in split.negatives}
    assert len(split.positives) == 10
    assert all(w.max_activation > 0 for w in split.positives)
    # quantile positives are spread over every bin
    assert {w.quantile_bin for w in split.positives if w.kind == "quantile"} == {0, 1, 2, 3}
    assert len(split.negatives) == 10
    assert all(w.max_activation == 0 for w in split.negatives)


def test_split_takes_spare_top_windows_when_quantiles_run_out_and_is_reproducible():
    examples = make_examples()
    first = split_examples(
        examples, n_explain_top=3, n_explain_quantile=15, n_positive=8, n_negative=3, seed=1
    )
    again = split_examples(
        examples, n_explain_top=3, n_explain_quantile=15, n_positive=8, n_negative=3, seed=1
    )
    assert first == again
    # 21 quantile windows, 15 shown: the 6 held out (less a copy of a shown top window)
    # cannot fill 8 positives, so unshown top windows do
    assert len(first.positives) == 8
    assert sum(w.kind == "top" for w in first.positives) >= 2
    assert not {w.tokens for w in first.explain} & {w.tokens for w in first.positives}


def test_fuzzing_marks_activating_tokens_and_as_many_random_ones_on_negatives():
    positive = Window(("a", "b", "c", "d"), (0.0, 2.0, 1.0, 0.0), "quantile", 0)
    negative = Window(("e", "f", "g", "h", "i"), (0.0,) * 5, "random")
    split = split_examples(
        LatentExamples(1, [positive] * 1 + [negative]),
        n_explain_top=0,
        n_explain_quantile=0,
        n_positive=1,
        n_negative=1,
    )
    items = FuzzingScorer(ScoreConfig()).items(split, random.Random(0))
    assert items[0].label and items[0].marks == [False, True, True, False]
    assert not items[1].label and sum(items[1].marks or []) == 2


def test_unknown_scorer_is_a_user_error():
    with pytest.raises(UserError, match="unknown scorer 'telepathy'"):
        create_scorers(ScoreConfig(scorers=["detection", "telepathy"]))
