import json

import jsonschema
import pytest

from verm_local.answer import answer_schema
from verm_local.constants import CATEGORIES, TASKS
from verm_local.errors import AnswerError
from verm_local.schema import Judgement, extract_json, normalise_errors
from verm_local.tasks import profile

ANSWER = {
    "data_error_count": 1,
    "errors": [
        {"category": "data_error", "severity": 2, "location": "bar 2", "description": "5 -> 4"}
    ],
}


def test_plain_json():
    assert extract_json(json.dumps(ANSWER)) == ANSWER


def test_fenced_json():
    text = "Here you go:\n```json\n" + json.dumps(ANSWER, indent=2) + "\n```\n"
    assert extract_json(text) == ANSWER


def test_think_wrapped_json():
    text = "<think>the bars {differ} a lot</think>\n" + json.dumps(ANSWER)
    assert extract_json(text) == ANSWER


def test_unclosed_think_is_stripped_up_to_end():
    with pytest.raises(AnswerError):
        extract_json("<think>still thinking " + json.dumps(ANSWER))


def test_trailing_garbage_and_braces_in_strings():
    obj = {
        "errors": [
            {
                "category": "text_error",
                "severity": 1,
                "location": "title",
                "description": 'brace } inside " quoted',
            }
        ]
    }
    text = json.dumps(obj) + " trailing words } and more {"
    assert extract_json(text) == obj


def test_raw_control_characters_in_strings_are_read():
    """Another engine's unconstrained answer may break a description over lines."""
    text = '{"errors": [{"description": "two\nlines\tand a tab"}]}'
    assert extract_json(text) == {"errors": [{"description": "two\nlines\tand a tab"}]}


def test_first_balanced_object_wins():
    text = 'noise {"a": 1} then {"b": 2}'
    assert extract_json(text) == {"a": 1}


def test_invalid_first_object_falls_back_to_next():
    text = '{not json} {"errors": []}'
    assert extract_json(text) == {"errors": []}


@pytest.mark.parametrize("text", ["", "no json here", '{"errors": [1, 2', "```json\n{```"])
def test_broken_answers_raise(text):
    with pytest.raises(AnswerError):
        extract_json(text)


def test_type_key_is_accepted_for_category():
    errors = normalise_errors(
        profile("table"),
        {
            "errors": [
                {"type": "numeric_error", "severity": 3, "location": "r2c3", "description": "1.5"}
            ]
        },
    )
    assert errors[0].category == "numeric_error"


@pytest.mark.parametrize(
    "bad",
    [
        {"category": "colour_error", "severity": 1},
        {"category": "data_error", "severity": 4},
        {"category": "data_error", "severity": "high"},
    ],
)
def test_out_of_set_errors_are_refused(bad):
    with pytest.raises(AnswerError):
        normalise_errors(profile("chart"), {"errors": [bad]})


def test_judgement_counts_severity_and_score():
    answer = {
        "errors": [
            {"category": "data_error", "severity": 2, "location": "a", "description": "b"},
            {"category": "data_error", "severity": 3, "location": "c", "description": "d"},
            {"category": "style_error", "severity": 1, "location": "e", "description": "f"},
        ]
    }
    j = Judgement.from_answer(profile("chart"), answer)
    assert j.counts == {"structure_error": 0, "data_error": 2, "text_error": 0, "style_error": 1}
    assert j.total_severity == 6
    assert j.score == pytest.approx(1 - 6 / 50)


@pytest.mark.parametrize("task", TASKS)
def test_answer_schema_accepts_valid_and_rejects_foreign_category(task):
    schema = answer_schema(profile(task))
    p = profile(task)
    cat = CATEGORIES[task][0]
    good = {f"{c}_count": 0 for c in CATEGORIES[task]}
    good[f"{cat}_count"] = 1
    item = {"category": cat, "severity": 3, "location": "x", "description": "y"}
    good["errors"] = [{k: item[k] if k != p.category_key else cat for k in p.error_keys}]
    jsonschema.validate(good, schema)
    bad = dict(good, errors=[dict(good["errors"][0], **{p.category_key: "not_a_category"})])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    worse = dict(good, errors=[dict(good["errors"][0], severity=4)])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(worse, schema)
