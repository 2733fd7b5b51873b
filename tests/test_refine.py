"""`verm-local refine` against a policy served over HTTP by the test (it answers prepared
code round by round, standing for a remote vision model), with the tiny judge; the
revision message; `/v1/critique`."""

from __future__ import annotations

import json
import shutil
import subprocess
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from verm_local.schema import JudgedError, Judgement
from verm_local.tasks import profile

from .conftest import draw_chart, run_cli, serve_in_thread

GOOD = "```python\nimport matplotlib.pyplot as plt\nplt.bar([0, 1, 2, 3], [3, 5, 2, 6])\n```"
BETTER = "```python\nimport matplotlib.pyplot as plt\nplt.bar([0, 1, 2, 3], [3, 4, 2, 6])\n```"
BROKEN = "```python\nimport matplotlib.pyplot as plt\nplt.bar([0, 1], [1, 2, 3])\n```"


class PolicyServer:
    """OpenAI-compatible chat completions answering `replies` in order (the last one
    again when they run out); keeps every request it got."""

    def __init__(self, replies: list[str]):
        self.replies, self.requests = list(replies), []
        policy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                policy.requests.append(body)
                text = policy.replies.pop(0) if len(policy.replies) > 1 else policy.replies[0]
                out = {
                    "id": "p",
                    "object": "chat.completion",
                    "created": 0,
                    "model": body["model"],
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": "stop",
                            "message": {"role": "assistant", "content": text},
                        }
                    ],
                }
                data = json.dumps(out).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        serve_in_thread(self.server)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_the_revision_message_carries_every_discrepancy():
    j = Judgement(
        task="chart",
        errors=[
            JudgedError(category="data_error", severity=3, location="bar 2", description="5 not 4"),
            JudgedError(category="style_error", severity=1, location="bars", description="orange"),
        ],
    )
    from verm_local.refine import revision_message

    text = revision_message(profile("chart"), "plt.bar(...)", j, None)
    assert "```python\nplt.bar(...)\n```" in text
    assert "- [data_error, severity 3] at bar 2: 5 not 4" in text
    assert "- [style_error, severity 1] at bars: orange" in text
    failed = revision_message(profile("chart"), "x", None, "ValueError: shape mismatch")
    assert "did not render: ValueError: shape mismatch" in failed
    table = revision_message(
        profile("table"), "<table></table>", j.model_copy(update={"errors": []}), None
    )
    assert "found no discrepancy" in table and "```html" in table


@pytest.fixture
def gt(tmp_path) -> Path:
    return draw_chart(tmp_path / "gt.png", [3, 5, 2, 6])


