"""Judge a (ground truth, prediction) pair: the Python API behind `verm-local judge`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .backends.base import Backend, Sampling
from .constants import DEFAULT_IMAGE_TOKEN_BUDGET, DEFAULT_MAX_TOKENS, TASKS
from .errors import AnswerError, InputError, ModelError
from .images import PreparedImage, load_image
from .modelref import resolve_model
from .prompts import load_prompt
from .runtime import torch_device
from .schema import MAX_ERRORS, Judgement, Timings, answer_schema, extract_json

# Text around the images: chat preamble, prompt, and slack for a longer prompt file.
_TEXT_TOKENS = 1024


def context_size(image_token_budget: int, max_tokens: int) -> int:
    """Context that fits two images at the budget, the prompt and the answer (256-aligned)."""
    need = 2 * image_token_budget + _TEXT_TOKENS + max_tokens
    return (need + 255) // 256 * 256


class Judge:
    """A loaded judge model for repeated calls without reloading.

    >>> j = Judge(model="models/tiny-gguf")
    >>> j.judge("gt.png", "pred.png", task="chart").score
    """

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        mmproj: str | Path | None = None,
        quant: str | None = None,
        threads: int | None = None,
        n_gpu_layers: int | None = None,
        variant: str | None = None,
        backend_name: str = "auto",
        device: str | None = None,
        dtype: str | None = None,
        vision: str = "auto",
        vision_model: str | Path | None = None,
        vision_precision: str | None = None,
        image_token_budget: int = DEFAULT_IMAGE_TOKEN_BUDGET,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        reward_scale: float | None = None,
        verbose: bool = False,
        backend: Backend | None = None,
    ):
        self.image_token_budget = image_token_budget
        self.max_tokens = max_tokens
        self.reward_scale = reward_scale
        self.resolved = None  # the files behind the model, when this Judge loaded them
        if backend is not None:
            self.backend = backend
            return
        model = model or os.environ.get("VERM_LOCAL_MODEL")
        self.plan = None
        if not model:
            # No model named: the variant planned for this machine, from the store.
            from .runtime import planned_model

            self.plan, model = planned_model(device, variant,
                                             context_size(image_token_budget, max_tokens))
            threads = threads or self.plan.threads
            if n_gpu_layers is None:
                n_gpu_layers = self.plan.gpu_layers
            device = torch_device(self.plan.device)
        elif variant:
            raise InputError("--variant picks from the store; do not pass --model with it")
        if n_gpu_layers is None:
            n_gpu_layers = -1 if device in ("cuda", "metal", "mps") else 0
        device = torch_device(device)
        resolved = self.resolved = resolve_model(model, mmproj, quant)
        name = resolved.backend if backend_name == "auto" else backend_name
        if name != resolved.backend:
            raise ModelError(f"{resolved.path}: a {resolved.format} model runs on the "
                             f"{resolved.backend} backend, not {name}")
        if name == "transformers":
            from .backends.transformers import TransformersBackend

            self.backend = TransformersBackend(resolved, device=device, dtype=dtype,
                                               threads=threads, verbose=verbose)
            return
        from .backends.llamacpp import LlamaCppBackend

        import time

        t0 = time.perf_counter()
        encoder = _vision_encoder(resolved.path.parent, vision, vision_model, vision_precision,
                                  threads, n_gpu_layers != 0)
        encoder_load_s = time.perf_counter() - t0
        self.backend = LlamaCppBackend(
            resolved,
            n_ctx=context_size(image_token_budget, max_tokens),
            threads=threads,
            n_gpu_layers=n_gpu_layers,
            image_max_tokens=image_token_budget,
            vision=encoder,
            verbose=verbose,
        )
        self.backend.load_s += encoder_load_s  # the ONNX session is part of loading

    def prepare(self, image: str | Path | bytes | PreparedImage) -> PreparedImage:
        if isinstance(image, PreparedImage):
            return image
        return load_image(image, token_budget=self.image_token_budget)

    def judge(
        self,
        gt: str | Path | bytes | PreparedImage,
        pred: str | Path | bytes | PreparedImage,
        task: str = "chart",
        *,
        free: bool = False,
        sampling: Sampling | None = None,
        prompt_file: str | Path | None = None,
        max_errors: int | None = None,
    ) -> Judgement:
        """Compare `pred` with the ground truth `gt`; images go to the model in that order.
        `max_errors` caps the constrained answer's error list (default: the schema's cap)."""
        if task not in TASKS:
            raise InputError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
        images = [self.prepare(gt), self.prepare(pred)]
        prompt = load_prompt(task, prompt_file)
        sampling = sampling or Sampling(max_tokens=self.max_tokens)
        if max_errors is not None and not 0 <= max_errors <= MAX_ERRORS:
            raise InputError(f"--max-errors must be within 0..{MAX_ERRORS}")
        schema = None if free else answer_schema(task, MAX_ERRORS if max_errors is None
                                                 else max_errors)
        gen = self.backend.generate(images, prompt, sampling, schema)
        self.last_generation = gen  # the raw answer, for benchmarks that score its tokens
        if gen.finish_reason == "length":
            raise AnswerError(f"the answer was cut at {sampling.max_tokens} tokens before it "
                              "was complete; raise --max-tokens")
        answer = extract_json(gen.text)
        timings = Timings(
            load_s=round(self.backend.load_s, 4),
            vision_s=round(gen.vision_s, 4),
            prefill_s=round(gen.prefill_s, 4),
            decode_s=round(gen.decode_s, 4),
            prompt_tokens=gen.prompt_tokens,
            completion_tokens=gen.completion_tokens,
        )
        return Judgement.from_answer(task, answer, reward_scale=self.reward_scale,
                                     model=self.backend.info, timings=timings)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> "Judge":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _vision_encoder(model_dir: Path, mode: str, vision_model: str | Path | None,
                    precision: str | None, threads: int | None, gpu: bool):
    """The external vision encoder the GGUF path should use, or None for the mmproj."""
    import sys

    from .vision_onnx import OnnxVision, choose_vision, find_tower, onnxruntime_available

    tower = Path(vision_model) if vision_model else find_tower(model_dir)
    if vision_model and not (tower / "vision_spec.json").is_file():
        raise ModelError(f"{tower}: not an ONNX vision tower written by `verm-local convert onnx`")
    ok = onnxruntime_available()
    path, reason = choose_vision(mode, tower, ok, gpu)
    if mode == "auto" and tower is not None and not ok:
        print(f"verm-local: note: {reason}", file=sys.stderr)
    if path == "gguf":
        return None
    return OnnxVision(tower, precision, threads=threads)


def judge(
    gt: str | Path | bytes,
    pred: str | Path | bytes,
    task: str = "chart",
    model: str | Path | None = None,
    **kwargs: Any,
) -> Judgement:
    """One-shot judgement: load `model`, judge the pair, unload."""
    judge_keys = {"free", "sampling", "prompt_file", "max_errors"}
    call = {k: kwargs.pop(k) for k in list(kwargs) if k in judge_keys}
    with Judge(model, **kwargs) as j:
        return j.judge(gt, pred, task, **call)
