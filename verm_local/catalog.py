"""The variants of Visual-ERM that verm-local knows: format, backend, size, memory, source.

Sizes are those of the real 8B model (Qwen3-VL-8B shape), approximate, in bytes (1 GB =
1e9). A prebuilt quantized variant is looked for in the repository set by `--repo` or
VERM_LOCAL_REPO, laid out as the converters write it:

    <repo>/manifest.json, model-<QUANT>.gguf, mmproj-f16.gguf     (`convert gguf` output)
    <repo>/gptq-int4/..., <repo>/gptq-int8/...                     (`convert gptq` outputs)

A variant that repository does not publish is built locally from the bf16 checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import InputError

BF16_REPO = "internlm/Visual-ERM"
GB = 1_000_000_000

MMPROJ_F16_BYTES = int(1.16 * GB)


@dataclass(frozen=True)
class Variant:
    name: str
    format: str  # "hf" | "gguf" | "gptq"
    backend: str  # "transformers" | "llamacpp"
    quant: str  # GGUF quant type, "bf16", or "gptq-int4" / "gptq-int8"
    size_bytes: int  # files on disk, approximate (real 8B model)
    text_bytes: int  # of which the language model (what GPU layers split)
    files: tuple[str, ...] = ()  # published file names ("" = a whole folder, see subfolder)
    subfolder: str = ""
    sha256: dict[str, str] = field(default_factory=dict)  # where published and known
    build_ratio: float = 1.0  # output size / bf16 size, for the disk check of a local build

    @property
    def published_in_bf16_repo(self) -> bool:
        return self.format == "hf"

    def memory_bytes(
        self,
        n_ctx: int,
        dtype_bytes: int = 2,
        *,
        one_shot: bool = False,
        flash_attn: bool = False,
        n_ubatch: int = 512,
        kv_type: str = "f16",
    ) -> int:
        """Peak memory of a judgement at context `n_ctx`, by the one memory model
        (`memory.py`). llama.cpp: weights, KV cache, compute buffers (`one_shot`: the
        vision phase and the text phase apart, as `judge` runs). transformers: weights
        (float32 on a CPU doubles bf16), KV cache and eager activations."""
        from .memory import estimate_llamacpp, estimate_transformers

        if self.backend == "llamacpp":
            return estimate_llamacpp(
                self.text_bytes,
                self.size_bytes - self.text_bytes,
                n_ctx,
                kv_type=kv_type,
                flash_attn=flash_attn,
                n_ubatch=n_ubatch,
                one_shot=one_shot,
            ).peak
        weights = self.size_bytes * dtype_bytes // 2 if self.format == "hf" else self.size_bytes
        return estimate_transformers(weights, n_ctx)

    def source(self, repo: str | None) -> str:
        if self.format == "hf":
            return f"hf://{BF16_REPO}"
        if repo:
            where = f"{repo}/{self.subfolder}" if self.subfolder else repo
            return f"hf://{where} (else build from bf16)"
        return "build from bf16"


def _gguf(quant: str, text_gb: float, ratio: float) -> Variant:
    text = int(text_gb * GB)
    return Variant(
        name=f"gguf-{quant.lower()}",
        format="gguf",
        backend="llamacpp",
        quant=quant,
        size_bytes=text + MMPROJ_F16_BYTES,
        text_bytes=text,
        files=(f"model-{quant}.gguf", "mmproj-f16.gguf"),
        build_ratio=ratio,
    )


def _gptq(bits: int, gb: float, ratio: float) -> Variant:
    size = int(gb * GB)
    return Variant(
        name=f"gptq-int{bits}",
        format="gptq",
        backend="transformers",
        quant=f"gptq-int{bits}",
        size_bytes=size,
        text_bytes=size - MMPROJ_F16_BYTES,
        subfolder=f"gptq-int{bits}",
        build_ratio=ratio,
    )


CATALOG: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant(
            name="bf16",
            format="hf",
            backend="transformers",
            quant="bf16",
            size_bytes=int(17.5 * GB),
            text_bytes=int(16.4 * GB),
        ),
        _gguf("F16", 16.4, 1.0),
        _gguf("Q8_0", 8.71, 0.53),
        _gguf("Q6_K", 6.73, 0.41),
        _gguf("Q5_K_M", 5.85, 0.36),
        _gguf("Q4_K_M", 5.03, 0.31),
        _gptq(4, 7.2, 0.45),
        _gptq(8, 10.6, 0.65),
    )
}

# Best fidelity first, within each format.
GGUF_LADDER: tuple[str, ...] = ("gguf-q8_0", "gguf-q6_k", "gguf-q5_k_m", "gguf-q4_k_m")


# Bits per weight of llama.cpp's quant mixes (its quantize tool's table, rounded up): the
# size of a community GGUF outside the catalog (`pull hf.co/USER/REPO:QUANT`), from F16's.
BITS_PER_WEIGHT = {
    "F32": 32.0, "BF16": 16.0, "Q8_0": 8.5, "Q6_K": 6.6, "Q5_1": 6.0, "Q5_K_M": 5.7,
    "Q5_K_S": 5.6, "Q5_0": 5.5, "Q4_1": 5.0, "Q4_K_M": 4.9, "Q4_K_S": 4.6, "Q4_0": 4.5,
    "IQ4_NL": 4.5, "IQ4_XS": 4.3, "Q3_K_L": 4.3, "Q3_K_M": 3.9, "IQ3_M": 3.7, "Q3_K_S": 3.5,
    "IQ3_S": 3.5, "IQ3_XS": 3.3, "IQ3_XXS": 3.1, "Q2_K": 3.4, "Q2_K_S": 3.0, "IQ2_M": 2.7,
    "IQ2_S": 2.5, "IQ2_XS": 2.3, "IQ2_XXS": 2.1, "IQ1_M": 1.8, "IQ1_S": 1.6,
}  # fmt: skip


def gguf_variant(quant: str) -> Variant:
    """The catalog's GGUF variant of `quant`, or one for a quant the catalog does not build
    (a community GGUF: IQ4_XS, Q3_K_M, ...), sized by its bits per weight."""
    quant = quant.upper()
    name = f"gguf-{quant.lower()}"
    if name in CATALOG:
        return CATALOG[name]
    f16 = CATALOG["gguf-f16"]
    bpw = BITS_PER_WEIGHT.get(quant, 8.5)  # unknown: sized as Q8_0, never too small
    return _gguf(quant, f16.text_bytes / GB * bpw / 16, bpw / 16)


def get_variant(name: str) -> Variant:
    key = name.strip().lower()
    if key not in CATALOG:
        quant = key.removeprefix("gguf-").upper()
        if key.startswith("gguf-") and quant in BITS_PER_WEIGHT:
            return gguf_variant(quant)
        raise InputError(
            f"unknown variant {name!r}; choose from {', '.join(CATALOG)} (or gguf-<quant> "
            "for a GGUF pulled from the hub)"
        )
    return CATALOG[key]


def quantized_repo(repo: str | None = None) -> str | None:
    """The repository of prebuilt quantized files: --repo, else VERM_LOCAL_REPO, else none
    (every quantized variant is then built from bf16)."""
    from .settings import settings

    return repo or settings().repo or None


def catalog_rows(n_ctx: int, repo: str | None = None) -> list[dict]:
    """The catalog as printable rows (for `verm-local models --catalog` and the docs)."""
    repo = quantized_repo(repo)
    return [
        {
            "variant": v.name,
            "format": v.format,
            "backend": v.backend,
            "size_gb": round(v.size_bytes / GB, 1),
            "memory_gb": round(v.memory_bytes(n_ctx) / GB, 1),
            "source": v.source(repo),
        }
        for v in CATALOG.values()
    ]
