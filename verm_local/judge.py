"""Judge a (ground truth, prediction) pair: the Python API behind `verm-local judge`.

Thin: build the task's request (its profile: message layout, image preparation, answer
grammar, decoding), run it on a backend, read the answer into a `Judgement`."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .answer import AnswerBounds, answer_grammar, answer_schema, bounds
from .backends.base import Backend, Generation, Request
from .decoding import Sampling
from .errors import AnswerError, InputError, ModelError, VermError
from .images import PreparedImage, prepare_image
from .modelref import ResolvedModel, resolve_model
from .prompts import Prompt, resolve_prompt
from .schema import Judgement, Timings, extract_json
from .select import prefill_settings, task_context
from .settings import settings
from .tasks import ImagePrep, TaskProfile, decoding, profile

log = logging.getLogger(__name__)

ImageLike = str | Path | bytes | PreparedImage


@dataclass
class JudgeRequest:
    """A judgement's request as sent, and what it was made from."""

    profile: TaskProfile
    request: Request
    prompt: Prompt
    bounds: AnswerBounds | None  # None: free answer (no grammar)
    free: bool

    @property
    def task(self) -> str:
        return self.profile.name

    def messages_with(
        self, image_part: Callable[[PreparedImage], dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """The messages in the task's layout, each image part replaced by
        `image_part(image)` for its prepared image, in order (an OpenAI `image_url` part,
        a description)."""
        images = iter(self.request.images)
        return [
            {
                "role": m["role"],
                "content": [
                    image_part(next(images)) if p.get("type") == "image" else p
                    for p in m["content"]
                ]
                if isinstance(m["content"], list)
                else m["content"],
            }
            for m in self.request.messages
        ]

    def describe(self) -> dict[str, Any]:
        """The messages as sent (image parts with their final sizes and encoding), the
        answer schema, the decoding and where the prompt came from: `judge --dry-run`."""
        p = self.profile
        return {
            "task": self.task,
            "messages": self.messages_with(_describe_image),
            "prompt_source": self.prompt.source,
            "schema": None
            if self.free
            else answer_schema(
                p,
                self.request.sampling.max_tokens,
                self.bounds.max_errors if self.bounds else None,
            ),
            "bounds": self.bounds.to_dict() if self.bounds else None,
            "decoding": self.request.sampling.to_dict(),
            "reward": {"recipe": p.reward.kind},
        }


def _describe_image(img: PreparedImage) -> dict[str, Any]:
    return {
        "type": "image",
        "source": img.source,
        "encoding": img.encoding,
        "media_type": img.media_type,
        "original_size": list(img.original_size),
        "sent_size": list(img.sent_size or img.size),
        "size": list(img.size),
        "visual_tokens": img.visual_tokens,
        "bytes": len(img.encoded) if img.encoded is not None else None,
    }


def prepare(
    image: ImageLike, prep: ImagePrep, image_tokens: int | None = None, name: str | None = None
) -> PreparedImage:
    """An image as the task's pipeline prepares it (`name`: how errors call it)."""
    if isinstance(image, PreparedImage):
        return image
    return prepare_image(image, prep, image_tokens=image_tokens, name=name)


def build_request(
    gt: ImageLike,
    pred: ImageLike,
    p: TaskProfile,
    *,
    sampling: Sampling | None = None,
    free: bool = False,
    prompt_file: str | Path | None = None,
    max_errors: int | None = None,
    image_tokens: int | None = None,
    warn: bool = True,
) -> JudgeRequest:
    """The exact request of a judgement, per the task's profile (no model needed):
    [system], then one user turn of [ground truth, prediction, text]; the answer grammar
    bounded to the decoding's token cap."""
    sampling = sampling or p.judging
    if max_errors is not None and max_errors < 0:
        raise InputError("--max-errors must be 0 or more")
    images = [prepare(gt, p.gt, image_tokens), prepare(pred, p.pred, image_tokens)]
    prompt = resolve_prompt(p, prompt_file, warn=warn)
    messages: list[dict[str, Any]] = []
    if p.system is not None:
        messages.append({"role": "system", "content": p.system})
    messages.append(
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "image"},
                {"type": "text", "text": p.text_prefix + prompt.text},
            ],
        }
    )
    answer_bounds = None if free else bounds(p, sampling.max_tokens, max_errors)
    grammar = None if free else answer_grammar(p, sampling.max_tokens, max_errors)
    return JudgeRequest(
        p, Request(images, messages, sampling, grammar), prompt, answer_bounds, free
    )


