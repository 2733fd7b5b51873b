"""Task prompts: the authors' training prompts (fetched by `verm-local pull` and kept in the
store), a prompt file of the user's, or the built-in prompts in this project's own words.

verm-local does not carry the authors' prompt text. `fetch_trained` downloads the
authors' files at pinned commits (content at a commit never changes), reads the prompts
out of them by parsing the Python with `ast` (never importing or running it) and stores
them with their sha256 and source. `resolve_prompt` prefers, in order: `--prompt-file`,
the trained prompts, the built-in ones (with a warning that says how to get the trained
ones)."""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .constants import TASKS
from .errors import FetchError, InputError
from .tasks import PROFILES, PromptSource, TaskProfile

log = logging.getLogger(__name__)

PROMPTS_FILE = "prompts.json"
FORMAT_VERSION = 1

_SUBJECT = {
    "chart": (
        "a reviewer of chart renderings",
        "a reference chart",
        "a chart rendered from code that tried to reproduce it",
        {
            "structure_error": "chart type, axes, subplots, legend or layout differ",
            "data_error": "values, series, bars, points or their order differ",
            "text_error": "titles, labels, tick labels, legend or annotation text differ",
            "style_error": "colours, markers, line styles, fonts or sizes differ",
        },
    ),
    "table": (
        "a reviewer of table renderings",
        "a reference table",
        "a table rendered from markup that tried to reproduce it",
        {
            "layout_error": "rows, columns, merged cells, headers or alignment differ",
            "text_error": "words in cells or headers are wrong, missing or extra",
            "numeric_error": "numbers, units, signs or decimals differ",
        },
    ),
    "svg": (
        "a reviewer of vector graphics renderings",
        "a reference graphic",
        "a graphic rendered from SVG code that tried to reproduce it",
        {
            "structure_error": "elements are missing, extra, grouped or placed differently",
            "shape_error": "a shape's geometry, size, proportion or path differs",
            "style_error": "fills, strokes, colours, opacity or line widths differ",
            "text_symbol_error": "text, symbols, digits or icons differ",
        },
    ),
}

_RUBRIC = (
    "Severity: 1 = minor, barely affects reading; "
    "2 = medium, needs a manual correction; "
    "3 = severe, a structural or key-content error that misleads the reader."
)

_FIELD_HINTS = {
    "severity": "<1|2|3>",
    "location": '"<where in image 2>"',
    "description": '"<what differs>"',
}


@dataclass(frozen=True)
class Prompt:
    text: str
    source: str  # "trained" | "file:PATH" | "built-in"


def default_prompt(p: TaskProfile) -> str:
    """The built-in prompt for a task, asking for the trained answer format (the task's
    keys in their trained order)."""
    role, first, second, cats = _SUBJECT[p.name]
    cat_lines = "\n".join(f"- {c}: {d}" for c, d in cats.items())
    counts = ", ".join(f'"{k}": <int>' for k in p.count_keys)
    fields = ", ".join(
        f'"{k}": ' + ('"<category>"' if k == p.category_key else _FIELD_HINTS[k])
        for k in p.error_keys
    )
    return (
        f"You are {role}. Image 1 is {first} (the ground truth). "
        f"Image 2 is {second}.\n"
        "Find all visual discrepancies of image 2 relative to image 1. "
        "Report each one once, with the category it belongs to:\n"
        f"{cat_lines}\n"
        f"{_RUBRIC}\n"
        "Answer with JSON only, exactly in this form:\n"
        f'{{{counts}, "errors": [{{{fields}}}]}}\n'
        "If the images match, every count is 0 and errors is []."
    )


def load_prompt(p: TaskProfile, prompt_file: str | Path | None = None) -> str:
    """The prompt text for a task (see `resolve_prompt`)."""
    return resolve_prompt(p, prompt_file).text


def resolve_prompt(
    p: TaskProfile,
    prompt_file: str | Path | None = None,
    home: Path | None = None,
    warn: bool = True,
) -> Prompt:
    """`prompt_file` when given (plain text, or a JSON object keyed by task), else the
    trained prompt from the store, else the built-in one (with a warning)."""
    if prompt_file is not None:
        return Prompt(read_prompt_file(p, prompt_file), f"file:{prompt_file}")
    trained = trained_prompts(home)
    if p.name in trained:
        return Prompt(trained[p.name], "trained")
    if warn:
        _warn_built_in()
    return Prompt(default_prompt(p), "built-in")


_warned: set[str] = set()


def _warn_built_in() -> None:
    if "built-in" in _warned:
        return
    _warned.add("built-in")
    log.warning(
        "using the built-in prompts: the training prompts are not in the store; "
        "`verm-local pull --prompts-only` fetches them"
    )


def read_prompt_file(p: TaskProfile, prompt_file: str | Path) -> str:
    path = Path(prompt_file)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: prompt file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read prompt file ({exc.__class__.__name__})") from None
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            table = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise InputError(
                f"{path}: prompt file looks like JSON but is not ({exc.msg})"
            ) from None
        if p.name not in table or not isinstance(table[p.name], str):
            raise InputError(f"{path}: no prompt for task {p.name!r} in the JSON object")
        stripped = table[p.name].strip()
    if not stripped:
        raise InputError(f"{path}: prompt file is empty")
    return stripped


