"""`verm-local refine`: Visual-ERM as a visual critic at test time. A policy model (any
OpenAI-compatible vision model: Ollama, llama-server, vLLM, a cloud API) writes code for
the ground-truth image; the code renders in the sandbox; the judge compares the render
with the ground truth; its discrepancies (category, severity, location, description) go
back to the policy, which revises. The best round by the authors' reward is kept.

The output directory holds each round (`round-01/`: the policy's reply, the code, the
render, the judgement), `best.<ext>` (the best code), `rounds.json` (the state: running
`refine` again with the same directory resumes after the last round done) and
`report.html` (the ground truth and each round's render side by side with its
discrepancies and reward; the images are inside, so it opens offline)."""

from __future__ import annotations

import base64
import hashlib
import html
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import InputError, RenderError
from .fileio import write_json_atomic
from .images import data_url
from .render import extract_code, render_code
from .reward import with_settings
from .schema import Critique, Judgement
from .tasks import TaskProfile, profile

log = logging.getLogger(__name__)

# What the policy writes for each task, the fence it answers in, the file it is kept as.
LANGUAGE = {
    "chart": ("Python code that draws it with matplotlib", "python", "py"),
    "svg": ("SVG code that draws it", "svg", "svg"),
    "table": ("an HTML table (<table>...</table>) that reproduces it", "html", "html"),
}
ATTEMPTS = 3  # asks of the policy per round before the round is given up


def first_message(p: TaskProfile, gt_url: str) -> list[dict[str, Any]]:
    """The policy's first request: the target image and what to write."""
    what, fence, _ = LANGUAGE[p.name]
    text = (
        f"Write {what}, reproducing this image as exactly as you can: every element, "
        "value, label, colour and position. Answer with the complete code in one "
        f"```{fence} block."
    )
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": gt_url}},
                {"type": "text", "text": text},
            ],
        }
    ]


def revision_message(
    p: TaskProfile, code: str | None, judgement: Judgement | None, render_error: str | None
) -> str:
    """What a critic says back to the policy about one round: the discrepancies the judge
    found between the render (the second image) and the target (the first), each with
    its category, severity, location and description, or why the code did not render;
    and the request for a revised version. `/v1/critique` answers with it too."""
    _, fence, _ = LANGUAGE[p.name]
    lines = []
    if code:
        lines += [f"Your code:\n```{fence}\n{code}\n```", ""]
    if render_error is not None:
        lines += [
            f"It did not render: {render_error}.",
            "",
            f"Fix it so that it renders, and answer with the complete code in one ```{fence} "
            "block.",
        ]
        return "\n".join(lines)
    assert judgement is not None
    if not judgement.errors:
        lines.append("A critic compared its render with the target and found no discrepancy.")
        return "\n".join(lines)
    lines.append(
        "A critic compared its render (the second image) with the target (the first) and "
        f"found {len(judgement.errors)} discrepancies (severity 1 minor, 2 medium, 3 severe):"
    )
    for e in judgement.errors:
        where = f" at {e.location}" if e.location else ""
        lines.append(f"- [{e.category}, severity {e.severity}]{where}: {e.description}")
    lines += [
        "",
        f"Revise the code to remove them; answer with the complete code in one ```{fence} block.",
    ]
    return "\n".join(lines)


def critique(
    judge: Any,
    gt: Any,
    p: TaskProfile,
    *,
    code: str | None = None,
    pred: Any = None,
    unsafe: bool | None = None,
) -> Critique:
    """One critique: `code` rendered in the sandbox as the authors render the task (or the
    rendered image `pred`), judged against `gt`, with the task's reward and the revision
    message. Code that does not render gives its reason and the unrendered reward; no
    sandbox on this machine raises SandboxError."""
    judgement, render_error = None, None
    if code is not None:
        try:
            pred = render_code(code, p.name, unsafe=unsafe)
        except RenderError as exc:
            render_error = str(exc)
    if pred is not None and render_error is None:
        judgement = judge.judge(gt, pred, p, unreadable="score")
    return Critique(
        judgement=judgement,
        reward=judgement.reward if judgement else with_settings(p.reward).unrendered(),
        render_error=render_error,
        revision_message=revision_message(p, code, judgement, render_error),
    )


