"""Judge a (ground truth, prediction) pair: the Python API behind `verm-local judge`."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from .backends.base import Backend, Sampling
from .constants import DEFAULT_IMAGE_TOKEN_BUDGET, DEFAULT_MAX_TOKENS, TASKS
from .errors import AnswerError, InputError, ModelError, VermError
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
        parallel: int = 1,
        prefix_cache: int = 0,
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
            parallel=parallel,
            prefix_slots=prefix_cache,
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
        gen = self.backend.generate(images, prompt, sampling, _schema(task, free, max_errors))
        self.last_generation = gen  # the raw answer, for benchmarks that score its tokens
        return self._judgement(task, gen, sampling)

    def _judgement(self, task: str, gen: Any, sampling: Sampling) -> Judgement:
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

    def judge_many(
        self,
        pairs: list[tuple[Any, Any, str]],
        *,
        free: bool = False,
        sampling: Sampling | None = None,
        max_errors: int | None = None,
        progress: Any = None,
    ) -> list[Judgement | VermError]:
        """Judge (gt, pred, task) pairs; results in input order, an error per failed pair.

        Pairs that share a ground truth are judged together: on a model loaded with
        `parallel` > 1 the ground truth is encoded once and the answers decode as one batch;
        otherwise one after another. `progress(done, total)` is called as pairs finish."""
        sampling = sampling or Sampling(max_tokens=self.max_tokens)
        results: list[Judgement | VermError | None] = [None] * len(pairs)
        requests, index, keys = [], [], []
        for i, (gt, pred, task) in enumerate(pairs):
            try:
                if task not in TASKS:
                    raise InputError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
                images = [self.prepare(gt), self.prepare(pred)]
            except VermError as exc:
                results[i] = exc
                continue
            requests.append(judge_request(images, task, sampling, free, max_errors))
            index.append(i)
            keys.append(hashlib.sha1(images[0].rgb_bytes()).digest())
        # Group by ground truth (stable, in order of first appearance): a batch shares its prefix.
        first: dict[bytes, int] = {}
        for k, key in enumerate(keys):
            first.setdefault(key, k)
        order = sorted(range(len(requests)), key=lambda k: (first[keys[k]], k))
        engine = getattr(self.backend, "batch", None)
        done = len(pairs) - len(requests)
        step = engine.parallel if engine is not None else 1
        for start in range(0, len(order), step):
            part = order[start : start + step]
            gens = self.generate_all([requests[k] for k in part])
            for k, gen in zip(part, gens):
                i = index[k]
                if isinstance(gen, Exception):
                    results[i] = gen
                    continue
                try:
                    results[i] = self._judgement(pairs[i][2], gen, sampling)
                except VermError as exc:
                    results[i] = exc
            done += len(part)
            if progress is not None:
                progress(done, len(pairs))
        return results  # type: ignore[return-value]

    def generate_all(self, requests: list[Any]) -> list[Any]:
        """Generations (or VermErrors) for `BatchRequest`s: as batches on a model loaded with
        `parallel`, else one at a time (the transformers backend takes one user message of
        images then text)."""
        engine = getattr(self.backend, "batch", None)
        if engine is not None:
            return engine.run(requests)
        out = []
        for r in requests:
            try:
                text = r.messages[-1]["content"][-1]["text"]
                out.append(self.backend.generate(r.images, text, r.sampling, r.schema))
            except VermError as exc:
                out.append(exc)
            except (KeyError, IndexError, TypeError):
                out.append(VermError("this backend takes one user message of images then text"))
        return out

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> "Judge":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _schema(task: str, free: bool, max_errors: int | None) -> dict[str, Any] | None:
    """The answer schema a judgement is constrained to (None: free answer)."""
    return None if free else answer_schema(task, MAX_ERRORS if max_errors is None
                                           else max_errors)


def judge_request(images: list[PreparedImage], task: str, sampling: Sampling,
                  free: bool = False, max_errors: int | None = None) -> Any:
    """The `BatchRequest` of one judgement: [gt, pred, the task's prompt] in one user turn."""
    from .backends.batch import BatchRequest

    content = [{"type": "image"}, {"type": "image"},
               {"type": "text", "text": load_prompt(task, None)}]
    return BatchRequest(images, [{"role": "user", "content": content}], sampling,
                        _schema(task, free, max_errors))


def read_pairs(path: str | Path, default_task: str = "chart") -> list[dict[str, Any]]:
    """Pairs to judge from a JSONL file: {gt, pred, task, id} per line, or VC-RewardBench's
    {id, category, gt_img_path, pred_img_path}. Relative image paths are taken from the
    file's directory. Every image is checked here, so a bad line fails before any model
    loads, naming the line."""
    import json

    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read ({exc.__class__.__name__})") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError
        except ValueError:
            raise InputError(f"{path}:{n}: not a JSON object") from None
        gt, pred = row.get("gt", row.get("gt_img_path")), row.get("pred", row.get("pred_img_path"))
        task = row.get("task", row.get("category", default_task))
        if not isinstance(gt, str) or not isinstance(pred, str):
            raise InputError(f"{path}:{n}: needs \"gt\" and \"pred\" image paths")
        if task not in TASKS:
            raise InputError(f"{path}:{n}: unknown task {task!r}; choose one of "
                             f"{', '.join(TASKS)}")
        gt_p, pred_p = (p if Path(p).is_absolute() else path.parent / p for p in (gt, pred))
        for p in (gt_p, pred_p):
            try:
                load_image(p)
            except InputError as exc:
                raise InputError(f"{path}:{n}: {exc}") from None
        out.append({"id": row.get("id", n), "gt": gt_p, "pred": pred_p, "task": task})
    if not out:
        raise InputError(f"{path}: no pairs in it")
    return out


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