# ---------------------------------------------------------------- trained prompts


def prompts_path(home: Path | None = None) -> Path:
    from .paths import home_dir

    return (home or home_dir()) / "prompts" / PROMPTS_FILE


def trained_record(home: Path | None = None) -> dict[str, Any] | None:
    """The stored record of the trained prompts, or None (absent, unreadable, tampered)."""
    path = prompts_path(home)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        prompts = record["prompts"]
        for task, entry in prompts.items():
            if hashlib.sha256(entry["text"].encode()).hexdigest() != entry["sha256"]:
                log.warning(
                    "%s: the %s prompt fails its sha256 check; ignoring the stored prompts",
                    path,
                    task,
                )
                return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return record


def trained_prompts(home: Path | None = None) -> dict[str, str]:
    record = trained_record(home)
    return {t: e["text"] for t, e in (record or {}).get("prompts", {}).items() if t in TASKS}


def source_url(base: str, src: PromptSource) -> str:
    return f"{base.rstrip('/')}/{src.commit}/{src.path}"


def fetch_trained(
    base_url: str | None = None, home: Path | None = None, timeout: float = 30.0
) -> Path:
    """Download the authors' files at their pinned commits, extract the three training
    prompts with `ast`, and store them (text, sha256, source) in the store; returns the
    file written. FetchError when a file cannot be fetched or lacks a prompt."""
    from .fileio import write_json_atomic
    from .settings import settings

    base = base_url or settings().prompts_url
    files: dict[str, tuple[str, str]] = {}  # url -> (text, sha256 of the file)
    prompts: dict[str, Any] = {}
    for task, p in PROFILES.items():
        url = source_url(base, p.prompt)
        if url not in files:
            raw = _download(url, timeout)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise FetchError(f"{url}: not UTF-8 text") from None
            files[url] = (text, hashlib.sha256(raw).hexdigest())
        source, file_sha = files[url]
        text = extract_prompt(source, p.prompt, url)
        check_prompt(p, text, url)
        prompts[task] = {
            "text": text,
            "sha256": hashlib.sha256(text.encode()).hexdigest(),
            "source": {
                "url": url,
                "path": p.prompt.path,
                "commit": p.prompt.commit,
                "name": p.prompt.name,
                "file_sha256": file_sha,
            },
        }
    path = prompts_path(home)
    write_json_atomic(
        path,
        {
            "version": FORMAT_VERSION,
            "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "prompts": prompts,
        },
    )
    return path


def _download(url: str, timeout: float) -> bytes:
    """The file at `url` (the package's HTTP client: retries with backoff); FetchError."""
    from .net import get_bytes

    return get_bytes(url, timeout=timeout)


def extract_prompt(source: str, where: PromptSource, label: str = "") -> str:
    """The prompt in a Python file's text, read with `ast` (the code is never run): the
    string of a module-level assignment (the last one, the live one), or the string a
    module-level function returns (directly, or a name bound to a string in it)."""
    label = label or where.path
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        raise FetchError(f"{label}: not valid Python ({exc.msg}, line {exc.lineno})") from None
    if where.kind == "assign":
        value = None
        for node in tree.body:
            targets = (
                node.targets
                if isinstance(node, ast.Assign)
                else [node.target]
                if isinstance(node, ast.AnnAssign)
                else []
            )
            if any(isinstance(t, ast.Name) and t.id == where.name for t in targets):
                value = node.value
        text = _string(value)
    else:
        func = None
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name == where.name:
                func = node
        text = _returned_string(func) if func is not None else None
    if text is None:
        raise FetchError(
            f"{label}: no {where.name} string in it (has the file changed?); nothing was stored"
        )
    return text


def _string(node: ast.AST | None) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return None


def _returned_string(func: ast.FunctionDef) -> str | None:
    bound: dict[str, str | None] = {}
    for node in func.body:  # straight-line body: names bound, then the return
        if isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    bound[t.id] = _string(node.value)
        elif isinstance(node, ast.Return):
            if isinstance(node.value, ast.Name):
                return bound.get(node.value.id)
            return _string(node.value)
    return None


def check_prompt(p: TaskProfile, text: str, label: str) -> None:
    """A stored prompt must ask for the task's answer: every category and count key."""
    missing = [c for c in p.categories if c not in text]
    missing += [k for k in p.count_keys if k not in text]
    if not text.strip() or missing:
        raise FetchError(
            f"{label}: the {p.name} prompt does not name {', '.join(missing) or 'anything'}; "
            "nothing was stored"
        )


# ---------------------------------------------------------------- the matcher's prompt

