"""`verm-local serve --replicas N`: the verm-local engine as a Ray Serve deployment behind
one OpenAI-compatible URL, with the same routes, batching, prefix cache, limits, auth and
metrics as `serve` (each replica runs the `Server` of `app.py`: its model worker and
scheduler).

- **Ground-truth affinity.** The ingress hashes a request's ground truth (the first image
  of a chat completion) and sends it to the engine with that hash as Ray Serve's
  multiplexed model id: Ray routes requests with the same id to the replica that already
  has it, so a rollout group's ground truth is evaluated once across the cluster, as on
  one machine (`bench serve --replicas 2` measures it against Ray's default routing).
- **Faults.** A replica that dies mid-request (a native crash, a lost node) costs the
  client nothing: the ingress asks another replica, and Ray replaces the dead one.
- Without `--ray-address` a local Ray instance starts (one machine, nothing to set up);
  with one, the deployment joins that cluster. `--min-replicas/--max-replicas` autoscale.

Ray is the `ray[serve,data]` extra (scripts/install.sh installs it)."""

from __future__ import annotations

import hashlib
import logging
import re
import signal
import threading
from typing import Any

from ..errors import VermError
from .config import ServeConfig
from .errors import APIError

log = logging.getLogger("verm_local.server")

APP_NAME = "verm-local"
RETRIES = 3  # replicas asked for one request before it fails


def affinity_key(job: dict[str, Any]) -> str:
    """What a request's replica is chosen by: its ground truth's bytes (a judge job's
    `gt`, a chat job's first image), hashed; "" for a request with no image."""
    data = job.get("gt") or (job.get("images") or [b""])[0]
    return hashlib.sha1(data).hexdigest()[:16] if data else ""


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def one_line(exc: BaseException) -> str:
    """A Ray error as one clear line: the exception the replica raised (its type and first
    line), not Ray's traceback with its terminal colours and actor repr."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException) and cause is not exc:
        exc = cause
    text = _ANSI.sub("", str(exc)).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0] if lines else ""
    if type(exc).__name__ in ("RayActorError", "ActorDiedError", "ActorUnavailableError"):
        return "a replica died while answering"
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _ray() -> Any:
    try:
        import ray
        from ray import serve
    except ImportError:
        raise VermError(
            "serve --replicas needs Ray: pip install 'ray[serve,data]' (scripts/install.sh "
            "installs it)"
        ) from None
    return ray, serve


def build(cfg: ServeConfig, replicas: int, autoscale: tuple[int, int] | None, cpus: float) -> Any:
    """The Ray Serve application: the ingress (the routes) in front of the engine."""
    ray, serve = _ray()
    from fastapi import FastAPI

    from .app import create_app

    front = _Front(cfg)
    app: FastAPI = create_app(front)

    scaling: dict[str, Any] = (
        {
            "autoscaling_config": {
                "min_replicas": autoscale[0],
                "max_replicas": autoscale[1],
                "target_ongoing_requests": cfg.parallel,
            }
        }
        if autoscale
        else {"num_replicas": replicas}
    )

    @serve.deployment(
        name="Engine",
        max_ongoing_requests=cfg.queue_size + cfg.parallel,
        ray_actor_options={"num_cpus": cpus},
        health_check_period_s=5,
        **scaling,
    )
    class Engine:
        """One replica: the model worker and its scheduler (`app.Server`)."""

        def __init__(self, cfg_data: dict[str, Any]) -> None:
            import os

            from .app import Server

            self.server = Server(ServeConfig(**cfg_data))
            self.server.start()
            self.pid = os.getpid()

        @serve.multiplexed(max_num_models_per_replica=max(cfg.prefix_cache, 1) * 4)
        async def ground_truth(self, key: str) -> str:
            """Ray's multiplexing, used for affinity: 'loading' a ground truth is nothing
            here; the batch engine's prefix cache holds its evaluated prefix."""
            return key

        async def run(self, job: dict[str, Any]) -> dict[str, Any]:
            key = serve.get_multiplexed_model_id()
            if key:  # affinity on and a ground truth to route by (else Ray's own routing)
                await self.ground_truth(key)
            return await self.server.wait(job)

        async def health(self) -> dict[str, Any]:
            return {**self.server.health(), "replica_pid": self.pid}

        def metrics(self) -> bytes:
            return self.server.metrics.render()

        def check_health(self) -> None:
            """Ray's health check: a replica whose dispatcher stopped is replaced (a
            crashed model worker is restarted by the dispatcher itself)."""
            if not self.server.scheduler.thread.is_alive():
                raise RuntimeError("the dispatcher of this replica stopped")

    @serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0})
    @serve.ingress(app)
    class Ingress:
        def __init__(self, engine: Any) -> None:
            # On the class: the routes' copy of `front` was pickled apart from this one,
            # the class is imported by name in the replica and so shared by both.
            _Front.engine = engine

    return Ingress.bind(Engine.bind(cfg.model_dump()))


