"""The task profiles, the trained prompts (fetched from a local server that serves
made-up files of the authors' shape), the reward recipes and `judge --dry-run`: the
request, answer format, decoding and reward follow the authors' pipeline per task."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from verm_local.answer import answer_schema, bounds, schema_grammar
from verm_local.errors import FetchError
from verm_local.images import crop_to_content, prepare_image
from verm_local.prompts import extract_prompt, fetch_trained, resolve_prompt
from verm_local.reward import NEGATIVE_SEVERITY, RENDER_BASE, with_settings
from verm_local.schema import Judgement
from verm_local.tasks import PROFILES, decoding, profile

from .conftest import run_cli, run_here, serve_in_thread

# ---------------------------------------------------------------- profiles


def test_chart_and_svg_profiles_are_the_rl_pipeline():
    for task in ("chart", "svg"):
        p = profile(task)
        assert p.system is None and p.text_prefix == ""
        assert p.gt.max_side == p.pred.max_side == 1024
        assert p.gt.encoding == p.pred.encoding == "jpeg" and not p.pred.crop
        assert p.error_keys == ("category", "severity", "location", "description")
        assert p.max_tokens == 4096 and p.reward.kind == "render_base"
        rl = decoding(profile(task), "rl")
        assert (rl.temperature, rl.top_p, rl.top_k, rl.presence_penalty, rl.max_tokens) == (
            0.7,
            0.8,
            20,
            1.5,
            4096,
        )
        assert rl.repeat_penalty == 1.0
        judging = decoding(profile(task))
        assert judging.greedy and judging.max_tokens == 4096 and judging.presence_penalty == 0


def test_table_profile_is_the_table_pipeline():
    p = profile("table")
    assert p.system == "You are a helpful assistant."
    assert p.text_prefix == "<image>\n<image>\n"
    assert (p.gt.max_side, p.gt.encoding, p.gt.crop) == (768, "png", False)
    assert (p.pred.max_side, p.pred.encoding, p.pred.crop, p.pred.crop_padding) == (
        768,
        "png",
        True,
        12,
    )
    assert p.error_keys == ("type", "description", "severity") and not p.has_location
    assert p.count_keys == ("layout_error_count", "text_error_count", "numeric_error_count")
    for mode in ("default", "rl"):
        d = decoding(profile("table"), mode)
        assert (d.temperature, d.repeat_penalty, d.max_tokens) == (0.0, 1.05, 8192)
    assert p.reward.kind == "negative_severity"


@pytest.mark.parametrize("task", list(PROFILES))
def test_answer_schema_has_the_trained_keys_in_order(task):
    p = profile(task)
    schema = answer_schema(p)
    assert list(schema["properties"]) == [*p.count_keys, "errors"]
    item = schema["properties"]["errors"]["items"]
    assert list(item["properties"]) == list(p.error_keys)
    assert item["properties"][p.category_key]["enum"] == list(p.categories)
    assert ("location" in item["properties"]) == (task != "table")


@pytest.mark.parametrize(
    "task,cap",
    [
        ("chart", 4096),
        ("svg", 4096),
        ("table", 8192),
        ("chart", 1024),
        ("table", 400),
        ("svg", 300),
    ],
)
def test_the_longest_allowed_answer_fits_the_cap(task, cap):
    """Write the longest answer the grammar allows (every bound at its maximum, the widest
    whitespace) and count its characters: at one token per character, it fits."""
    p = profile(task)
    b = bounds(p, cap)
    assert b.max_errors >= (1 if cap >= 400 else 0)  # at 300 not even one item fits
    ws = "\n" + " " * 12
    value = {p.category_key: f'"{max(p.categories, key=len)}"', "severity": "3"}
    item = (
        "{"
        + ",".join(
            f'{ws}"{k}": ' + (value[k] if k in value else '"' + "x" * b.lengths[k] + '"')
            for k in p.error_keys
        )
        + ws
        + "}"
    )
    counts = ",".join(f'{ws}"{k}": 99' for k in p.count_keys)
    longest = (
        "{"
        + counts
        + ","
        + ws
        + '"errors": ['
        + ",".join(ws + item for _ in range(b.max_errors))
        + ws
        + "]"
        + ws
        + "}"
    )
    assert len(longest) <= cap
    json.loads(longest)
    # ... and the grammar takes exactly that shape (llama.cpp's parser is checked in e2e).
    assert schema_grammar(answer_schema(p, cap)) is not None


def test_bounds_shrink_with_a_smaller_cap_and_a_caller_cap():
    chart, table = profile("chart"), profile("table")
    assert bounds(chart, 4096).max_errors > bounds(chart, 1024).max_errors >= 1
    assert bounds(table, 8192).lengths["description"] == 256
    small = bounds(chart, 400, 2)
    assert small.max_errors in (1, 2) and small.lengths["description"] < 136
    assert bounds(chart, 4096, 3).max_errors == 3
    assert bounds(chart, 4096, 0).max_errors == 0


# ---------------------------------------------------------------- images


def _table_render(path: Path, size=(1200, 900), box=(300, 200, 700, 500)) -> Path:
    img = Image.new("RGB", size, (250, 250, 250))
    ImageDraw.Draw(img).rectangle(box, outline="black", width=3)
    img.save(path)
    return path


def test_table_prediction_is_cropped_then_thumbnailed(tmp_path):
    p = profile("table")
    pred = prepare_image(_table_render(tmp_path / "render.png"), p.pred)
    # Content 400x300 (plus the 3 px line) with 12 px padding, then within 768.
    assert pred.sent_size == (401 + 24, 301 + 24)
    assert pred.encoding == "png" and pred.encoded[:4] == b"\x89PNG"
    assert all(s % 32 == 0 for s in pred.size)
    gt = prepare_image(_table_render(tmp_path / "gt.png", size=(1600, 1000)), p.gt)
    assert max(gt.sent_size) == 768 and gt.sent_size == (768, 480)
    same = Image.new("RGB", (50, 40), "white")
    assert crop_to_content(same).size == (50, 40)


def test_chart_images_are_jpeg_within_1024(tmp_path):
    src = tmp_path / "big.png"
    Image.new("RGB", (2048, 1536), "white").save(src)
    img = prepare_image(src, profile("chart").gt)
    assert img.sent_size == (1024, 768) and img.size == (1024, 768)
    assert img.encoding == "jpeg" and img.encoded[:3] == b"\xff\xd8\xff"
    assert img.visual_tokens == 32 * 24


# ---------------------------------------------------------------- rewards


def test_reward_recipes():
    assert RENDER_BASE.reward(0) == 2.0 and RENDER_BASE.reward(25) == 1.5
    assert RENDER_BASE.reward(80) == 1.0 and RENDER_BASE.rm_reward(25) == 0.5
    assert RENDER_BASE.unreadable() == 1.5  # S = 25 after the tries
    assert RENDER_BASE.unrendered() == 0.0
    assert NEGATIVE_SEVERITY.reward(7) == -7.0 and NEGATIVE_SEVERITY.unreadable() == -4.0
    assert NEGATIVE_SEVERITY.unrendered() == -4.0


def test_reward_constants_are_settings(monkeypatch):
    monkeypatch.setenv("VERM_LOCAL_RENDER_FAIL_REWARD", "-1")
    monkeypatch.setenv("VERM_LOCAL_PARSE_FAIL_SEVERITY", "50")
    monkeypatch.setenv("VERM_LOCAL_TABLE_FAIL_REWARD", "-10")
    monkeypatch.setenv("VERM_LOCAL_REWARD_SCALE", "100")
    r = with_settings(RENDER_BASE)
    assert r.unrendered() == -1.0 and r.unreadable() == 1.5 and r.reward(50) == 1.5
    assert with_settings(NEGATIVE_SEVERITY).unreadable() == -10.0


def test_judgements_carry_the_recipe():
    chart = Judgement.from_answer(
        profile("chart"),
        {
            "errors": [
                {"category": "data_error", "severity": 3, "location": "a", "description": "b"}
            ]
        },
    )
    assert (chart.reward, chart.rm_reward, chart.score) == (1.94, 0.94, 0.94)
    table = Judgement.from_answer(
        profile("table"),
        {"errors": [{"type": "numeric_error", "description": "1.5 became 15", "severity": 2}]},
    )
    assert table.reward == -2.0 and table.errors[0].location is None
    assert "location" not in table.model_dump()["errors"][0]
    cut = Judgement.failed(profile("chart"), "cut at 4096 tokens")
    assert not cut.complete and cut.errors == [] and cut.total_severity == 25
    assert cut.reward == 1.5
    assert Judgement.failed(profile("table"), "unreadable").reward == -4.0


# ---------------------------------------------------------------- trained prompts

# Made-up files of the authors' shape (not their text): module constants, an older
# version commented out beside the live one, and a function that returns its prompt.
FAKE_RL = '''"""made-up reward utilities"""
import os

# PROMPT_CHART2CODE_JUDGEMENT = """an older chart prompt"""

PROMPT_CHART2CODE_JUDGEMENT = """\\
FAKE chart prompt: compare the charts. Report structure_error, data_error, text_error and
style_error as structure_error_count, data_error_count, text_error_count, style_error_count.
"""

PROMPT_IMG2SVG_JUDGEMENT = """\\
FAKE svg prompt: structure_error shape_error style_error text_symbol_error with
structure_error_count shape_error_count style_error_count text_symbol_error_count.
"""

def helper():
    return os.getenv("X")
'''

FAKE_TABLE = '''import re

# def build_error_prompt_for_images() -> str:
#     return "older"

def build_error_prompt_for_images() -> str:
    prompt = """