# VC-RewardBench's scoring asks an LLM which predicted error is which labelled one, with
# a prompt the authors build in `build_llm_prompt` (an f-string) in their evaluation.
MATCHER_SOURCE = PromptSource(
    "evaluation/evaluation.py",
    "d842beca56b5a95c11128a263797dbf4cf0bc9d6",
    "fstring",
    "build_llm_prompt",
)
MATCHER_FILE = "matcher.json"
# The f-string's fields, by their expression, and the value each stands for.
MATCHER_SLOTS = {
    "category": "category",
    "allowed_types": "allowed_types",
    "json.dumps(pred_list, ensure_ascii=False, indent=2)": "pred_list",
    "json.dumps(gt_list, ensure_ascii=False, indent=2)": "gt_list",
}


@dataclass(frozen=True)
class Template:
    """A prompt template: literal text and named slots, in order; `strip` as the source
    strips the result."""

    parts: tuple[tuple[str, str], ...]  # ("text", literal) | ("slot", name)
    strip: bool = False

    def render(self, values: dict[str, str]) -> str:
        text = "".join(v if kind == "text" else values[v] for kind, v in self.parts)
        return text.strip() if self.strip else text

    def to_dict(self) -> dict[str, Any]:
        return {"parts": [list(p) for p in self.parts], "strip": self.strip}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Template:
        return cls(tuple((str(k), str(v)) for k, v in data["parts"]), bool(data["strip"]))

    @property
    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


def extract_template(
    source: str, where: PromptSource, slots: dict[str, str], label: str = ""
) -> Template:
    """The f-string a module-level function builds its prompt from, read with `ast` (the
    code is never run): literal parts as text, each field as the slot its expression
    names in `slots` (a field not in `slots`, a conversion or a format spec: refused, the
    file has changed). A `.strip()` on the f-string is kept."""
    label = label or where.path
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        raise FetchError(f"{label}: not valid Python ({exc.msg}, line {exc.lineno})") from None
    funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == where.name]
    found: tuple[ast.JoinedStr, bool] | None = None
    for node in ast.walk(funcs[-1]) if funcs else ():
        value = node.value if isinstance(node, (ast.Assign, ast.Return)) else None
        strip = False
        if (
            isinstance(value, ast.Call)
            and isinstance(value.func, ast.Attribute)
            and value.func.attr == "strip"
            and not value.args
        ):
            value, strip = value.func.value, True
        if isinstance(value, ast.JoinedStr):
            found = (value, strip)
    if found is None:
        raise FetchError(
            f"{label}: no f-string prompt in {where.name} (has the file changed?); "
            "nothing was stored"
        )
    parts: list[tuple[str, str]] = []
    for piece in found[0].values:
        if isinstance(piece, ast.Constant) and isinstance(piece.value, str):
            parts.append(("text", piece.value))
            continue
        expr = ast.unparse(piece.value) if isinstance(piece, ast.FormattedValue) else "?"
        if (
            not isinstance(piece, ast.FormattedValue)
            or piece.conversion != -1
            or piece.format_spec is not None
            or expr not in slots
        ):
            raise FetchError(
                f"{label}: {where.name} fills in {expr!r}, which is not known here (has the "
                "file changed?); nothing was stored"
            )
        parts.append(("slot", slots[expr]))
    return Template(tuple(parts), found[1])


def matcher_path(home: Path | None = None) -> Path:
    return prompts_path(home).with_name(MATCHER_FILE)


def fetch_matcher(
    base_url: str | None = None, home: Path | None = None, timeout: float = 30.0
) -> Path:
    """Download the authors' evaluation at its pinned commit, extract the matcher's prompt
    template with `ast`, and store it (parts, sha256, source); returns the file written."""
    from .fileio import write_json_atomic
    from .settings import settings

    url = source_url(base_url or settings().prompts_url, MATCHER_SOURCE)
    raw = _download(url, timeout)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FetchError(f"{url}: not UTF-8 text") from None
    template = extract_template(text, MATCHER_SOURCE, MATCHER_SLOTS, url)
    missing = set(MATCHER_SLOTS.values()) - {v for k, v in template.parts if k == "slot"}
    if missing:
        raise FetchError(f"{url}: the matcher prompt lacks {', '.join(sorted(missing))}")
    path = matcher_path(home)
    write_json_atomic(
        path,
        {
            "version": FORMAT_VERSION,
            "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "template": template.to_dict(),
            "sha256": template.sha256,
            "source": {
                "url": url,
                "path": MATCHER_SOURCE.path,
                "commit": MATCHER_SOURCE.commit,
                "name": MATCHER_SOURCE.name,
                "file_sha256": hashlib.sha256(raw).hexdigest(),
            },
        },
    )
    return path


def stored_matcher(home: Path | None = None) -> tuple[Template, dict[str, Any]] | None:
    """The stored matcher template and its record, or None (absent, unreadable, or failing
    its sha256 check, with a warning)."""
    path = matcher_path(home)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        template = Template.from_dict(record["template"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if template.sha256 != record.get("sha256"):
        log.warning("%s: the matcher prompt fails its sha256 check; ignoring it", path)
        return None
    return template, record
