"""The answer a judge must give, per task: its JSON schema (the trained keys in the trained
order), bounds derived from the token cap, and the grammar text both engines enforce.

Bounds. The grammar bounds the number of errors and each string's length so that the
longest answer it allows fits the token cap, counting one token per character (the worst
case for ASCII text: every character can be a token of its own; the whitespace between
items counts at its longest). A character outside ASCII can cost more than one token, so
an answer can still reach the cap; the judge then reports it incomplete instead of
scoring it.

Grammar. One GBNF text, compiled by llama.cpp's grammar sampler for GGUF models and by
xgrammar for the transformers reference, so both decode the same language: keys in order,
the closed category set, severity 1..3, strings of JSON characters (no raw control
characters, which strict JSON readers refuse), and whitespace as pretty-printers write it
(a space, or a newline and up to `INDENT` spaces or tabs)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .constants import SEVERITY_MAX, SEVERITY_MIN
from .tasks import TaskProfile

INDENT = 12  # longest indentation after a newline the grammar allows
_WS = 1 + INDENT  # a newline and the indentation
_COLON = 2  # ":" and an optional space
MAX_ERRORS_LIMIT = 99  # counts stay two digits


@dataclass(frozen=True)
class AnswerBounds:
    max_errors: int
    lengths: dict[str, int]  # string key -> longest value in characters

    def to_dict(self) -> dict[str, Any]:
        return {"max_errors": self.max_errors, "max_lengths": dict(self.lengths)}


def _key(name: str) -> int:
    return len(json.dumps(name))


def _fixed_chars(p: TaskProfile) -> int:
    """Characters of the answer around its error items, at their longest: the counts (two
    digits each), the errors key, the brackets and the whitespace between them."""
    counts = sum(_WS + _key(k) + _COLON + 2 + 1 for k in p.count_keys)
    return 1 + counts + _WS + _key("errors") + _COLON + 1 + _WS + 1 + _WS + 1


def _item_chars(p: TaskProfile, lengths: dict[str, int]) -> int:
    """Characters of one error item at its longest, with the separator before it."""
    value = {p.category_key: max(len(json.dumps(c)) for c in p.categories), "severity": 1}
    total = 1 + (len(p.error_keys) - 1) + _WS + 1  # braces, commas, closing whitespace
    for k in p.error_keys:
        total += _WS + _key(k) + _COLON + value.get(k, 2 + lengths.get(k, 0))
    return total + 1 + _WS  # the "," and whitespace before the item


def bounds(p: TaskProfile, max_tokens: int, max_errors: int | None = None) -> AnswerBounds:
    """The largest error list and strings that fit `max_tokens` at one token a character.

    The profile's string targets are kept while at least one error fits; `max_errors`
    (a caller's cap) lowers the list. When even one error at the targets does not fit,
    the strings shrink (in the targets' proportions) until `max_errors` (or one) error
    fits; with no room for a single item the list is empty."""
    if max_errors is not None and max_errors < 0:
        raise ValueError("max_errors must be >= 0")
    room = max_tokens - _fixed_chars(p)
    targets = dict(p.string_targets)
    n = room // _item_chars(p, targets) if room > 0 else 0
    n = min(n, MAX_ERRORS_LIMIT if max_errors is None else max_errors)
    if n >= 1 or max_errors == 0:
        return AnswerBounds(n, targets)
    want = max(1, min(max_errors or 1, MAX_ERRORS_LIMIT))
    skeleton = _item_chars(p, {k: 0 for k in targets})
    for e in range(want, 0, -1):
        spare = room // e - skeleton
        if spare >= 0:
            total = sum(targets.values())
            lengths = {k: spare * v // total for k, v in targets.items()}
            return AnswerBounds(e, lengths)
    return AnswerBounds(0, {k: 0 for k in targets})


def answer_schema(
    p: TaskProfile, max_tokens: int | None = None, max_errors: int | None = None
) -> dict[str, Any]:
    """JSON schema of the model's answer for a task: `<category>_count` integers in the
    task's category order, then `errors` whose items have the trained keys in the trained
    order; bounded so the longest allowed answer fits `max_tokens` (default: the trained
    cap)."""
    b = bounds(p, max_tokens or p.max_tokens, max_errors)
    props: dict[str, Any] = {
        k: {"type": "integer", "enum": list(range(b.max_errors + 1))} for k in p.count_keys
    }
    item: dict[str, Any] = {}
    for k in p.error_keys:
        if k == p.category_key:
            item[k] = {"type": "string", "enum": list(p.categories)}
        elif k == "severity":
            item[k] = {"type": "integer", "enum": list(range(SEVERITY_MIN, SEVERITY_MAX + 1))}
        else:
            item[k] = {"type": "string", "maxLength": b.lengths.get(k, 0)}
    props["errors"] = {
        "type": "array",
        "maxItems": b.max_errors,
        "items": {
            "type": "object",
            "properties": item,
            "required": list(item),
            "additionalProperties": False,
        },
    }
    return {
        "type": "object",
        "properties": props,
        "required": list(props),
        "additionalProperties": False,
    }


def trained_answer(p: TaskProfile, errors: list[dict[str, Any]]) -> dict[str, Any]:
    """An answer in the task's trained format, from labelled errors (keyed `type` or
    `category`, with severity, location, description): the `<category>_count` integers in
    the task's order, then `errors` with the trained keys in the trained order (an error's
    category under the task's key; no location for tables)."""
    items = []
    for e in errors:
        item: dict[str, Any] = {}
        for k in p.error_keys:
            if k == p.category_key:
                item[k] = e.get("type") or e.get("category")
            elif k == "severity":
                item[k] = int(e.get("severity", SEVERITY_MIN))
            else:
                item[k] = str(e.get(k) or "")
        items.append(item)
    counts = {f"{c}_count": sum(i[p.category_key] == c for i in items) for c in p.categories}
    return {**counts, "errors": items}


# ---------------------------------------------------------------- grammar

_GBNF_COMMON = (
    'ws ::= (" " | "\\n" [ \\t]{0,%d})?\n'
    'colon ::= ":" " "?\n'
    'char ::= [^"\\\\\\x7F\\x00-\\x1F] | "\\\\" (["\\\\/bfnrt] | "u" [0-9a-fA-F]{4})\n'
) % INDENT


def _literal(text: str) -> str:
    """A GBNF string literal matching `text` exactly (a JSON token, usually)."""
    return json.dumps(text)


def _alternatives(values: list[Any]) -> str:
    return " | ".join(_literal(json.dumps(v)) for v in values)


def schema_grammar(schema: dict[str, Any]) -> str | None:
    """The GBNF of a schema of the answer's shape (an object whose properties, all required
    and in order, are enums, bounded strings, or a bounded array of such objects), or None
    for any other schema (the caller then uses a general converter)."""
    rules: dict[str, str] = {}
    try:
        root = _object(schema, "root", rules)
    except _Unsupported:
        return None
    lines = [f"root ::= {root}"] + [f"{k} ::= {v}" for k, v in rules.items()]
    return "\n".join(lines) + "\n" + _GBNF_COMMON


class _Unsupported(Exception):
    pass


def _object(schema: Any, name: str, rules: dict[str, str]) -> str:
    if not isinstance(schema, dict) or schema.get("type") != "object":
        raise _Unsupported
    props = schema.get("properties")
    allowed = {
        "type",
        "properties",
        "required",
        "additionalProperties",
        "title",
        "description",
        "$id",
    }
    if (
        not isinstance(props, dict)
        or not props
        or set(schema) - allowed
        or list(schema.get("required") or []) != list(props)
        or schema.get("additionalProperties", True) is not False
    ):
        raise _Unsupported
    parts = []
    for i, (key, sub) in enumerate(props.items()):
        rule = f"{name}-{i}"
        rules[rule] = _value(sub, rule, rules)
        parts.append(f"{_literal(json.dumps(key))} colon {rule}")
    return '"{" ws ' + ' "," ws '.join(parts) + ' ws "}"'


def _value(schema: Any, name: str, rules: dict[str, str]) -> str:
    if not isinstance(schema, dict):
        raise _Unsupported
    kind = schema.get("type")
    extra = set(schema) - {"type", "enum", "maxLength", "maxItems", "items", "title", "description"}
    if extra:
        raise _Unsupported
    if "enum" in schema:
        values = schema["enum"]
        ok = {
            "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
            "string": lambda v: isinstance(v, str),
        }.get(kind)
        if ok is None or not values or not all(ok(v) for v in values):
            raise _Unsupported
        return _alternatives(values)
    if kind == "string" and isinstance(schema.get("maxLength"), int):
        return '"\\"" char{0,%d} "\\""' % schema["maxLength"]
    if kind == "array" and isinstance(schema.get("maxItems"), int):
        n = schema["maxItems"]
        item = f"{name}-item"
        rules[item] = _object(schema.get("items"), item, rules)
        if n == 0:
            return '"[" ws "]"'
        more = f' ("," ws {item}){{0,{n - 1}}}' if n > 1 else ""
        return f'"[" (ws {item}{more})? ws "]"'
    raise _Unsupported


def answer_grammar(
    p: TaskProfile, max_tokens: int | None = None, max_errors: int | None = None
) -> str:
    """The grammar text of a task's answer (see `answer_schema`)."""
    grammar = schema_grammar(answer_schema(p, max_tokens, max_errors))
    assert grammar is not None  # the answer schema is of the supported shape
    return grammar