def code_of(p: TaskProfile, reply: str) -> str | None:
    """The code in a policy's reply: the last ```python / ```svg block (chart, svg, as the
    authors' RL reads a response); for a table the last ```html block, else the
    <table>...</table> in the reply."""
    if p.name == "table":
        blocks = re.findall(r"```(?:html)?\s*(.*?)```", reply or "", re.DOTALL)
        for block in reversed(blocks):
            if "<table" in block.lower():
                return block.strip()
        m = re.search(r"<table.*</table>", reply or "", re.DOTALL | re.IGNORECASE)
        return m.group(0) if m else None
    found = extract_code(reply or "")
    return found[1] if found else None


@dataclass
class RefineResult:
    out: Path
    rounds: list[dict[str, Any]]
    best: int | None  # the best round's number
    stopped: str  # why the loop ended
    report: Path = field(default_factory=Path)

    @property
    def best_round(self) -> dict[str, Any] | None:
        return next((r for r in self.rounds if r["round"] == self.best), None)


class Policy:
    """The policy model behind an OpenAI-compatible endpoint."""

    def __init__(self, url: str, model: str, api_key: str | None = None, timeout: float = 600.0):
        from . import net

        self.url, self.model = url, model
        self.client = net.openai_client(url, api_key, timeout=timeout)

    def ask(self, messages: list[dict[str, Any]], max_tokens: int) -> str:
        out = self.client.chat.completions.create(
            model=self.model, messages=messages, max_tokens=max_tokens, temperature=0.0
        )
        return out.choices[0].message.content or ""


def refine(
    gt: str | Path,
    task: str | TaskProfile = "chart",
    *,
    policy_url: str,
    policy_model: str,
    api_key: str | None = None,
    code: str | Path | None = None,
    rounds: int = 3,
    patience: int = 2,
    out: str | Path = "refine-out",
    judge: Any = None,
    unsafe_render: bool | None = None,
    max_tokens: int = 4096,
    progress: Callable[[dict[str, Any]], None] | None = None,
    **judge_options: Any,
) -> RefineResult:
    """Refine code for the ground-truth image `gt` with a policy model and the judge as
    its critic (see the module). `judge`: a loaded Judge (else one is loaded with
    `judge_options`); `code`: start from this code (a path or the text) instead of
    asking the policy for round 1. Rounds already in `out` are kept and the loop goes
    on after them. Stops after `rounds` rounds, at a judgement with no discrepancy, or
    when the reward has not improved for `patience` rounds."""
    from .judge import Judge

    p = profile(task)
    gt_path = Path(gt)
    if not gt_path.is_file():
        raise InputError(f"{gt_path}: no such image")
    gt_bytes = gt_path.read_bytes()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state_file = out / "rounds.json"
    state = _resume(state_file, p, gt_bytes)
    if isinstance(code, Path) or (
        isinstance(code, str) and "\n" not in code and Path(code).is_file()
    ):
        code = Path(code).read_text(encoding="utf-8")
    recipe = with_settings(p.reward)
    policy = Policy(policy_url, policy_model, api_key)
    own = judge is None
    judge = judge or Judge(**judge_options)
    try:
        done = state["rounds"]
        stopped = ""
        while len(done) < rounds:
            n = len(done) + 1
            record = _round(
                n,
                p,
                gt_bytes,
                done,
                code if n == 1 else None,
                policy,
                judge,
                recipe,
                out,
                unsafe_render,
                max_tokens,
            )
            done.append(record)
            state["rounds"] = done
            write_json_atomic(state_file, state)
            best = _best(done)
            _write_best(out, p, done, best)
            write_report(out, p, gt_bytes, done, best)
            if progress is not None:
                progress(record)
            stopped = _stop(done, patience)
            if stopped:
                break
        best = _best(done)
        return RefineResult(out, done, best, stopped or f"{rounds} rounds", out / "report.html")
    finally:
        if own:
            judge.close()