class _Front:
    """What the routes of `app.create_app` ask of a server, answered by the engine
    deployment: a request goes to a replica chosen by its ground truth."""

    engine: Any = None  # the Engine deployment's handle, set by the Ingress replica

    def __init__(self, cfg: ServeConfig):
        from .metrics import Metrics

        self.cfg = cfg
        self.metrics = Metrics()
        self.model_name = cfg.served_name or "verm-local"

    async def wait(self, job: dict[str, Any]) -> dict[str, Any]:
        """The job's result from a replica; a replica that died (or whose model worker
        crashed) is left and the job asked of another."""
        from ray.exceptions import RayActorError, RayTaskError

        key = affinity_key(job) if self.cfg.affinity else ""
        # Without a key Ray routes by its own rule (power of two choices); a multiplexed
        # id must not be empty.
        engine = self.engine.options(multiplexed_model_id=key) if key else self.engine
        last = ""
        for _ in range(RETRIES):
            try:
                return await engine.run.remote(job)
            except RayActorError as exc:
                last = one_line(exc)
            except APIError as exc:  # raised in the replica: its status and message only
                if exc.status < 500 or exc.status == 504:
                    raise APIError(exc.status, exc.message, exc.kind, exc.param) from None
                last = exc.message  # the worker crashed under this job: another replica
            except RayTaskError as exc:  # anything else the replica raised
                raise APIError(500, one_line(exc)) from None
        raise APIError(503, f"no replica could answer ({last})")

    def health(self) -> dict[str, Any]:
        """The status and each replica's process (from Ray's state API, which the Ray
        dashboard serves; a cluster started without it gives the replica count only)."""
        out: dict[str, Any] = {"status": "ok", "model": self.model_name}
        try:
            from ray.util.state import list_actors

            actors = list_actors(filters=[("state", "=", "ALIVE")], detail=False, limit=1000)
        except Exception as exc:  # noqa: BLE001 - no dashboard: ServerUnavailable, others
            log.debug("no replica list from Ray's state API: %s", exc)
            from ray import serve

            app = serve.status().applications.get(APP_NAME)
            dep = app.deployments.get("Engine") if app is not None else None
            running = dep.replica_states.get("RUNNING", 0) if dep is not None else 0
            out["replicas"] = [{"pid": None, "state": "RUNNING"}] * running
            out["replica_pids"] = "unavailable: the cluster runs without the Ray dashboard"
            return out
        out["replicas"] = [
            {"pid": a.pid, "state": a.state, "node": a.node_id}
            for a in actors
            if (a.class_name or "").endswith(":Engine")
        ]
        return out

    def stop(self) -> None:
        pass


def serve_replicas(
    cfg: ServeConfig,
    replicas: int,
    *,
    address: str | None = None,
    autoscale: tuple[int, int] | None = None,
    cpus: float = 1.0,
) -> None:
    """Start (or join) Ray, deploy, serve on cfg.host:cfg.port until SIGINT/SIGTERM."""
    ray, serve = _ray()
    ray.init(address=address, include_dashboard=None, logging_level=logging.WARNING)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build(cfg, replicas, autoscale, cpus), name=APP_NAME, route_prefix="/")
    count = f"{autoscale[0]}-{autoscale[1]}" if autoscale else str(replicas)
    log.info("serving on http://%s:%s/v1 (%s replicas on Ray)", cfg.host, cfg.port, count)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()
