"""transformers backend: the bf16 reference (and GPTQ checkpoints) through the same
interface as llama.cpp: the same request (messages and images), the same grammar text
(compiled by xgrammar, the grammar engine vLLM uses), and vLLM's sampling semantics
(repetition penalty over prompt and output, presence penalty over the output,
temperature before top-k and top-p), applied in one logits processor.

dtype: bf16 on CUDA and MPS. On a CPU the default is float32 over the bf16 weights: it is
the exact reference the quantized forms are measured against (bf16 matmuls on a CPU round
differently from one build and CPU to the next, and are emulated, hence slow, on CPUs
without native bf16). `dtype="bfloat16"` is available on a CPU for speed."""

from __future__ import annotations

import time
from typing import Any

from ..crash import reclaim_fatal_signals
from ..decoding import Sampling
from ..errors import ModelError, VermError, first_line
from ..hardware import default_threads, gptq_cpu_workers
from ..images import PreparedImage
from ..modelref import ResolvedModel
from ..schema import ModelInfo
from ..select import determinism_decision
from ..settings import export_default
from .base import Generation, Request, user_turn
from .grammar import grammar_for

STOP_IDS = (151645, 151643)  # <|im_end|>, <|endoftext|>


def pick_device(requested: str | None = None) -> str:
    import torch

    if requested and requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(device: str, requested: str | None = None):
    import torch

    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if requested and requested != "auto":
        if requested not in names:
            raise VermError(f"unknown dtype {requested!r}; choose float32, bfloat16 or float16")
        return names[requested]
    return torch.float32 if device == "cpu" else torch.bfloat16


def eager_gptq_layers(model: Any) -> None:
    """Run GPTQModel's quantized layers without torch.compile (on the CPU). GPTQModel 7.7
    wraps its TorchLinear dequantizer (the CPU's int8 kernel) in torch.compile as each
    layer loads; that graph breaks in its zero-point cache and guards on each layer's own
    cached tensors, so every layer compiles its own graphs on first use (the tiny model's
    28 quantized layers: 75 recompilations, 24 s before the first token; 16 layers at 8B
    widths: 35 s) and dynamo stops compiling after 128 variants. Compiled, a layer at 8B
    widths is then faster (0.34 s a pass against 0.53 s eager), but a token through the
    8B model's 252 such layers takes over a minute either way. The layers' own method,
    eager, computes the same dequantization."""
    for module in model.modules():
        if "dequantize_weight" in vars(module):  # the compiled wrapper set on the instance
            del module.dequantize_weight


