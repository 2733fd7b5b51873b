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


def vllm_for(model: str | None, variant: str | None, cfg: ServeConfig) -> list[str]:
    """The vLLM command for `--model` (or the store's `variant`, default bf16)."""
    from ..errors import InputError, ModelError
    from ..modelref import resolve_model
    from ..paths import installed

    if model is None:
        name = variant or "bf16"
        path = installed(name)
        if path is None:
            raise ModelError(
                f"{name} is not in the store; run: verm-local pull {name} (or --model DIR)"
            )
        model = str(path)
    resolved = resolve_model(model)
    if resolved.format == "gguf":
        raise InputError(
            f"{model}: vLLM serves the bf16 or GPTQ checkpoint, not GGUF (use --engine llamacpp)"
        )
    return vllm_command(resolved.path, cfg, resolved.quant if resolved.format == "gptq" else None)