def _resume(state_file: Path, p: TaskProfile, gt_bytes: bytes) -> dict[str, Any]:
    sha = hashlib.sha256(gt_bytes).hexdigest()
    if state_file.is_file():
        try:
            state = json.loads(state_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise InputError(f"{state_file}: not a refine state file") from None
        if state.get("task") != p.name or state.get("gt_sha256") != sha:
            raise InputError(
                f"{state_file.parent}: holds rounds of another task or ground truth; use "
                "another --out"
            )
        return state
    return {"task": p.name, "gt_sha256": sha, "rounds": []}


def _round(
    n: int,
    p: TaskProfile,
    gt_bytes: bytes,
    done: list[dict[str, Any]],
    given: str | None,
    policy: Policy,
    judge: Any,
    recipe: Any,
    out: Path,
    unsafe: bool | None,
    max_tokens: int,
) -> dict[str, Any]:
    """One round: the code (given, or asked of the policy with the last round's critique,
    up to ATTEMPTS asks), its render in the sandbox, the judgement, the reward."""
    _, fence, ext = LANGUAGE[p.name]
    folder = out / f"round-{n:02d}"
    folder.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"round": n, "problems": [], "code_file": None}
    t0 = time.perf_counter()
    code, reply = given, None
    messages = first_message(p, data_url(gt_bytes))
    if done:
        last = done[-1]
        if last.get("reply"):
            messages.append({"role": "assistant", "content": last["reply"]})
        content: list[dict[str, Any]] = []
        render = out / f"round-{last['round']:02d}" / "render.png"
        if render.is_file():
            content.append({"type": "image_url", "image_url": {"url": data_url(render)}})
        content.append({"type": "text", "text": last["critique"]})
        messages.append({"role": "user", "content": content})
    for attempt in range(ATTEMPTS if code is None else 0):
        try:
            reply = policy.ask(messages, max_tokens)
        except Exception as exc:  # noqa: BLE001 - any endpoint failure: reported, asked again
            record["problems"].append(f"the policy did not answer: {exc.__class__.__name__}: {exc}")
            time.sleep(min(2**attempt, 10))
            continue
        code = code_of(p, reply)
        if code is not None:
            break
        record["problems"].append("the policy's reply has no code")
        messages.append({"role": "assistant", "content": reply})
        messages.append(
            {"role": "user", "content": f"Answer with the complete code in one ```{fence} block."}
        )
    record["reply"] = reply
    if reply is not None:
        (folder / "reply.txt").write_text(reply, encoding="utf-8")
    judgement, render_error = None, None
    if code is None:
        render_error = "no code (" + "; ".join(record["problems"][-1:]) + ")"
        record["reward"] = recipe.unrendered()
    else:
        (folder / f"code.{ext}").write_text(code, encoding="utf-8")
        record["code_file"] = f"round-{n:02d}/code.{ext}"
        try:
            png = render_code(code, p.name, unsafe=unsafe)
        except RenderError as exc:
            render_error = str(exc)
            record["reward"] = recipe.unrendered()
        else:
            (folder / "render.png").write_bytes(png)
            judgement = judge.judge(gt_bytes, png, p, unreadable="score")
            write_json_atomic(folder / "judgement.json", judgement.model_dump(mode="json"))
            record["reward"] = judgement.reward
    if render_error is not None:
        record["problems"].append(f"render: {render_error}")
    record["render_error"] = render_error
    record["errors"] = (
        [e.model_dump(exclude_none=True) for e in judgement.errors] if judgement else None
    )
    record["complete"] = judgement.complete if judgement else None
    record["critique"] = revision_message(p, code, judgement, render_error)
    record["seconds"] = round(time.perf_counter() - t0, 2)
    write_json_atomic(folder / "round.json", record)
    return record


