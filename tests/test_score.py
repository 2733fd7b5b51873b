"""VC-RewardBench scoring against results worked out by hand, case by case as the authors'
evaluation defines them (DESIGN.md section 2)."""

from __future__ import annotations

import json
import math

import pytest

from verm_local.benchmarks import score

from .conftest import serve_in_thread


def _e(t: str, sev=1, key: str = "type", desc: str = "d") -> dict:
    return {key: t, "severity": sev, "description": desc}


def _item(category="chart", preds=(), labels=(), **extra) -> dict:
    return {
        "id": extra.pop("id", 1),
        "category": category,
        "human_errors": list(labels),
        "pred_json": {"errors": list(preds)},
        **extra,
    }


def _reply(matches=(), **lists) -> str:
    body = {"matches": [{"pred_id": p, "gt_id": g, "match_level": lv} for p, g, lv in matches]}
    body.update(lists)
    return json.dumps(body)


def test_one_partial_match_out_of_one_is_a_perfect_soft_f1():
    item = _item(preds=[_e("data_error", key="category")], labels=[_e("data_error")])
    r = score.score_item(item, _reply([(0, 0, "partial")]))
    # No yes match, nothing unmatched: hard TP = FP = FN = 0 gives hard F1 1 by definition.
    assert r["overall"] == {
        "tp_hard": 0,
        "tp_soft": 0.5,
        "fp": 0,
        "fn": 0,
        "f1_hard": 1.0,
        "f1_soft": 1.0,
    }
    assert r["by_type"]["data_error"]["tp_soft"] == 0.5


def test_given_unmatched_lists_are_used_as_given_and_missing_ones_filled():
    preds = [_e("data_error"), _e("text_error"), _e("style_error")]
    labels = [_e("data_error"), _e("text_error")]
    item = _item(preds=preds, labels=labels)
    # A yes match (0, 0); the reply lists pred 1 as unmatched and both labels (label 0
    # although it is matched): the lists count as given.
    given = score.score_item(item, _reply([(0, 0, "yes")], unmatched_pred=[1], unmatched_gt=[0, 1]))
    assert (given["overall"]["fp"], given["overall"]["fn"]) == (1, 2)
    assert given["by_type"]["text_error"]["fn"] == 1 and given["by_type"]["data_error"]["fn"] == 1
    # Left out (or empty): the ids nothing matched.
    filled = score.score_item(item, _reply([(0, 0, "yes")], unmatched_pred=[]))
    assert (filled["overall"]["fp"], filled["overall"]["fn"]) == (2, 1)
    o = filled["overall"]
    assert o["f1_hard"] == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))


def test_bad_ids_and_levels_are_dropped_and_pairs_kept_one_to_one_in_reply_order():
    item = _item(preds=[_e("data_error")] * 3, labels=[_e("data_error")] * 3)
    reply = _reply(
        [
            ("0", 0, "yes"),  # not an integer
            (5, 0, "yes"),  # out of range
            (0, -1, "yes"),  # out of range
            (0.0, 1, "yes"),  # a float is not an integer
            (1, 1, "no"),  # not a match level
            (1, 1, "partial"),  # kept
            (1, 2, "yes"),  # pred 1 taken
            (2, 1, "yes"),  # label 1 taken
            (2, 2, "yes"),  # kept
        ]
    )
    r = score.score_item(item, reply)
    assert r["matches"] == [
        {"pred_id": 1, "gt_id": 1, "match_level": "partial"},
        {"pred_id": 2, "gt_id": 2, "match_level": "yes"},
    ]
    assert r["overall"]["tp_hard"] == 1 and r["overall"]["tp_soft"] == 1.5
    assert (r["overall"]["fp"], r["overall"]["fn"]) == (1, 1)  # pred 0 and label 0


def test_the_types_that_count():
    preds = [
        _e("data_error", key="category"),  # chart answers name it `category`
        _e("layout_error"),  # a table type: dropped for a chart
        {"severity": 2, "description": "no type"},  # dropped
    ]
    labels = [
        _e("text_error"),
        _e("style_error", key="category"),  # labels count by `type` only
    ]
    r = score.score_item(_item(preds=preds, labels=labels), _reply())
    assert r["counts"] == {"pred_error_num": 1, "gt_error_num": 1, "match_num": 0}
    assert (r["overall"]["fp"], r["overall"]["fn"]) == (1, 1)


def test_severity_sums_count_missing_and_odd_values_as_zero():
    preds = [
        _e("data_error", sev=3),
        _e("data_error", sev="2"),
        _e("text_error", sev=None),
        {"type": "style_error", "description": "no severity"},
        _e("style_error", sev="high"),
    ]
    r = score.score_item(_item(preds=preds), _reply())
    assert r["severity_pred"] == {
        "structure_error": 0.0,
        "data_error": 5.0,
        "text_error": 0.0,
        "style_error": 0.0,
        "__total__": 5.0,
    }


