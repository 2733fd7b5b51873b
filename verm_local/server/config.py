"""What `verm-local serve` runs with: one pydantic model, filled from the CLI's options
(and the API key from VERM_LOCAL_API_KEY through the settings module)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ServeConfig(BaseModel):
    model: str | None = Field(None, description="Model to serve (default: the plan's).")
    variant: str | None = Field(None, description="Store variant to serve.")
    host: str = Field("127.0.0.1", description="Interface to bind.")
    port: int = Field(8000, ge=0, le=65535)
    parallel: int = Field(4, ge=1, le=64, description="Requests run at once in the model.")
    api_key: str | None = Field(None, description="Bearer key required on /v1 and /metrics.")
    affinity: bool = Field(
        True, description="--replicas: send requests sharing a ground truth to one replica."
    )
    unsafe_render: bool | None = Field(
        None, description="/v1/critique: render code even with no sandbox (default: setting)."
    )
    max_image_bytes: int = Field(20 << 20, ge=1)
    max_request_bytes: int = Field(64 << 20, ge=1)
    timeout: float = Field(300.0, gt=0, description="Seconds a request may take.")
    queue_size: int = Field(64, ge=1, description="Requests that may wait; more get 429.")
    # A group of requests arriving together (one RL step's rollouts) forms one batch: the
    # dispatcher waits this long after the first for the rest, and no longer once
    # `parallel` requests are in.
    batch_window: float = Field(0.05, ge=0)
    prefix_cache: int = Field(4, ge=0, description="Ground-truth prefixes kept evaluated.")
    image_tokens: int | None = Field(
        None, ge=1, description="Cap on visual tokens per image (chat images: 1024 if unset)."
    )
    max_tokens: int | None = Field(
        None, ge=1, description="Cap on answer tokens (default: the largest trained cap, 8192)."
    )
    threads: int | None = None
    gpu_layers: int | None = None
    vision: str = "auto"
    repack: bool | None = None
    speculate: bool | None = Field(
        None,
        description="Draft grammar-dictated text and keep what the sampler picks (default: "
        "where decoding is deterministic).",
    )
    deterministic: bool | None = Field(
        None,
        description="Batch-invariant decoding: a request's answer does not depend on the "
        "requests batched beside it (default: wherever the build and device allow).",
    )
    allow_remote_images: bool = False
    allow_local_images: bool = False
    served_name: str | None = None
    crash_log: str | None = Field(None, description="Set per worker: its crash log.")

    @property
    def answer_cap(self) -> int:
        return self.max_tokens or 8192

    @property
    def chat_image_tokens(self) -> int:
        return self.image_tokens or 1024