def judgement_of(
    p: TaskProfile,
    gen: Generation,
    *,
    prompt_source: str = "",
    reward_scale: float | None = None,
    model: Any = None,
    load_s: float = 0.0,
    unreadable: str = "raise",
) -> Judgement:
    """Read a generation into a Judgement. An answer cut at the token cap is reported
    incomplete (failure values, never scored as whole); an unreadable one raises
    AnswerError, or with `unreadable="score"` is reported the same way."""
    step = gen.decode_s / max(gen.completion_tokens, 1)
    timings = Timings(
        load_s=round(load_s, 4),
        vision_s=round(gen.vision_s, 4),
        prefill_s=round(gen.prefill_s, 4),
        decode_s=round(gen.decode_s, 4),
        ttft_s=round(gen.prefill_s + step, 4),
        prompt_tokens=gen.prompt_tokens,
        image_tokens=gen.image_tokens,
        completion_tokens=gen.completion_tokens,
        forward_passes=gen.forward_passes,
        drafted=gen.drafted,
        accepted=gen.accepted,
    )
    fields = {
        "prompt_source": prompt_source,
        "timings": timings,
        "deterministic": gen.deterministic,
    }
    if model is not None:
        fields["model"] = model
    if gen.finish_reason == "length":
        return Judgement.failed(
            p,
            f"the answer was cut at {gen.completion_tokens} tokens before it was complete",
            reward_scale=reward_scale,
            **fields,
        )
    try:
        return Judgement.from_answer(p, extract_json(gen.text), reward_scale=reward_scale, **fields)
    except AnswerError as exc:
        if unreadable != "score":
            raise
        return Judgement.failed(p, str(exc), reward_scale=reward_scale, **fields)


# The authors' RL asks the reward model again when its answer cannot be read: an answer
# unreadable after 2 tries counts as S = 25 (DESIGN.md section 2).
ANSWER_TRIES = 2


def answer_tries(sampling: Sampling, tries: int = ANSWER_TRIES) -> int:
    """Answers to ask for at most: greedy decoding would repeat itself, so one."""
    return 1 if sampling.greedy else max(1, tries)


def retry_sampling(sampling: Sampling, attempt: int) -> Sampling:
    """The decoding of try `attempt` (from 0): the next seed for each new try."""
    return sampling.with_(seed=sampling.seed + attempt) if attempt else sampling


def worth_retrying(judgement: Judgement | None) -> bool:
    """An answer that was unreadable (None) or cut at the token cap."""
    return judgement is None or not judgement.complete


Reader = Callable[[Generation, bool], Judgement]


def judge_requests(
    generate: Callable[[list[Request]], list[Any]],
    requests: list[Request],
    readers: list[Reader | None],
    tries: int = ANSWER_TRIES,
) -> list[Any]:
    """The one retry policy for judgements, whatever the entry point (`judge`,
    `judge --pairs`, `/v1/judge`; the reward client follows the same rule remotely):
    run `requests` as one batch; each answer is read by its reader (`reader(gen, last)`,
    raising AnswerError when unreadable); a sampled answer that is unreadable or cut at
    the token cap is asked again with the next seed, together with the others that need
    it, up to `tries` answers in all. A request without a reader (a plain chat
    completion) gets its Generation. Results in order; an error in place of a failed one."""
    results: list[Any] = [None] * len(requests)
    todo = list(range(len(requests)))
    attempt = 0
    while todo:
        batch = [
            Request(r.images, r.messages, retry_sampling(r.sampling, attempt), r.grammar)
            for r in (requests[i] for i in todo)
        ]
        again = []
        for i, gen in zip(todo, generate(batch)):
            read = readers[i]
            if isinstance(gen, Exception) or read is None:
                results[i] = gen
                continue
            last = attempt + 1 >= answer_tries(requests[i].sampling, tries)
            try:
                judgement = read(gen, last)
            except AnswerError as exc:
                judgement, results[i] = None, exc
            else:
                results[i] = judgement
            if not last and worth_retrying(judgement):
                again.append(i)
        todo, attempt = again, attempt + 1
    return results