def test_empty_against_empty():
    r = score.score_item(_item(), "{}")
    assert r["overall"]["f1_hard"] == 1.0 and r["overall"]["f1_soft"] == 0.0
    summary = score.summarize([r], [])
    assert summary["overall"]["overall"]["f1_hard"] == 1.0
    assert summary["by_category"]["table"]["overall"]["f1_hard"] == 1.0  # no items at all
    assert summary["by_category"]["table"]["by_type"] == {}


@pytest.mark.parametrize(
    "reply",
    [
        "",  # the call failed
        "I cannot tell.",
        '{"matches": 3}',  # not a list
        '{"matches": ["0-0"]}',  # a match that is not an object
        '{"matches": [], "unmatched_pred": ["0"]}',  # an id that is not an index
        '{"matches": [], "unmatched_gt": [7]}',  # out of range
    ],
)
def test_an_unusable_reply_fails_the_item(reply):
    item = _item(preds=[_e("data_error")], labels=[_e("data_error")])
    with pytest.raises(score.ItemFailed):
        score.score_item(item, reply)


def test_a_fenced_reply_with_chatter_is_read():
    item = _item(preds=[_e("data_error")], labels=[_e("data_error")])
    text = "```json\n" + _reply([(0, 0, "yes")]) + "\n```"
    assert score.score_item(item, text)["overall"]["tp_hard"] == 1
    chatter = "Here you go: " + _reply([(0, 0, "yes")]) + " Hope this helps."
    assert score.score_item(item, chatter)["overall"]["f1_hard"] == 1.0


def test_micro_sums_per_task_overall_and_per_type():
    a = score.score_item(
        _item(
            preds=[_e("data_error"), _e("text_error"), _e("style_error")],
            labels=[_e("data_error"), _e("text_error")],
        ),
        _reply([(0, 0, "yes"), (1, 1, "partial")]),
    )  # hard 1, soft 1.5, fp 1 (style), fn 0
    b = score.score_item(
        _item(id=2, labels=[_e("data_error"), _e("structure_error")]), _reply()
    )  # fn 2
    t = score.score_item(
        _item(
            "table",
            id=3,
            preds=[_e("text_error")],
            labels=[_e("text_error"), _e("numeric_error")],
        ),
        _reply([(0, 0, "yes")]),
    )  # hard 1, fn 1
    s = score.summarize([a, b, t], [])
    chart = s["by_category"]["chart"]["overall"]
    assert (chart["tp_hard"], chart["tp_soft"], chart["fp"], chart["fn"]) == (1, 1.5, 1, 2)
    assert chart["f1_hard"] == pytest.approx(0.4)  # p 1/2, r 1/3
    assert chart["f1_soft"] == pytest.approx(0.5)  # p 1.5/2.5, r 1.5/3.5
    overall = s["overall"]["overall"]
    assert (overall["tp_hard"], overall["fp"], overall["fn"]) == (2, 1, 3)
    # text_error is a type of both tasks: its overall figure sums both.
    text = s["overall"]["by_type"]["text_error"]
    assert (text["tp_hard"], text["tp_soft"], text["fp"], text["fn"]) == (1, 1.5, 0, 0)
    assert s["by_category"]["chart"]["by_type"]["structure_error"]["fn"] == 1
    assert list(s["overall"]["by_type"]) == sorted(s["overall"]["by_type"])


def test_severity_correlation_per_type_task_and_overall():
    rows = [
        score.score_item(
            _item(id=i, preds=[_e("data_error", sev=p)], labels=[_e("data_error", sev=g)]),
            _reply(),
        )
        for i, (p, g) in enumerate([(1, 1), (2, 3), (3, 2)])
    ]
    corr = score.severity_correlation(rows)["by_category"]["chart"]
    assert corr["by_type"]["data_error"] == pytest.approx(0.5)  # r of (1,2,3) and (1,3,2)
    assert corr["total"] == pytest.approx(0.5)
    assert math.isnan(corr["by_type"]["text_error"])  # constant (all zero)
    one = score.severity_correlation(rows[:1])
    assert math.isnan(one["overall"]["total"])  # under two items


def test_failed_items_are_listed_and_left_out_of_the_table():
    good = score.score_item(_item(preds=[_e("data_error")], labels=[_e("data_error")]), "{}")
    failed = [{"id": 9, "idx": None, "category": "chart", "error": "not JSON"}]
    s = score.summarize([good], failed)
    assert s["errors"] == failed
    table = score.table_rows(s, [good], failed)
    chart = next(r for r in table if r["group"] == "chart")
    assert (chart["items"], chart["failed"]) == (1, 1)
    assert "| chart | 0.0 | 0.0 | n/a | 1 | 1 |" in score.markdown_table(table)