@pytest.mark.slow
def test_refine_rounds_best_resume_and_report(tiny_gguf, gt, tmp_path):
    """Three rounds: a code that does not render (reward 0), a chart, then a reply with no
    code before a second chart; the best by the authors' reward; resumed; the report
    opened in a real headless Chromium."""
    from verm_local import refine
    from verm_local.judge import Judge

    # Answers cut at 16 tokens never read as "no discrepancy": all three rounds run, and
    # each scores the recipe's value for an unreadable answer (S = 25: 1.5), a failed
    # render 0: the best round is told by the reward alone.
    replies = [BROKEN, GOOD, "Let me think about the bars.", BETTER]
    policy = PolicyServer(replies)
    out = tmp_path / "refine"
    try:
        with Judge(str(tiny_gguf / "model-Q8_0.gguf"), max_tokens=16, image_tokens=64) as j:
            first = refine(gt, "chart", policy_url=policy.url, policy_model="p", rounds=2,
                           patience=0, out=out, judge=j)  # fmt: skip
            assert [r["round"] for r in first.rounds] == [1, 2]
            asked = len(policy.requests)
            result = refine(gt, "chart", policy_url=policy.url, policy_model="p", rounds=3,
                            patience=0, out=out, judge=j)  # fmt: skip
    finally:
        policy.close()
    assert asked == 2 and len(policy.requests) == 4  # resumed: only round 3 was asked
    r1, r2, r3 = result.rounds
    assert r1["render_error"] and r1["reward"] == 0.0
    assert r2["reward"] == pytest.approx(1.5) and r3["reward"] == pytest.approx(1.5)
    assert r3["problems"] == ["the policy's reply has no code"]
    assert result.best == 2 and (out / "best.py").read_text() in GOOD
    for n in (1, 2, 3):
        assert (out / f"round-{n:02d}" / "code.py").is_file()
    assert (out / "round-02" / "render.png").is_file() and (
        out / "round-02" / "judgement.json"
    ).is_file()
    # Each request after the first shows the policy its last code, its render and the
    # critique of it.
    second = policy.requests[1]["messages"]
    assert second[0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert "did not render" in second[-1]["content"][-1]["text"]
    third = policy.requests[2]["messages"]
    assert third[-1]["content"][0]["type"] == "image_url"  # round 2's render
    assert third[-1]["content"][-1]["text"] == r2["critique"]
    # report.html in Chromium: the page renders, images inside.
    chromium = shutil.which("chromium") or shutil.which("google-chrome")
    if chromium is None:
        pytest.skip("no Chromium here (scripts/install.sh installs it)")
    shot = tmp_path / "report.png"
    subprocess.run(
        [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", f"--user-data-dir={tmp_path / 'prof'}",
         "--window-size=1200,1600", f"--screenshot={shot}", result.report.as_uri()],
        capture_output=True, timeout=120,
    )  # fmt: skip
    from PIL import Image

    with Image.open(shot) as im:
        colours = im.convert("RGB").getcolors(1 << 20)
    assert im.size == (1200, 1600) and colours and len(colours) > 50  # text and images


@pytest.mark.slow
def test_refine_cli_three_rounds_against_the_policy(tiny_gguf, gt, tmp_path):
    policy = PolicyServer([GOOD, BETTER, GOOD])
    out = tmp_path / "cli"
    try:
        proc = run_cli(
            "refine", gt, "--task", "chart", "--policy-url", policy.url, "--policy-model", "p",
            "--rounds", "3", "--patience", "0", "--out", out, "-m", tiny_gguf / "model-Q8_0.gguf",
            "--image-tokens", "64", "--max-tokens", "400",
        )  # fmt: skip
    finally:
        policy.close()
    assert proc.returncode == 0, proc.stderr[-2000:]
    state = json.loads((out / "rounds.json").read_text())
    rounds = state["rounds"]
    assert 1 <= len(rounds) <= 3 and "stopped:" in proc.stdout
    if len(rounds) < 3:  # stops early only when the judge found nothing to fix
        assert rounds[-1]["errors"] == [] and "no discrepancy" in proc.stdout
    for r in rounds[1:]:
        prev = rounds[r["round"] - 2]
        for e in prev["errors"] or []:
            assert e["description"] in prev["critique"]  # what round r was told
    assert (out / "best.py").is_file() and (out / "report.html").is_file()
    bad = run_cli("refine", gt, "--task", "chart", "--out", out)
    assert bad.returncode == 2 and "--policy-url" in bad.stderr


@pytest.mark.slow
def test_critique_endpoint(served, gt):
    from .test_serve import _url

    s = served
    code, res = s.request(
        "POST",
        "/v1/critique",
        json.dumps({"gt": _url(gt), "code": GOOD, "max_errors": 2}).encode(),
    )
    assert code == 200, res
    assert res["render_error"] is None and res["judgement"]["task"] == "chart"
    assert res["reward"] == res["judgement"]["reward"]
    assert "```python" in res["revision_message"]
    code, res = s.request(
        "POST", "/v1/critique", json.dumps({"gt": _url(gt), "code": BROKEN}).encode()
    )
    assert code == 200 and res["judgement"] is None and res["reward"] == 0.0
    assert "did not render" in res["revision_message"]
    code, res = s.request("POST", "/v1/critique", json.dumps({"gt": _url(gt)}).encode())
    assert code == 400


def test_report_wraps_long_answers_in_chromium(gt, tmp_path):
    """A round whose answer is long (a description and a location without spaces, a code
    line of 3,000 characters) stays inside a 1400 px window: nothing runs off the page."""
    from verm_local.refine import write_report

    out = tmp_path / "long"
    (out / "round-01").mkdir(parents=True)
    (out / "round-01" / "code.py").write_text("x = '" + "y" * 3000 + "'\n")
    gt_bytes = Path(gt).read_bytes()
    (out / "round-01" / "render.png").write_bytes(gt_bytes)
    long_word = "bar_" * 600
    rounds = [
        {
            "round": 1,
            "reward": 1.2,
            "code_file": "round-01/code.py",
            "errors": [
                {"category": "data_error", "severity": 2, "location": long_word,
                 "description": "the third bar " + long_word + " is wrong " * 80},
            ],
        },
        {"round": 2, "reward": 0.0, "errors": [], "render_error": "Traceback: " + "z" * 2500},
    ]  # fmt: skip
    page = write_report(out, profile("chart"), gt_bytes, rounds, best=1)
    chromium = shutil.which("chromium") or shutil.which("google-chrome")
    if chromium is None:
        pytest.skip("no Chromium here (scripts/install.sh installs it)")
    # The page measures itself once laid out: its scroll width against the window's.
    probe = page.with_name("probe.html")
    probe.write_text(
        page.read_text().replace(
            "</body>",
            "<script>document.querySelectorAll('details').forEach(d => d.open = true);"
            "document.body.setAttribute('data-width', document.documentElement.scrollWidth + "
            "' ' + window.innerWidth)</script></body>",
        )
    )
    proc = subprocess.run(
        [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", f"--user-data-dir={tmp_path / 'prof'}",
         "--window-size=1400,900", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    import re

    found = re.search(r'data-width="(\d+) (\d+)"', proc.stdout)
    assert found, proc.stderr[-2000:]
    scroll, window = int(found.group(1)), int(found.group(2))
    assert window > 1000 and scroll <= window, (scroll, window)