def _best(done: list[dict[str, Any]]) -> int | None:
    scored = [r for r in done if r.get("reward") is not None and r.get("code_file")]
    if not scored:
        return None
    return max(scored, key=lambda r: (r["reward"], -r["round"]))["round"]


def _write_best(out: Path, p: TaskProfile, done: list[dict[str, Any]], best: int | None) -> None:
    if best is None:
        return
    ext = LANGUAGE[p.name][2]
    src = out / next(r for r in done if r["round"] == best)["code_file"]
    (out / f"best.{ext}").write_text(src.read_text(encoding="utf-8"), encoding="utf-8")


def _stop(done: list[dict[str, Any]], patience: int) -> str:
    last = done[-1]
    if last.get("complete") and last.get("errors") == []:
        return "the judge found no discrepancy"
    best = _best(done)
    if best is not None and patience > 0 and last["round"] - best >= patience:
        return f"no better reward for {patience} rounds"
    return ""


def write_report(
    out: Path, p: TaskProfile, gt_bytes: bytes, done: list[dict[str, Any]], best: int | None
) -> Path:
    """report.html: the ground truth and each round's render side by side, with the
    discrepancies and the reward; images inside as data URLs (opens offline)."""

    def img(data: bytes) -> str:
        return f'<img alt="" src="data:image/png;base64,{base64.b64encode(data).decode()}">'

    rows = []
    for r in done:
        render = out / f"round-{r['round']:02d}" / "render.png"
        shown = img(render.read_bytes()) if render.is_file() else "<p>(no render)</p>"
        errs = r.get("errors") or []
        items = "".join(
            f"<tr><td>{html.escape(str(e.get('category')))}</td><td>{e.get('severity')}</td>"
            f"<td>{html.escape(str(e.get('location') or ''))}</td>"
            f"<td>{html.escape(str(e.get('description') or ''))}</td></tr>"
            for e in errs
        )
        table = (
            "<table class='errs'><tr><th>category</th><th>severity</th><th>location</th>"
            f"<th>description</th></tr>{items}</table>"
            if errs
            else f"<p>{html.escape(r.get('render_error') or 'no discrepancy found')}</p>"
        )
        code = ""
        if r.get("code_file") and (out / r["code_file"]).is_file():
            code = html.escape((out / r["code_file"]).read_text(encoding="utf-8"))
        mark = " (best)" if r["round"] == best else ""
        rows.append(
            f"<section><h2>Round {r['round']}{mark}: reward {r.get('reward')}</h2>"
            f"<div class='pair'><figure>{img(gt_bytes)}<figcaption>ground truth</figcaption>"
            f"</figure><figure>{shown}<figcaption>round {r['round']}</figcaption></figure>"
            f"</div>{table}<details><summary>code</summary><pre>{code}</pre></details>"
            "</section>"
        )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>verm-local refine</title>"
        # A round's answer can be long (descriptions, locations, code without spaces):
        # everything wraps inside the page's width instead of running off it.
        "<style>body{font-family:sans-serif;margin:24px;max-width:1200px;"
        "overflow-wrap:anywhere}h1,h2,p{overflow-wrap:anywhere}"
        ".pair{display:flex;flex-wrap:wrap;gap:16px}figure{margin:0;max-width:100%}"
        "img{max-width:min(480px,100%);height:auto;border:1px solid #ccc}"
        "table.errs{border-collapse:collapse;table-layout:fixed;width:100%}"
        ".errs td,.errs th{border:1px solid #999;padding:4px 8px;text-align:left;"
        "vertical-align:top;overflow-wrap:anywhere;word-break:break-word;white-space:normal}"
        ".errs th:nth-child(1){width:9em}.errs th:nth-child(2){width:5em}"
        ".errs th:nth-child(3){width:25%}"
        "pre{white-space:pre-wrap;overflow-wrap:anywhere;max-width:100%}</style></head><body>"
        f"<h1>verm-local refine: {p.name}, {len(done)} rounds, best round {best}</h1>"
        + "".join(rows)
        + "</body></html>"
    )
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
