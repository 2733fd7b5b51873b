"""`verm-local serve --engine vllm`: the vLLM command line for the bf16 or GPTQ variant,
with the same host, port, parallelism, key and image limits as `verm-local serve`."""

from __future__ import annotations

import json
from pathlib import Path

from ..select import task_context
from .config import ServeConfig


def vllm_command(model_dir: str | Path, cfg: ServeConfig, quant: str | None = None) -> list[str]:
    """The `vllm serve` command line for a bf16 or GPTQ checkpoint of Visual-ERM."""
    cmd = [
        "vllm",
        "serve",
        str(model_dir),
        "--host",
        cfg.host,
        "--port",
        str(cfg.port),
        "--served-model-name",
        cfg.served_name or Path(model_dir).name,
        "--max-num-seqs",
        str(cfg.parallel),
        "--max-model-len",
        str(task_context(None, cfg.image_tokens, cfg.answer_cap)),
        "--limit-mm-per-prompt",
        json.dumps({"image": 2}),
        "--mm-processor-kwargs",
        json.dumps({"max_pixels": cfg.chat_image_tokens * 32 * 32}),
        "--enable-prefix-caching",
        "--trust-remote-code",
    ]
    if quant and quant.startswith("gptq"):
        cmd += ["--quantization", "gptq_marlin"]
    else:
        cmd += ["--dtype", "bfloat16"]
    if cfg.api_key:
        cmd += ["--api-key", cfg.api_key]
    if cfg.allow_local_images:
        cmd += ["--allowed-local-media-path", "/"]
    return cmd
