"""`verm-local bench serve`: verm-local's serving engine against llama.cpp's own
`llama-server` (built from the sdist the runtime came from), on the same model and the
same load, one engine after the other in one run.

The load: `clients` concurrent clients send `requests` chat completions in all, in
rounds of one request per client. Workloads:

- `shared`: each round's requests share one ground truth (an RL step's rollouts against
  one reference); answers forced to `answer_tokens` tokens (ignore_eos), so both engines
  decode the same number of tokens;
- `independent`: every request has its own ground truth, answers forced alike;
- `schema`: as `shared`, answers constrained by the chart answer schema and ending where
  the model ends them (the judging workload, lengths may differ between engines).

Each request is the chart task's request as the authors send it (one user turn: two JPEG
images and the prompt). The report gives each engine's wall time per workload and the
ratio verm-local / llama-server (below 1: verm-local is faster)."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import httpx
import numpy as np

from verm_local import net
from verm_local.errors import InputError, VermError

from .markdown import table_head

log = logging.getLogger(__name__)

WORKLOADS = ("shared", "independent", "schema")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _images(n_gt: int, n_pred: int, size: tuple[int, int]) -> tuple[list, list]:
    """`n_gt` distinct chart references and, per reference, `n_pred` predictions of it,
    each with its own injected error (the benchmarks' one generator, `data.py`)."""
    import random

    from .data import prediction_group

    gts, preds = [], []
    for g in range(n_gt):  # every reference distinct: nothing can be reused across them
        gt, group = prediction_group("chart", random.Random(g), n_pred, size)
        gts.append(gt)
        preds.append(group)
    return gts, preds


def _data_url(png: bytes) -> str:
    """The image as the authors' client sends it for charts: thumbnailed, JPEG."""
    from verm_local.images import data_url, prepare_image
    from verm_local.tasks import profile

    return data_url(prepare_image(png, profile("chart").gt))


def build_load(
    workload: str, clients: int, requests: int, answer_tokens: int, size: tuple[int, int]
) -> list[list[dict[str, Any]]]:
    """Per client, its request bodies in order (round r is every client's r-th)."""
    from verm_local.answer import answer_schema
    from verm_local.prompts import resolve_prompt
    from verm_local.tasks import profile

    chart = profile("chart")  # the load is the chart task's requests
    rounds = -(-requests // clients)
    shared = workload != "independent"
    gts, preds = _images(rounds if shared else rounds * clients, clients, size)
    prompt = resolve_prompt(chart, warn=False).text
    urls_gt = [_data_url(g) for g in gts]
    per_client: list[list[dict[str, Any]]] = [[] for _ in range(clients)]
    n = 0
    for r in range(rounds):
        for c in range(clients):
            if n == requests:
                break
            g = r if shared else r * clients + c
            content = [
                {"type": "image_url", "image_url": {"url": urls_gt[g]}},
                {"type": "image_url", "image_url": {"url": _data_url(preds[g][c])}},
                {"type": "text", "text": prompt},
            ]
            body: dict[str, Any] = {
                "model": "judge",
                "messages": [{"role": "user", "content": content}],
                "temperature": 0.0,
                "max_tokens": answer_tokens,
                "seed": n,
            }
            if workload == "schema":
                body["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "answer",
                        "schema": answer_schema(chart, answer_tokens),
                    },
                }
            else:
                body["ignore_eos"] = True
            per_client[c].append(body)
            n += 1
    return per_client


def post_json(url: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One request of a measured load: not retried (a retry would hide a failure and
    time two requests as one); httpx errors propagate."""
    return net.post_json(url, body, timeout=timeout, policy=net.NO_RETRY)


def concurrently(fn: Callable[[Any], None], items: list[Any]) -> float:
    """Call `fn(item)` for every item at once (a thread each); the wall seconds. An
    exception in any call fails the measurement: it is raised here once all are done."""
    from concurrent.futures import ThreadPoolExecutor

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max(1, len(items))) as pool:
        futures = [pool.submit(fn, item) for item in items]
    wall = time.perf_counter() - t0
    for f in futures:
        f.result()  # re-raises the first failure
    return wall


def drive(base: str, load: list[list[dict[str, Any]]], timeout: float = 1800) -> dict[str, Any]:
    """Run the load (one thread per client); wall time, tokens, failures, latencies."""
    results: list[tuple[float, int, str]] = []
    lock = threading.Lock()

    def client(bodies: list[dict[str, Any]]) -> None:
        for body in bodies:
            t0 = time.perf_counter()
            try:
                out = post_json(base + "/v1/chat/completions", body, timeout)
                tokens, problem = int(out["usage"]["completion_tokens"]), ""
            except (httpx.HTTPError, KeyError, ValueError) as exc:
                tokens, problem = 0, f"{exc.__class__.__name__}: {exc}"
            with lock:
                results.append((time.perf_counter() - t0, tokens, problem))

    wall = concurrently(client, load)
    lat = [r[0] for r in results]
    p50, p95 = np.percentile(lat, [50, 95]) if lat else (0.0, 0.0)
    failed = [r[2] for r in results if r[2]]
    return {
        "wall_s": wall,
        "requests": len(results),
        "failed": len(failed),
        "first_failure": failed[0] if failed else "",
        "completion_tokens": sum(r[1] for r in results),
        "p50_s": float(p50),
        "p95_s": float(p95),
    }


class ServerProcess:
    """A server process on a free port; stopped (and reaped) on exit."""

    def __init__(self, cmd: list[str], port: int, health: str, what: str):
        self.port, self.what = port, what
        self.base = f"http://127.0.0.1:{port}"
        self.log = Path(__import__("tempfile").mkstemp(prefix="bench-serve-", suffix=".log")[1])
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(self.log, "w"))  # noqa: SIM115
        deadline = time.time() + 600
        while time.time() < deadline:
            if self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
                raise VermError(f"{what} exited before it served ({tail[0]})")
            try:
                r = net.request("GET", self.base + health, timeout=5, policy=net.NO_RETRY)
                if r.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise VermError(f"{what} did not come up in 10 minutes")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.unlink(missing_ok=True)


def run_serve_bench(
    model: str,
    *,
    workloads: list[str],
    clients: int = 8,
    requests: int = 32,
    answer_tokens: int = 128,
    parallel: int = 8,
    threads: int | None = None,
    image_size: tuple[int, int] = (512, 384),
    llama_server: Path | None = None,
    repack: bool | None = None,
    replicas: int = 1,
    ray_address: str | None = None,
    deterministic: bool | None = None,
) -> dict[str, Any]:
    """Both engines, one after the other, on each workload; the report (`deterministic`:
    verm-local's batch-invariant decoding, default where it holds). With `replicas`
    > 1 the two are `serve --replicas N` on Ray with ground-truth affinity and with Ray's
    own routing (`--no-affinity`), the same load."""

    from verm_local.backends.llamacpp import path_choice
    from verm_local.convert.llama_sources import llama_server as build_llama_server
    from verm_local.hardware import default_threads, probe
    from verm_local.modelref import resolve_model
    from verm_local.select import context_size

    bad = [w for w in workloads if w not in WORKLOADS]
    if bad:
        raise InputError(f"unknown workload {bad[0]!r}; choose from {', '.join(WORKLOADS)}")
    resolved = resolve_model(model)
    if resolved.format != "gguf":
        raise InputError(f"{model}: bench serve compares GGUF models on llama.cpp engines")
    hw = probe(with_torch=False)
    threads = threads or default_threads()  # VERM_LOCAL_THREADS, else hw.threads
    det, use_repack, _ = path_choice(repack, resolved.quant, deterministic)
    binary = llama_server or (build_llama_server() if replicas == 1 else None)
    tokens = -(-image_size[0] // 32) * -(-image_size[1] // 32)
    n_ctx = context_size(tokens, answer_tokens)
    report: dict[str, Any] = {
        "model": {
            "path": str(resolved.path),
            "quant": resolved.quant,
            "mmproj": str(resolved.mmproj),
        },
        "settings": {
            "clients": clients,
            "requests": requests,
            "answer_tokens": answer_tokens,
            "parallel": parallel,
            "threads": threads,
            "image_size": list(image_size),
            "repack": use_repack,
            "deterministic": det.on,
            "llama_server": str(binary) if binary else None,
            "replicas": replicas,
        },
        "machine": {
            "cpu": hw.cpu_model,
            "threads": hw.cores_logical,
            "ram_gb": round(hw.ram_total / 1e9, 1),
        },
        "workloads": {},
    }
    loads = {w: build_load(w, clients, requests, answer_tokens, image_size) for w in workloads}
    verm = [
        sys.executable,
        "-m",
        "verm_local.cli",
        "serve",
        "-m",
        str(resolved.path),
        "--vision",
        "gguf",
        "--parallel",
        str(parallel),
        "--threads",
        str(threads if replicas == 1 else max(1, threads // replicas)),
        "--max-tokens",
        str(answer_tokens),
        "--image-tokens",
        str(tokens),
        "--repack" if use_repack else "--no-repack",
        "--deterministic" if det.on else "--no-deterministic",
        "--queue",
        str(max(64, requests)),
    ]
    if replicas > 1:
        on_ray = [*verm, "--replicas", str(replicas), "--replica-cpus", "1"]
        on_ray += ["--ray-address", ray_address] if ray_address else []
        engines = {"affinity": on_ray, "ray-routing": [*on_ray, "--no-affinity"]}
    else:
        engines = {
            "verm-local": verm,
            "llama-server": [
                str(binary),
                "-m",
                str(resolved.path),
                "--mmproj",
                str(resolved.mmproj),
                "-np",
                str(parallel),
                "-c",
                str(n_ctx * parallel),
                "-t",
                str(threads),
                "-tb",
                str(threads),
                "--host",
                "127.0.0.1",
                "--no-webui",
                "--image-max-tokens",
                str(tokens),
                *([] if use_repack else ["--no-repack"]),
            ],
        }
    report["engines"] = list(engines)
    for name, cmd in engines.items():
        port = free_port()
        cmd = cmd + ["--port", str(port)]
        log.info("bench serve: starting %s", name)
        server = ServerProcess(cmd, port, "/health", name)
        try:
            for w, load in loads.items():
                log.info(
                    "bench serve: %s, %s workload, %d clients x %d requests",
                    name,
                    w,
                    clients,
                    requests,
                )
                drive(server.base, [load[0][:1]])  # warm-up: one request
                result = drive(server.base, load)
                report["workloads"].setdefault(w, {})[name] = result
        finally:
            server.stop()
    first, second = report["engines"]
    for r in report["workloads"].values():
        a, b = r.get(first), r.get(second)
        if not (a and b):
            continue
        bad = [f"{name}: {x['failed']} of {x['requests']} failed ({x['first_failure']})"
               for name, x in ((first, a), (second, b)) if x.get("failed")]  # fmt: skip
        if bad:  # a side that did not answer everything has no comparable wall time
            r["ratio"] = None
            r["not_compared"] = "; ".join(bad)
        elif b["wall_s"] > 0:
            r["ratio"] = a["wall_s"] / b["wall_s"]
    return report


def markdown(report: dict[str, Any]) -> str:
    s, m = report["settings"], report["machine"]
    first, second = report.get("engines", ["verm-local", "llama-server"])
    title = (
        f"serve --replicas {s['replicas']}: ground-truth affinity vs Ray's own routing"
        if first == "affinity"
        else "verm-local serve vs llama-server"
    )
    lines = [
        f"# {title} ({m['cpu']}, {s['threads']} threads; {report['model']['quant']})",
        "",
        f"{s['clients']} clients x {s['requests']} requests, {s['parallel']} parallel, "
        f"images {s['image_size'][0]}x{s['image_size'][1]}, answers "
        f"{s['answer_tokens']} tokens (forced, except `schema`), repack "
        f"{'on' if s['repack'] else 'off'} for both; verm-local deterministic "
        f"{'on' if s.get('deterministic') else 'off'}.",
        "",
        *table_head(
            "workload",
            f"{first} s (tokens)",
            f"{second} s (tokens)",
            "ratio",
            f"p50 s {first} / {second}",
            f"failed {first} / {second}",
        ),
    ]
    failures = []
    for w, r in report["workloads"].items():
        a, b = r.get(first, {}), r.get(second, {})
        ratio = r.get("ratio")
        lines.append(
            f"| {w} | {a.get('wall_s', 0):.2f} ({a.get('completion_tokens', 0)}) | "
            f"{b.get('wall_s', 0):.2f} ({b.get('completion_tokens', 0)}) | "
            f"{'not compared' if ratio is None else f'{ratio:.3f}'} | "
            f"{a.get('p50_s', 0):.2f} / {b.get('p50_s', 0):.2f} | "
            f"{a.get('failed', 0)} / {b.get('failed', 0)} |"
        )
        if r.get("not_compared"):
            failures.append(f"- {w}: {r['not_compared']}")
    lines += ["", f"ratio = {first} / {second} wall time (below 1: {first} faster)."]
    if failures:
        lines += ["", "No ratio where a side failed requests:", *failures]
    return "\n".join(lines) + "\n"