# ---------------------------------------------------------------- the matcher


FAKE_EVALUATION = '''import json

def call_api(query):
    return ""

def build_llm_prompt(category, allowed_types, pred_errors, gt_errors):
    pred_list = [{"pred_id": i, **e} for i, e in enumerate(pred_errors)]
    gt_list = [{"gt_id": i, **e} for i, e in enumerate(gt_errors)]
    prompt = f"""
FAKE matcher for {category} with types {allowed_types}; answer {{"matches": []}}.
PRED:
{json.dumps(pred_list, ensure_ascii=False, indent=2)}
GT:
{json.dumps(gt_list, ensure_ascii=False, indent=2)}
""".strip()
    return prompt
'''


@pytest.fixture
def mirror(tmp_path):
    """The authors' files at their pinned commits on a local server (a fake evaluation)."""
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from verm_local.prompts import MATCHER_SOURCE

    root = tmp_path / "mirror"
    f = root / MATCHER_SOURCE.commit / MATCHER_SOURCE.path
    f.parent.mkdir(parents=True)
    f.write_text(FAKE_EVALUATION)

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    serve_in_thread(server)
    yield f"http://127.0.0.1:{server.server_address[1]}", f
    server.shutdown()


def test_the_matcher_prompt_is_extracted_pinned_and_rendered(mirror, tmp_path):
    import hashlib

    from verm_local.benchmarks.matcher import matcher_prompt, render_prompt
    from verm_local.errors import FetchError
    from verm_local.prompts import fetch_matcher

    url, source = mirror
    home = tmp_path / "home"
    path = fetch_matcher(url, home=home)
    record = json.loads(path.read_text())
    assert record["source"]["file_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    prompt = matcher_prompt(home)
    assert prompt.comparable and prompt.source.startswith("authors (evaluation/evaluation.py@")
    assert record["sha256"] == prompt.template.sha256
    preds = [{"category": "data_error", "severity": 2, "location": "bar", "description": "4→5"}]
    text = render_prompt(prompt.template, "chart", preds, [])
    assert text.startswith("FAKE matcher for chart with types ['structure_error', 'data_error'")
    assert '{"matches": []}' in text  # the f-string's {{ }} are literal braces
    # The lists as the authors show them: id, type, description, severity; no location.
    shown = json.loads(text.split("PRED:\n", 1)[1].split("\nGT:")[0])
    assert shown == [{"pred_id": 0, "type": "data_error", "description": "4→5", "severity": 2}]
    assert "4→5" in text and text.endswith("[]")
    # A tampered store is ignored (built-in prompt, not comparable), with a warning.
    record["template"]["parts"][0][1] += "tampered"
    path.write_text(json.dumps(record))
    assert not matcher_prompt(home, warn=False).comparable
    # A file whose prompt fills in something unknown is refused; nothing is stored.
    source.write_text(FAKE_EVALUATION.replace("{category}", "{category.upper()}"))
    with pytest.raises(FetchError, match="not known here"):
        fetch_matcher(url, home=tmp_path / "other")
    assert not (tmp_path / "other").exists()


class MatcherLLM:
    """An OpenAI-compatible endpoint standing for the matcher LLM (these machines reach no
    remote one): it reads the two lists from the prompt and answers deterministically,
    pairing entries of the same type (yes when the descriptions agree, else partial). It
    counts calls, and answers 503 to the first `busy` of them."""

    def __init__(self, busy: int = 0):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.calls, self.busy, self.prompts = 0, busy, []
        llm = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                llm.calls += 1
                if llm.calls <= llm.busy:
                    self._send(503, {"error": {"message": "busy"}}, {"Retry-After": "0"})
                    return
                assert body["messages"][0] == {
                    "role": "system",
                    "content": "You are a helpful assistant.",
                }
                text = body["messages"][1]["content"][0]["text"]
                llm.prompts.append(text)
                answer = json.dumps(llm.answer(text))
                reply = {
                    "id": "m",
                    "object": "chat.completion",
                    "created": 0,
                    "model": body["model"],
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": "stop",
                            "message": {"role": "assistant", "content": answer},
                        }
                    ],
                }
                self._send(200, reply)

            def _send(self, code, obj, headers=None):
                data = json.dumps(obj).encode()
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        serve_in_thread(self.server)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    @staticmethod
    def lists(text: str) -> tuple[list, list]:
        decoder, found, i = json.JSONDecoder(), [], text.find("[")
        while i != -1:
            try:
                value, end = decoder.raw_decode(text, i)
            except ValueError:
                value, end = None, i + 1
            if isinstance(value, list) and (not value or isinstance(value[0], dict)):
                found.append(value)
                i = text.find("[", end)
            else:
                i = text.find("[", i + 1)
        return found[-2], found[-1]

    def answer(self, text: str) -> dict:
        preds, gts = self.lists(text)
        matches, used = [], set()
        for p in preds:
            for g in gts:
                if g["gt_id"] not in used and p["type"] == g["type"]:
                    level = "yes" if p["description"] == g["description"] else "partial"
                    matches.append(
                        {"pred_id": p["pred_id"], "gt_id": g["gt_id"], "match_level": level}
                    )
                    used.add(g["gt_id"])
                    break
        return {"matches": matches}

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _rows():
    d = lambda t, desc, sev=2: {"type": t, "severity": sev, "description": desc}  # noqa: E731
    return [
        {
            "id": "c1",
            "category": "chart",
            "human_errors": [d("data_error", "bar 2 is 4"), d("style_error", "blue bars")],
            "pred_json": {
                "errors": [{"category": "data_error", "severity": 3, "description": "bar 2 is 4"}]
            },
        },
        {
            "idx": 7,
            "category": "table",
            "human_errors": [d("text_error", "typo in row 1", 1)],
            "pred_json": {
                "errors": [{"type": "text_error", "severity": 1, "description": "a typo"}]
            },
        },
        {
            "id": "s1",
            "category": "svg",
            "human_errors": [d("shape_error", "circle")],
            "pred_json": None,
        },
        {"id": "x", "category": "poster", "human_errors": [], "pred_json": None},
    ]


