"""The reward server: `app` (routes), `types` (request and response models), `errors`
(OpenAI-shaped errors), `requests` (bodies to worker jobs), `scheduler` (batches and the
model worker process), `metrics` (prometheus-client), `config`, `vllm` (the vLLM engine's
command line)."""

from .config import ServeConfig
from .vllm import vllm_command

__all__ = ["ServeConfig", "serve", "vllm_command"]


def serve(cfg: ServeConfig) -> None:
    from .app import serve as run

    run(cfg)