class Judge:
    """A loaded judge model for repeated calls without reloading.

    >>> j = Judge(model="models/tiny-gguf")
    >>> j.judge("gt.png", "pred.png", task="chart").reward
    """

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        mmproj: str | Path | None = None,
        quant: str | None = None,
        threads: int | None = None,
        gpu_layers: int | None = None,
        variant: str | None = None,
        backend_name: str = "auto",
        device: str | None = None,
        dtype: str | None = None,
        vision: str = "auto",
        vision_model: str | Path | None = None,
        vision_precision: str | None = None,
        image_tokens: int | None = None,
        max_tokens: int | None = None,
        reward_scale: float | None = None,
        verbose: bool = False,
        backend: Backend | None = None,
        parallel: int = 1,
        prefix_cache: int = 0,
        repack: bool | None = None,
        n_ctx: int | None = None,
        one_shot: bool = False,
        kv_type: str | None = None,
        flash_attn: bool | None = None,
        n_ubatch: int | None = None,
        speculate: bool | None = None,
        deterministic: bool | None = None,
        **renamed: Any,
    ):
        old = _renamed(
            renamed,
            {
                "image_token_budget": "image_tokens",
                "n_gpu_layers": "gpu_layers",
                "prefix_slots": "prefix_cache",
            },
        )
        image_tokens = old.get("image_tokens", image_tokens)
        gpu_layers = old.get("gpu_layers", gpu_layers)
        prefix_cache = old.get("prefix_cache", prefix_cache)
        self.image_tokens = image_tokens
        self.max_tokens = max_tokens
        self.reward_scale = reward_scale
        self.resolved: ResolvedModel | None = None  # the files behind the model
        self.plan = None
        self.last_generation: Generation | None = None
        self._lock = threading.Lock()  # one call at a time into the model (_generate)
        threads = threads or settings().threads
        if isinstance(backend, str):  # a backend's name, as the CLI's --backend takes it
            backend_name, backend = backend, None
        if backend is not None:
            self.backend = backend
            return
        from .runtime import torch_device

        model = model or settings().model
        if not model:
            # No model named: the variant planned for this machine, from the store.
            from .runtime import planned_model

            self.plan, model = planned_model(
                device, variant, n_ctx or task_context(None, image_tokens, max_tokens)
            )
            threads = threads or self.plan.threads
            if gpu_layers is None:
                gpu_layers = self.plan.gpu_layers
            device = torch_device(self.plan.device)
        elif variant:
            raise InputError("--variant picks from the store; do not pass --model with it")
        if gpu_layers is None:
            gpu_layers = -1 if device in ("cuda", "metal", "mps") else 0
        device = torch_device(device)
        resolved = self.resolved = resolve_model(model, mmproj, quant)
        name = resolved.backend if backend_name == "auto" else backend_name
        if name != resolved.backend:
            raise ModelError(
                f"{resolved.path}: a {resolved.format} model runs on the "
                f"{resolved.backend} backend, not {name}"
            )
        if name == "transformers":
            from .backends.transformers import TransformersBackend

            self.backend = TransformersBackend(
                resolved, device=device, dtype=dtype, threads=threads, verbose=verbose
            )
            return
        from .backends.llamacpp import LlamaCppBackend, path_choice

        t0 = time.perf_counter()
        encoder = _vision_encoder(
            resolved.path.parent, vision, vision_model, vision_precision, threads, gpu_layers != 0
        )
        encoder_load_s = time.perf_counter() - t0
        max_image = max(p.max_image_tokens for p in _profiles())
        # Prefill settings measured for the device (select.prefill_settings) unless given;
        # the same for one request and many where the kernels are batch-invariant.
        det, _, _ = path_choice(repack, resolved.quant, deterministic, gpu_layers)
        pre = prefill_settings("cpu" if gpu_layers == 0 else "gpu", parallel, det.on)
        kv_type = kv_type or pre.kv_type
        if flash_attn is None:  # a quantized V cache needs flash attention in llama.cpp
            flash_attn = pre.flash_attn or kv_type != "f16"
        self.backend = LlamaCppBackend(
            resolved,
            n_ctx=n_ctx,
            threads=threads,
            gpu_layers=gpu_layers,
            image_tokens=min(image_tokens or max_image, max_image),
            vision=encoder,
            verbose=verbose,
            parallel=parallel,
            prefix_cache=prefix_cache,
            repack=repack,
            one_shot=one_shot,
            kv_type=kv_type,
            flash_attn=flash_attn,
            n_ubatch=n_ubatch or pre.n_ubatch,
            speculate=speculate,
            deterministic=deterministic,
        )
        self.backend.load_s += encoder_load_s  # the ONNX session is part of loading

    # -- requests ---------------------------------------------------------------------

    def sampling(
        self, task: str | TaskProfile, mode: str = "default", seed: int | None = None
    ) -> Sampling:
        """The task's decoding (`tasks.decoding`) at this judge's token cap."""
        return decoding(profile(task), mode, self.max_tokens, seed)

    def prepare(
        self,
        image: ImageLike,
        task: str | TaskProfile = "chart",
        role: str = "gt",
        name: str | None = None,
    ) -> PreparedImage:
        """An image prepared as the task prepares its ground truth (or `role="pred"`);
        `name`: how an error calls it."""
        p = profile(task)
        return prepare(image, p.gt if role == "gt" else p.pred, self.image_tokens, name)

    def request(
        self,
        gt: ImageLike,
        pred: ImageLike,
        task: str | TaskProfile = "chart",
        *,
        sampling: Sampling | None = None,
        free: bool = False,
        prompt_file: str | Path | None = None,
        max_errors: int | None = None,
    ) -> JudgeRequest:
        """The request of a judgement at this judge's image budget and token cap."""
        p = profile(task)
        return build_request(
            gt,
            pred,
            p,
            sampling=sampling or self.sampling(p),
            free=free,
            prompt_file=prompt_file,
            max_errors=max_errors,
            image_tokens=self.image_tokens,
        )

    # -- judging ----------------------------------------------------------------------

    def judge(
        self,
        gt: ImageLike,
        pred: ImageLike,
        task: str | TaskProfile = "chart",
        *,
        free: bool = False,
        sampling: Sampling | None = None,
        prompt_file: str | Path | None = None,
        max_errors: int | None = None,
        tries: int = ANSWER_TRIES,
        unreadable: str = "raise",
    ) -> Judgement:
        """Compare `pred` with the ground truth `gt` (images go to the model in that order).

        When sampling, an answer that cannot be read or was cut at the token cap is asked
        again with the next seed, `tries` answers in all (greedy decoding would repeat it;
        `judge_requests`). After the last one, a cut answer comes back with
        `complete=False` and the task's failure reward; an unreadable one raises
        AnswerError, or with `unreadable="score"` comes back the same way (the authors'
        RL: S = 25)."""
        p = profile(task)
        jr = self.request(
            gt,
            pred,
            p,
            sampling=sampling,
            free=free,
            prompt_file=prompt_file,
            max_errors=max_errors,
        )
        result = self._judge_built([jr], tries, unreadable)[0]
        if isinstance(result, Exception):
            raise result
        return result

    def judge_many(
        self,
        pairs: list[tuple[Any, Any, str | TaskProfile]],
        *,
        free: bool = False,
        sampling: Sampling | str | Callable[[TaskProfile], Sampling] | None = None,
        max_errors: int | None = None,
        progress: Callable[[int, int], None] | None = None,
        unreadable: str = "raise",
        tries: int = ANSWER_TRIES,
    ) -> list[Judgement | VermError]:
        """Judge (gt, pred, task) pairs; results in input order, an error per failed pair.

        Pairs that share a ground truth are judged together: on a model loaded with
        `parallel` > 1 the ground truth is encoded once and the answers decode as one batch.
        `sampling`: a Sampling for every pair, a mode ("default", "greedy", "rl") each
        task resolves, or a function of the task. `progress(done, total)` is called as
        pairs finish. Answers are asked again as `judge` asks them (`judge_requests`)."""
        results: list[Judgement | VermError | None] = [None] * len(pairs)
        built: list[tuple[int, JudgeRequest]] = []
        for i, (gt, pred, task) in enumerate(pairs):
            try:
                p = profile(task)
                if isinstance(sampling, Sampling):
                    s = sampling
                elif callable(sampling):
                    s = sampling(p)
                else:
                    s = self.sampling(p, sampling or "default")
                jr = self.request(gt, pred, p, sampling=s, free=free, max_errors=max_errors)
            except VermError as exc:
                results[i] = exc
                continue
            built.append((i, jr))
        # Group by ground truth (stable, in order of first appearance): a batch shares its prefix.
        keys = [hashlib.sha1(jr.request.images[0].rgb_bytes()).digest() for _, jr in built]
        first: dict[bytes, int] = {}
        for k, key in enumerate(keys):
            first.setdefault(key, k)
        order = sorted(range(len(built)), key=lambda k: (first[keys[k]], k))
        done = len(pairs) - len(built)
        step = self.backend.parallel
        for start in range(0, len(order), step):
            part = order[start : start + step]
            out = self._judge_built([built[k][1] for k in part], tries, unreadable)
            for k, result in zip(part, out):
                results[built[k][0]] = result
            done += len(part)
            if progress is not None:
                progress(done, len(pairs))
        return results  # type: ignore[return-value]

    def generate_all(self, requests: list[Request]) -> list[Generation | VermError]:
        """Generations (or VermErrors) for requests, batched where the backend can."""
        return self._generate(requests)

    def _generate(self, requests: list[Request]) -> list[Generation | VermError]:
        # One call at a time into the model: llama.cpp's context is not thread-safe (two
        # threads decoding at once abort the process). Threads sharing a Judge wait their
        # turn; judge_many (or `serve`) is the way to decode them together.
        with self._lock:
            gens = self.backend.generate_all(requests)
        if len(gens) == 1 and not isinstance(gens[0], Exception):
            self.last_generation = gens[0]  # the raw answer, for benchmarks scoring its tokens
        return gens

    def _judge_built(
        self, built: list[JudgeRequest], tries: int, unreadable: str
    ) -> list[Judgement | VermError]:
        def reader(jr: JudgeRequest) -> Callable[[Generation, bool], Judgement]:
            return lambda gen, last: self._judgement(
                jr.profile, gen, jr.prompt.source, unreadable if last else "raise"
            )

        return judge_requests(
            self._generate, [jr.request for jr in built], [reader(jr) for jr in built], tries
        )

    def _judgement(
        self, p: TaskProfile, gen: Generation, prompt_source: str, unreadable: str = "raise"
    ) -> Judgement:
        return judgement_of(
            p,
            gen,
            prompt_source=prompt_source,
            reward_scale=self.reward_scale,
            model=self.backend.info,
            load_s=self.backend.load_s,
            unreadable=unreadable,
        )

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> "Judge":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _renamed(given: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """Keyword arguments under their old names (kept for one release, with a warning)."""
    import warnings

    out = {}
    for old, value in given.items():
        if old not in names:
            raise TypeError(f"unexpected keyword argument {old!r}")
        warnings.warn(f"{old}= is now {names[old]}=", DeprecationWarning, stacklevel=3)
        out[names[old]] = value
    return out


def _profiles() -> list[TaskProfile]:
    from .tasks import PROFILES

    return list(PROFILES.values())


def _vision_encoder(
    model_dir: Path,
    mode: str,
    vision_model: str | Path | None,
    precision: str | None,
    threads: int | None,
    gpu: bool,
):
    """The external vision encoder the GGUF path should use, or None for the mmproj."""
    from .vision_onnx import OnnxVision, choose_vision, find_tower, onnxruntime_available

    tower = Path(vision_model) if vision_model else find_tower(model_dir)
    if vision_model and not (tower / "vision_spec.json").is_file():
        raise ModelError(f"{tower}: not an ONNX vision tower written by `verm-local convert onnx`")
    # Importing onnxruntime takes a while (0.15 s): only where there is a tower to run.
    ok = tower is not None and mode != "gguf" and onnxruntime_available()
    path, reason = choose_vision(mode, tower, ok, gpu)
    if mode == "auto" and tower is not None and not ok:
        log.warning("%s", reason)
    if path == "gguf":
        return None
    return OnnxVision(tower, precision, threads=threads)


def judge(
    gt: ImageLike,
    pred: ImageLike,
    task: str | TaskProfile = "chart",
    model: str | Path | None = None,
    **kwargs: Any,
) -> Judgement:
    """One-shot judgement: load `model`, judge the pair, unload."""
    judge_keys = {"free", "sampling", "prompt_file", "max_errors", "tries", "unreadable"}
    call = {k: kwargs.pop(k) for k in list(kwargs) if k in judge_keys}
    kwargs.setdefault("one_shot", True)
    with Judge(model, **kwargs) as j:
        return j.judge(gt, pred, task, **call)
