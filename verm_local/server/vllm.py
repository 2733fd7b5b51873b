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


def ray_llm_config(
    cmd: list[str], replicas: int, autoscale: tuple[int, int] | None
) -> dict[str, object]:
    """`serve --engine vllm --replicas N` on Ray: ray.serve.llm's LLMConfig (as a dict)
    carrying the same engine settings as the `vllm serve` command `cmd`, deployed as N
    replicas (or autoscaled) behind Ray Serve's OpenAI app."""
    flags = dict(zip(cmd[3::2], cmd[4::2]))
    model_dir, name = cmd[2], flags.get("--served-model-name", Path(cmd[2]).name)
    engine: dict[str, object] = {
        "max_num_seqs": int(flags["--max-num-seqs"]),
        "max_model_len": int(flags["--max-model-len"]),
        "limit_mm_per_prompt": json.loads(flags["--limit-mm-per-prompt"]),
        "mm_processor_kwargs": json.loads(flags["--mm-processor-kwargs"]),
        "enable_prefix_caching": True,
        "trust_remote_code": True,
    }
    if "--quantization" in flags:
        engine["quantization"] = flags["--quantization"]
    if "--dtype" in flags:
        engine["dtype"] = flags["--dtype"]
    scaling: dict[str, object] = (
        {"autoscaling_config": {"min_replicas": autoscale[0], "max_replicas": autoscale[1]}}
        if autoscale
        else {"autoscaling_config": {"min_replicas": replicas, "max_replicas": replicas}}
    )
    return {
        "model_loading_config": {"model_id": name, "model_source": model_dir},
        "deployment_config": scaling,
        "engine_kwargs": engine,
    }


def serve_vllm_on_ray(config: dict[str, object], host: str, port: int, address: str | None) -> None:
    """Deploy `ray_llm_config`'s LLMConfig with ray.serve.llm (vLLM on CUDA) and serve
    until interrupted."""
    import signal
    import threading

    import ray
    from ray import serve
    from ray.serve.llm import LLMConfig, build_openai_app

    ray.init(address=address, include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_openai_app({"llm_configs": [LLMConfig(**config)]}), route_prefix="/")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