FAKE table prompt: layout_error text_error numeric_error, counted as layout_error_count,
text_error_count and numeric_error_count.
"""
    return prompt
'''


@pytest.fixture
def prompt_server(tmp_path):
    from verm_local.prompts import MATCHER_SOURCE
    from verm_local.tasks import PROFILES as P

    from .test_score import FAKE_EVALUATION

    root = tmp_path / "mirror"
    for p in P.values():
        f = root / p.prompt.commit / p.prompt.path
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(FAKE_TABLE if p.name == "table" else FAKE_RL)
    f = root / MATCHER_SOURCE.commit / MATCHER_SOURCE.path
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(FAKE_EVALUATION)
    handler = functools.partial(_Quiet, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    serve_in_thread(server)
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *a):
        pass


def test_prompts_are_fetched_extracted_and_stored_with_sha256(prompt_server, tmp_path):
    url, root = prompt_server
    home = tmp_path / "home"
    path = fetch_trained(url, home=home)
    record = json.loads(path.read_text())
    assert set(record["prompts"]) == {"chart", "table", "svg"}
    chart = record["prompts"]["chart"]
    assert chart["text"].startswith("FAKE chart prompt") and "older" not in chart["text"]
    assert chart["sha256"] == hashlib.sha256(chart["text"].encode()).hexdigest()
    src = profile("chart").prompt
    assert chart["source"]["url"] == f"{url}/{src.commit}/{src.path}"
    assert chart["source"]["commit"] == src.commit and chart["source"]["name"] == src.name
    raw = (root / src.commit / src.path).read_bytes()
    assert chart["source"]["file_sha256"] == hashlib.sha256(raw).hexdigest()
    table = record["prompts"]["table"]["text"]
    assert table.startswith("\nFAKE table prompt")  # the returned string, as it is
    p = resolve_prompt(profile("table"), home=home)
    assert p.source == "trained" and p.text == table
    # A prompt file still wins.
    f = tmp_path / "p.txt"
    f.write_text("mine")
    assert resolve_prompt(profile("table"), f, home=home).source == f"file:{f}"


def test_a_file_without_the_prompt_is_refused_and_nothing_is_stored(prompt_server, tmp_path):
    url, root = prompt_server
    src = profile("svg").prompt
    broken = FAKE_RL.replace("PROMPT_IMG2SVG_JUDGEMENT = ", "PROMPT_IMG2SVG_RENAMED = ")
    (root / src.commit / src.path).write_text(broken)
    home = tmp_path / "home"
    with pytest.raises(FetchError, match="PROMPT_IMG2SVG_JUDGEMENT"):
        fetch_trained(url, home=home)
    assert not (home / "prompts").exists()
    with pytest.raises(FetchError, match="build_error_prompt_for_images"):
        extract_prompt("def other():\n    return 'x'\n", profile("table").prompt)
    with pytest.raises(FetchError, match="not valid Python"):
        extract_prompt("def broken(:\n", profile("table").prompt)


def test_offline_falls_back_to_built_in_prompts_with_a_warning(tmp_path, caplog):
    from verm_local import prompts

    prompts._warned.clear()
    with caplog.at_level(logging.WARNING, logger="verm_local"):
        p = resolve_prompt(profile("chart"), home=tmp_path / "empty")
    assert p.source == "built-in"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "pull --prompts-only" in warnings[0]
    with pytest.raises(FetchError, match="cannot fetch"):
        fetch_trained("http://127.0.0.1:9", home=tmp_path / "h", timeout=2)


def test_tampered_store_prompts_are_ignored(prompt_server, tmp_path):
    url, _ = prompt_server
    home = tmp_path / "home"
    path = fetch_trained(url, home=home)
    record = json.loads(path.read_text())
    record["prompts"]["chart"]["text"] += " (edited)"
    path.write_text(json.dumps(record))
    assert resolve_prompt(profile("chart"), home=home, warn=False).source == "built-in"


# ---------------------------------------------------------------- the CLI


def _dry_run(*args, env=None):
    proc = run_here("judge", *args, "--dry-run", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_dry_run_shows_the_table_request(tmp_path):
    gt = _table_render(tmp_path / "gt.png", size=(1600, 1200))
    pred = _table_render(tmp_path / "pred.png")
    out = _dry_run(gt, pred, "--task", "table")
    system, user = out["messages"]
    assert system == {"role": "system", "content": "You are a helpful assistant."}
    images = [p for p in user["content"] if p["type"] == "image"]
    text = [p for p in user["content"] if p["type"] == "text"]
    assert [p["type"] for p in user["content"]] == ["image", "image", "text"]
    assert all(max(i["sent_size"]) <= 768 and i["encoding"] == "png" for i in images)
    assert images[0]["source"] == str(gt) and images[1]["source"] == str(pred)
    assert text[0]["text"].startswith("<image>\n<image>\n")
    item = out["schema"]["properties"]["errors"]["items"]["properties"]
    assert list(item) == ["type", "description", "severity"]
    assert out["decoding"]["repeat_penalty"] == 1.05 and out["decoding"]["max_tokens"] == 8192
    assert out["prompt_source"] in ("built-in", "trained")


@pytest.mark.parametrize("task", ["chart", "svg"])
def test_dry_run_shows_the_chart_and_svg_request(tmp_path, task):
    big = tmp_path / "big.png"
    Image.new("RGB", (2400, 1000), "white").save(big)
    out = _dry_run(big, big, "--task", task, "--sampling", "rl")
    assert [m["role"] for m in out["messages"]] == ["user"]
    images = [p for p in out["messages"][0]["content"] if p["type"] == "image"]
    assert all(max(i["sent_size"]) <= 1024 and i["encoding"] == "jpeg" for i in images)
    item = out["schema"]["properties"]["errors"]["items"]["properties"]
    assert list(item) == ["category", "severity", "location", "description"]
    d = out["decoding"]
    assert (d["temperature"], d["top_p"], d["top_k"], d["presence_penalty"]) == (0.7, 0.8, 20, 1.5)
    text = _dry_run(big, big, "--task", task)
    assert text["decoding"]["temperature"] == 0.0 and text["decoding"]["max_tokens"] == 4096


def test_pull_prompts_then_dry_run_uses_them(prompt_server, tmp_path, pair):
    url, _ = prompt_server
    env = {"VERM_LOCAL_HOME": str(tmp_path / "home"), "VERM_LOCAL_PROMPTS_URL": url}
    proc = run_cli("pull", "--prompts-only", env=env)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).is_file()
    out = _dry_run(*pair, "--task", "svg", env=env)
    assert out["prompt_source"] == "trained"
    assert out["messages"][0]["content"][-1]["text"].startswith("FAKE svg prompt")
    matcher = Path(proc.stdout.strip()).with_name("matcher.json")  # the benchmark's matcher
    assert json.loads(matcher.read_text())["source"]["name"] == "build_llm_prompt"
    table = _dry_run(*pair, "--task", "table", env=env)
    assert table["messages"][1]["content"][-1]["text"].startswith("<image>\n<image>\n\nFAKE")
    bad = run_cli(
        "pull", "--prompts-only", env={**env, "VERM_LOCAL_PROMPTS_URL": "http://127.0.0.1:9"}
    )
    assert bad.returncode == 6 and "cannot fetch" in bad.stderr