def test_llm_matcher_over_http_with_retries_cache_and_failed_items(tmp_path):
    from verm_local.benchmarks.matcher import BUILT_IN, LLMMatcher, MatcherPrompt

    llm = MatcherLLM(busy=1)  # the first call answers 503: retried with backoff
    try:
        m = LLMMatcher(
            llm.url,
            "judge-matcher",
            prompt=MatcherPrompt(BUILT_IN, "built-in", False),
            cache_dir=tmp_path / "cache",
        )
        out = score.score_rows(_rows(), m, workers=1)
        assert out["skipped"] == 1 and out["failed_items"] == []
        overall = out["summary"]["overall"]["overall"]
        # chart: yes (1), fn 1 (style); table: partial; svg: null answer, fn 1.
        assert (overall["tp_hard"], overall["tp_soft"], overall["fp"], overall["fn"]) == (
            1,
            1.5,
            0,
            2,
        )
        assert llm.calls == 4  # 3 items, one 503 retried
        # Scored again: every reply comes from the cache, no call.
        again = score.score_rows(_rows(), m, workers=2)
        assert llm.calls == 4
        assert score.json_safe(again["summary"]) == score.json_safe(out["summary"])
    finally:
        llm.close()
    # The endpoint gone: each item fails and is listed; the run goes on.
    cold = LLMMatcher(
        llm.url,
        "other-model",
        prompt=MatcherPrompt(BUILT_IN, "built-in", False),
        retries=0,
        timeout=10,
    )
    gone = score.score_rows(_rows(), cold, workers=1)
    assert len(gone["failed_items"]) == 3 and gone["per_item_results"] == []
    assert {f["id"] for f in gone["failed_items"]} == {"c1", None, "s1"}


def test_lexical_matcher_is_not_comparable():
    from verm_local.benchmarks.matcher import LexicalMatcher

    m = LexicalMatcher()
    out = score.score_rows(_rows(), m)
    assert not m.comparable and out["failed_items"] == []
    c1 = next(r for r in out["per_item_results"] if r["id"] == "c1")
    assert c1["matches"] == [{"pred_id": 0, "gt_id": 0, "match_level": "yes"}]


def test_paired_bootstrap_difference():
    base = _item(preds=[_e("data_error")], labels=[_e("data_error")])
    yes = score.score_item(base, _reply([(0, 0, "yes")]))
    no = score.score_item(base, _reply())
    ref, cand = [yes] * 10, [yes] * 5 + [no] * 5
    diff = score.paired_difference(ref, cand, resamples=200, seed=1)
    f1 = diff["f1_hard"]
    # reference 100; candidate tp 5, fp 5, fn 5: 50.
    assert (f1["reference"], f1["candidate"], f1["value"]) == (100.0, 50.0, -50.0)
    assert f1["low"] < -50 < f1["high"] <= 0
    same = score.paired_difference(ref, ref, resamples=50)
    assert same["f1_hard"]["low"] == same["f1_hard"]["high"] == 0
    line = score.difference_line("Q4_K_M", diff)
    assert line.startswith("Q4_K_M: F1-hard -50.0 (") and "severity r n/a" in line
