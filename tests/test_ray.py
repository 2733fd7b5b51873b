"""Past one machine on Ray: `serve --replicas` behind one URL (no request lost while a
replica is killed), `judge --pairs --ray` equal to the local run on a two-node cluster
(`ray.cluster_utils.Cluster`, started once for this file), and the RL integrations
(verl, OpenRLHF, TRL) against a served tiny model."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from .conftest import draw_chart, run_cli

ray = pytest.importorskip("ray", reason="the ray extra (scripts/install.sh installs it)")
pytestmark = pytest.mark.slow

CHART = "```python\nimport matplotlib.pyplot as plt\nplt.bar([0, 1, 2, 3], [3, 5, 2, 6])\n```"


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes on this machine, started once for this file's tests (the only ones
    that use it) and stopped after them: an idle two-node cluster with its dashboard takes
    about 8% of a CPU, which the rest of a session would pay for nothing."""
    from ray.cluster_utils import Cluster

    c = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "include_dashboard": True},  # replica pids
    )
    c.add_node(num_cpus=2)
    c.wait_for_nodes()
    yield c
    c.shutdown()


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("raypairs")
    gts = [draw_chart(root / f"gt{g}.png", [3, 5, 2, 6][g:] + [1] * g) for g in range(2)]
    rows = []
    for i in range(6):
        pred = draw_chart(root / f"p{i}.png", [3, 4 + i % 3, 2, 6], colour="orange")
        rows.append({"gt": gts[i % 2].name, "pred": pred.name, "id": f"r{i}"})
    f = root / "pairs.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def _judge_pairs(tiny_gguf, pairs, out, *extra):
    return run_cli(
        "judge", "--pairs", pairs, "--out", out, "-m", tiny_gguf / "model-Q8_0.gguf",
        "--vision", "gguf", "--image-tokens", "64", "--max-tokens", "300", "--max-errors", "2",
        "--parallel", "2", *extra, timeout=900,
    )  # fmt: skip


def test_judge_pairs_on_ray_data_equals_the_local_run(tiny_gguf, pairs_file, cluster, tmp_path):
    local, on_ray = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    proc = _judge_pairs(tiny_gguf, pairs_file, local)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = _judge_pairs(
        tiny_gguf, pairs_file, on_ray, "--ray-address", cluster.address, "--ray-actors", "2"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    def judged(path: Path) -> list[tuple]:
        rows = [json.loads(ln) for ln in path.read_text().splitlines()]
        return [(r["id"], r["line"], r["errors"], r["reward"], r["complete"]) for r in rows]

    assert judged(on_ray) == judged(local) and len(judged(local)) == 6
    # Resumable: a lost line is judged again, the others are kept.
    lines = on_ray.read_text().splitlines()
    on_ray.write_text("\n".join(lines[:4]) + "\n")
    proc = _judge_pairs(tiny_gguf, pairs_file, on_ray, "--ray-address", cluster.address, "--ray")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert judged(on_ray) == judged(local)


@pytest.fixture(scope="module")
def replicas(tiny_gguf, cluster):
    """`verm-local serve --replicas 2` joined to the session's cluster."""
    from .test_serve import Served

    s = Served(
        tiny_gguf, "--replicas", "2", "--ray-address", cluster.address, "--parallel", "2",
        "--replica-cpus", "1", startup=600,
    )  # fmt: skip
    yield s
    s.stop()


def test_no_request_is_lost_when_a_replica_dies(replicas, tmp_path):
    """8 clients x 6 judge-shaped requests; one replica process is killed midway. Each
    answer is cut at 64 tokens (random weights ramble): what is checked is that every
    request is answered, so requests stay short and the kill still finds some in flight."""
    from .test_serve import _url

    gts = [draw_chart(tmp_path / f"g{i}.png", [i + 1, 3, 2, 5]) for i in range(4)]
    preds = [draw_chart(tmp_path / f"p{i}.png", [2, 3, i + 1, 5], colour="red") for i in range(6)]
    health = replicas.get("/health")
    pids = [r["pid"] for r in health["replicas"]]
    assert len(pids) == 2, health
    results: list[int] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        for k in range(6):
            body = {"gt": _url(gts[c % 4]), "pred": _url(preds[k]), "max_errors": 2,
                    "max_tokens": 64}  # fmt: skip
            code, _ = replicas.request("POST", "/v1/judge", json.dumps(body).encode())
            with lock:
                results.append(code)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(8)]
    for t in threads:
        t.start()
    while len(results) < 8:  # midway: requests in flight on both replicas
        time.sleep(0.2)
    os.kill(pids[0], signal.SIGKILL)
    for t in threads:
        t.join(600)
    assert len(results) == 48 and results.count(200) == 48, results
    # Ray replaces the dead replica.
    deadline = time.time() + 300
    while time.time() < deadline:
        alive = [r["pid"] for r in replicas.get("/health")["replicas"]]
        if len(alive) == 2 and pids[0] not in alive:
            break
        time.sleep(2)
    assert len(alive) == 2 and pids[0] not in alive


def test_rl_integrations_against_a_served_model(served, tmp_path, monkeypatch):
    """verl's async compute_score, OpenRLHF's reward_func file and TRL's async reward
    function, each against `verm-local serve` with the tiny model (the session's server,
    which wants an API key: the integrations send VERM_LOCAL_API_KEY)."""
    from verm_local import integrations
    from verm_local.errors import EndpointError
    from verm_local.integrations import openrlhf, trl, verl

    gt = draw_chart(tmp_path / "gt.png", [3, 5, 2, 6])
    monkeypatch.setenv("VERM_LOCAL_REWARD_URL", served.base)
    integrations.client.cache_clear()
    try:
        with pytest.raises(EndpointError, match="401"):  # no key: refused, never a reward
            asyncio.run(verl.compute_score("chart2code", CHART, str(gt)))
        monkeypatch.setenv("VERM_LOCAL_API_KEY", "k")
        integrations.client.cache_clear()
        score = asyncio.run(verl.compute_score("chart2code", CHART, str(gt)))
        assert 1.0 <= score <= 2.0  # rendered: 1 + clip(1 - S/50)
        assert asyncio.run(verl.compute_score("chart2code", "no code here", str(gt))) == 0.0
        label = json.dumps({"gt": str(gt), "task": "chart"})
        rewards = openrlhf.reward_func(["P" + CHART, "Pnothing"], ["P", "P"], [label, label])
        values = [float(x) for x in rewards]
        assert 1.0 <= values[0] <= 2.0 and values[1] == 0.0
        completions = [[{"role": "assistant", "content": CHART}], "plain words"]
        got = asyncio.run(
            trl.visual_erm_reward(
                ["p", "p"], completions, gt_image=[str(gt)] * 2, task=["chart"] * 2
            )
        )
        assert 1.0 <= got[0] <= 2.0 and got[1] == 0.0
    finally:
        integrations.client.cache_clear()
