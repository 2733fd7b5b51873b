"""JSON schemas to grammar text, enforced in full or refused.

The answer's schema (`answer.answer_schema`, and any schema of its shape) becomes
verm-local's own grammar (`answer.schema_grammar`). Other schemas, which OpenAI clients
send as `response_format`, go through llama-cpp-python's JSON-schema converter; keywords
that converter does not enforce are rewritten where an equivalent exists (a bounded
integer range becomes an enum) and refused otherwise, naming the keyword, so a schema is
never silently loosened (the converter ignores `minimum`/`maximum`, for one)."""

from __future__ import annotations

import json
from typing import Any

from ..answer import schema_grammar
from ..errors import InputError

# Keywords llama-cpp-python's converter enforces, and keywords that only annotate.
_ENFORCED = {
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "prefixItems",
    "minItems",
    "maxItems",
    "enum",
    "const",
    "anyOf",
    "oneOf",
    "allOf",
    "$ref",
    "$defs",
    "definitions",
    "pattern",
    "minLength",
    "maxLength",
    "format",
}
_ANNOTATIONS = {
    "title",
    "description",
    "$schema",
    "$id",
    "$comment",
    "default",
    "examples",
    "deprecated",
    "readOnly",
    "writeOnly",
    "strict",
}
_FORMATS = {"date", "time", "date-time", "uuid"}
_MAX_ENUM_RANGE = 1024


def grammar_for(constraint: str | dict[str, Any] | None) -> str | None:
    """GBNF for a constraint: grammar text as given, or a JSON schema converted."""
    if constraint is None or isinstance(constraint, str):
        return constraint
    return json_schema_grammar(constraint)


def json_schema_grammar(schema: dict[str, Any]) -> str:
    """GBNF enforcing `schema` in full; InputError naming the keyword it cannot enforce."""
    own = schema_grammar(schema)
    if own is not None:
        return own
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    checked = _rewrite(schema, "schema")
    try:
        text = json_schema_to_gbnf(json.dumps(checked))
    except (AssertionError, KeyError, ValueError, TypeError, NotImplementedError) as exc:
        raise InputError(
            f"response_format: schema not supported ({exc or type(exc).__name__})"
        ) from None
    return _strict_strings(text)


def _rewrite(node: Any, where: str) -> Any:
    if isinstance(node, list):
        return [_rewrite(v, f"{where}[{i}]") for i, v in enumerate(node)]
    if not isinstance(node, dict):
        return node
    out = dict(node)
    if any(k in out for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")):
        out = _integer_range(out, where)
    if out.get("format") is not None and out["format"] not in _FORMATS:
        raise InputError(
            f"response_format: 'format: {out['format']}' at {where} is not "
            "enforced by this server; drop it or use a pattern"
        )
    for key, value in list(out.items()):
        if key in ("properties", "$defs", "definitions") and isinstance(value, dict):
            out[key] = {k: _rewrite(v, f"{where}.{k}") for k, v in value.items()}
        elif key in ("items", "additionalProperties", "anyOf", "oneOf", "allOf", "prefixItems"):
            out[key] = _rewrite(value, f"{where}.{key}")
        elif key not in _ENFORCED and key not in _ANNOTATIONS:
            raise InputError(
                f"response_format: keyword '{key}' at {where} is not enforced "
                "by this server; the request is refused rather than loosened"
            )
    return out


def _integer_range(node: dict[str, Any], where: str) -> dict[str, Any]:
    """An integer with both bounds becomes the enum of its values (the converter enforces
    enums); anything else with a bound is refused."""
    lo, hi = node.get("minimum"), node.get("maximum")
    if node.get("exclusiveMinimum") is not None or node.get("exclusiveMaximum") is not None:
        key = "exclusiveMinimum" if node.get("exclusiveMinimum") is not None else "exclusiveMaximum"
        raise InputError(
            f"response_format: '{key}' at {where} is not enforced by this "
            "server; use integer minimum and maximum"
        )
    ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (lo, hi))
    if node.get("type") != "integer" or not ints or not 0 <= hi - lo < _MAX_ENUM_RANGE:
        key = "minimum" if lo is not None else "maximum"
        raise InputError(
            f"response_format: '{key}' at {where} is enforced only on integers "
            f"with both minimum and maximum (at most {_MAX_ENUM_RANGE} values); "
            "the request is refused rather than loosened"
        )
    values = list(range(lo, hi + 1))
    if "enum" in node:
        values = [v for v in node["enum"] if v in values]
    rest = {k: v for k, v in node.items() if k not in ("minimum", "maximum")}
    return {**rest, "enum": values}


_LOOSE_CHARS = '[^"\\\\]'  # GBNF: any character but a quote or a backslash
_JSON_CHARS = '[^"\\\\\\x7F\\x00-\\x1F]'  # ... nor a control character


def _strict_strings(gbnf: str) -> str:
    """llama-cpp-python's converter lets raw control characters (a newline, a tab) into
    strings with a length limit; no strict JSON reader takes them, and llama.cpp's own
    converter leaves them out, as here."""
    lines = gbnf.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(f"char ::= {_LOOSE_CHARS} |"):
            lines[i] = line.replace(_LOOSE_CHARS, _JSON_CHARS, 1)
    return "\n".join(lines) + "\n"