class TransformersBackend:
    """A loaded HF (or GPTQ) Qwen3-VL checkpoint; reusable across judgements."""

    parallel = 1  # requests run one after another
    deterministic = determinism_decision(0, backend="transformers")

    def __init__(
        self,
        model: ResolvedModel,
        *,
        device: str | None = None,
        dtype: str | None = None,
        threads: int | None = None,
        verbose: bool = False,
    ):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor
        from transformers.utils import logging as hf_logging

        if not verbose:
            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
        self.device = pick_device(device)
        if threads or self.device == "cpu":
            torch.set_num_threads(threads or default_threads())
        if model.format == "gptq":
            export_default("GPTQMODEL_CPU_WORKERS", str(gptq_cpu_workers(threads)))
        self.dtype = pick_dtype(self.device, dtype)
        self.torch = torch
        t0 = time.perf_counter()
        try:
            self.processor = AutoProcessor.from_pretrained(str(model.path))
            self.model = (
                AutoModelForImageTextToText.from_pretrained(str(model.path), dtype=self.dtype)
                .to(self.device)
                .eval()
            )
        except (OSError, ValueError, ImportError, RuntimeError) as exc:
            raise ModelError(
                f"{model.path}: transformers could not load the model ({first_line(exc)})"
            ) from None
        if model.format == "gptq" and self.device == "cpu":
            eager_gptq_layers(self.model)
        self.load_s = time.perf_counter() - t0
        dtype_name = str(self.dtype).replace("torch.", "")
        quant = model.quant if model.format == "gptq" else f"{model.quant}@{dtype_name}"
        self.info = ModelInfo(
            path=str(model.path), quant=quant, sha256=model.sha256, vision="transformers"
        )
        self._grammar_compiler = None
        self._compiled: dict[str, Any] = {}

    def close(self) -> None:
        self.model = None

    def stats(self) -> dict[str, int]:
        return {}

    def weight_files(self) -> list:
        from pathlib import Path

        return sorted(Path(self.info.path).glob("*.safetensors"))

    # -- inputs -------------------------------------------------------------------------

    def inputs(
        self, images: list[PreparedImage], prompt: str | list[dict[str, Any]]
    ) -> dict[str, Any]:
        """The tokenized chat (image parts filled with the images, in order) with pixel
        values, on the device."""
        it = iter(images)
        messages = []
        for m in user_turn(images, prompt):
            content = m["content"]
            if isinstance(content, list):
                content = [
                    {"type": "image", "image": next(it).image} if p.get("type") == "image" else p
                    for p in content
                ]
            messages.append({**m, "content": content})
        batch = self.processor.apply_chat_template(
            messages,
            tokenize=True,
            add_generation_prompt=True,
            return_dict=True,
            return_tensors="pt",
        )
        return batch.to(self.device)

    def _compiled_grammar(self, grammar: str):
        try:
            import xgrammar as xgr
        except ImportError:
            raise VermError(
                "constrained decoding with transformers needs xgrammar "
                "(pip install xgrammar), or pass --free"
            ) from None
        if self._grammar_compiler is None:
            reclaim_fatal_signals()  # xgrammar's tvm_ffi took SIGSEGV as it loaded
            info = xgr.TokenizerInfo.from_huggingface(
                self.processor.tokenizer,
                vocab_size=self.model.config.text_config.vocab_size,
                stop_token_ids=list(STOP_IDS),
            )
            self._grammar_compiler = xgr.GrammarCompiler(info)
        if grammar not in self._compiled:
            self._compiled[grammar] = self._grammar_compiler.compile_grammar(grammar)
        return self._compiled[grammar]

    # -- generation ---------------------------------------------------------------------

    def generate_all(self, requests: list[Request]) -> list[Generation | VermError]:
        out: list[Generation | VermError] = []
        for r in requests:
            try:
                out.append(self._generate(r))
            except VermError as exc:
                out.append(exc)
        return out

    def generate(
        self,
        images: list[PreparedImage],
        prompt: str | list[dict[str, Any]],
        sampling: Sampling,
        grammar: str | dict[str, Any] | None = None,
    ) -> Generation:
        return self._generate(
            Request(images, user_turn(images, prompt), sampling, grammar_for(grammar))
        )

    def _generate(self, request: Request) -> Generation:
        from transformers import LogitsProcessorList

        torch = self.torch
        if self.model is None:
            raise VermError("model is closed")
        sampling = request.sampling
        # Compiled before the clock starts: it is per grammar, not per judgement.
        grammar = None
        if request.grammar is not None:
            grammar = _GrammarMask(self._compiled_grammar(request.grammar), sampling)
        t0 = time.perf_counter()
        batch = self.inputs(request.images, request.messages)
        n_prompt = int(batch["input_ids"].shape[1])
        image_token = self.model.config.image_token_id
        n_image = int((batch["input_ids"] == image_token).sum())
        first = _FirstCall()
        vision = _Stopwatch(self._vision_module())
        processors = [first, _VllmLogits(sampling, n_prompt, grammar)]
        if sampling.temperature > 0:
            torch.manual_seed(sampling.seed)
        try:
            with torch.inference_mode():
                out = self.model.generate(
                    **batch,
                    max_new_tokens=sampling.max_tokens,
                    logits_processor=LogitsProcessorList(processors),
                    do_sample=sampling.temperature > 0,
                    temperature=1.0,
                    top_k=0,
                    top_p=1.0,
                    repetition_penalty=1.0,
                    eos_token_id=list(STOP_IDS),
                    pad_token_id=STOP_IDS[1],
                )
        finally:
            vision.remove()
        end = time.perf_counter()
        new = out[0, n_prompt:].tolist()
        stopped = bool(new) and new[-1] in STOP_IDS
        if stopped:
            new = new[:-1]
        text = self.processor.tokenizer.decode(new, skip_special_tokens=True)
        t_first = first.t or end
        return Generation(
            text=text,
            finish_reason="stop" if stopped else "length",
            prompt_tokens=n_prompt,
            image_tokens=n_image,
            completion_tokens=len(new),
            vision_s=vision.total,
            prefill_s=t_first - t0,
            decode_s=end - t_first,
            # One decode step per answer token fed back (no drafting here); a cut answer's
            # last token is not.
            forward_passes=len(new) if stopped else max(len(new) - 1, 0),
        )

    def _vision_module(self):
        inner = getattr(self.model, "model", self.model)
        return getattr(inner, "visual", None)

    # -- teacher forcing ---------------------------------------------------------------

    def answer_logprobs(
        self, images: list[PreparedImage], prompt: str | list[dict[str, Any]], answer: list[int]
    ):
        """Log-probabilities (float32, [len(answer), vocab]) the model assigns at each answer
        position when the answer is forced after the prompt."""
        torch = self.torch
        batch = self.inputs(images, prompt)
        n_prompt = int(batch["input_ids"].shape[1])
        ans = torch.tensor([answer], dtype=batch["input_ids"].dtype, device=self.device)
        batch["input_ids"] = torch.cat([batch["input_ids"], ans], dim=1)
        batch["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones_like(ans)], 1)
        if "mm_token_type_ids" in batch:
            batch["mm_token_type_ids"] = torch.cat(
                [batch["mm_token_type_ids"], torch.zeros_like(ans)], dim=1
            )
        with torch.inference_mode():
            logits = self.model(**batch).logits[0, n_prompt - 1 : n_prompt - 1 + len(answer)]
        return torch.log_softmax(logits.float(), dim=-1).cpu().numpy()

    def answer_tokens(self, text: str) -> list[int]:
        """An answer's token ids as the model would emit them, ending with <|im_end|>."""
        return self.processor.tokenizer.encode(text, add_special_tokens=False) + [STOP_IDS[0]]

    def prompt_text_tokens(
        self, images: list[PreparedImage], prompt: str | list[dict[str, Any]]
    ) -> list[int]:
        """The prompt's token ids with image placeholders removed (to compare tokenizers)."""
        ids = self.inputs(images, prompt)["input_ids"][0].tolist()
        return [t for t in ids if t != self.model.config.image_token_id]


class _FirstCall:
    """A logits processor that only notes when generation first asks for logits: that is
    when the prefill forward pass has finished."""

    def __init__(self):
        self.t: float | None = None

    def __call__(self, input_ids, scores):
        if self.t is None:
            self.t = time.perf_counter()
        return scores


class _GrammarMask:
    """The grammar as a logits mask over one sequence (xgrammar's matcher): the token
    chosen last step is accepted, then the next step's scores are masked to what the
    grammar allows. Greedy decoding takes a shortcut with the same result: when the
    scores' own argmax is allowed (the matcher accepts it), it is the masked argmax too
    (masking only lowers other scores; ties keep the first index), so the full mask
    over the vocabulary is not built. A bounded string (`char{0,N}`) makes the mask
    depend on the count so far, and building it costs up to hundreds of milliseconds a
    token with a large N; inside a string the argmax is almost always allowed. Sampling
    always builds the mask (the draw is over the masked distribution)."""

    def __init__(self, compiled: Any, sampling: Sampling):
        import xgrammar as xgr

        self.xgr = xgr
        self.matcher = xgr.GrammarMatcher(compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, compiled.tokenizer_info.vocab_size)
        self.greedy = sampling.temperature <= 0
        self.started = False
        self.accepted: int | None = None  # the greedy shortcut's token, accepted already

    def __call__(self, input_ids, scores):
        if input_ids.shape[0] != 1:
            raise VermError("grammar masking runs one sequence at a time")
        m = self.matcher
        if self.started and not m.is_terminated():
            last = int(input_ids[0, -1])
            if self.accepted is None and not m.accept_token(last):
                raise VermError(f"the grammar refused token {last}, which it had allowed")
        self.started, self.accepted = True, None
        if m.is_terminated():
            return scores
        if self.greedy:
            top = int(scores[0].argmax())
            if m.accept_token(top):
                self.accepted = top
                return scores
        m.fill_next_token_bitmask(self.bitmask, 0)
        device = scores.device
        scores = scores.to("cpu") if device.type not in ("cpu", "cuda") else scores
        self.xgr.apply_token_bitmask_inplace(scores, self.bitmask.to(scores.device))
        return scores.to(device)


class _VllmLogits:
    """vLLM's order of logits processing in one step: repetition penalty (prompt and
    output tokens), presence penalty (output tokens), the grammar's mask, then
    temperature, top-k and top-p (sampling only)."""

    def __init__(self, sampling: Sampling, n_prompt: int, grammar: Any = None):
        self.s, self.n_prompt, self.grammar = sampling, n_prompt, grammar

    def __call__(self, input_ids, scores):
        import torch

        s = self.s
        if s.repeat_penalty != 1.0:
            seen = scores.gather(1, input_ids)
            seen = torch.where(seen < 0, seen * s.repeat_penalty, seen / s.repeat_penalty)
            scores = scores.scatter(1, input_ids, seen)
        if s.presence_penalty and input_ids.shape[1] > self.n_prompt:
            out = scores.new_zeros(scores.shape)
            out.scatter_(1, input_ids[:, self.n_prompt :], 1.0)
            scores = scores - s.presence_penalty * out
        if self.grammar is not None:
            scores = self.grammar(input_ids, scores)
        if s.temperature > 0:
            scores = scores / s.temperature
            if s.top_k > 0:
                kth = scores.topk(min(s.top_k, scores.shape[-1]), dim=-1).values[..., -1:]
                scores = scores.masked_fill(scores < kth, float("-inf"))
            if s.top_p < 1.0:
                ordered, index = scores.sort(dim=-1, descending=True)
                probs = ordered.softmax(dim=-1)
                drop = probs.cumsum(dim=-1) - probs > s.top_p  # keep the first over top_p
                ordered = ordered.masked_fill(drop, float("-inf"))
                scores = torch.full_like(scores, float("-inf")).scatter(1, index, ordered)
        return scores


class _Stopwatch:
    """Sums the wall time spent inside a module's forward (the vision tower)."""

    def __init__(self, module):
        self.total = 0.0
        self._t = 0.0
        self._handles = []
        if module is not None:
            self._handles.append(module.register_forward_pre_hook(self._start))
            self._handles.append(module.register_forward_hook(self._stop))

    def _start(self, *_):
        self._t = time.perf_counter()

    def _stop(self, *_):
        self.total += time.perf_counter() - self._t

    def remove(self):
        for h in self._handles:
            h.remove()
