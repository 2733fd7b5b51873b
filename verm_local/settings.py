"""Every environment variable verm-local reads, declared once with its default and a
one-line description (`verm-local doctor` lists them with their current values).

Nothing else in the package reads or writes the environment: modules ask `settings()`
for the values, and `child_env()` / `export_default()` are the only ways a variable is
handed to another program or library. Settings are read afresh on each call (cheap), so a
changed environment (tests, `monkeypatch.setenv`) is seen at once."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .errors import InputError

PREFIX = "VERM_LOCAL_"


class Settings(BaseSettings):
    """verm-local's environment. Field `x` is read from `VERM_LOCAL_X` unless it says
    otherwise."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, extra="ignore", populate_by_name=True)

    home: Path | None = Field(
        None, description="The model store (default: the user cache dir + /models)."
    )
    cache: Path | None = Field(
        None,
        description="Cache for build inputs (llama.cpp sources) and crash logs "
        "(default: the user cache dir).",
    )
    model: str | None = Field(
        None, description="Model for judge and serve when --model is not given."
    )
    repo: str | None = Field(
        None, description="Hugging Face repository of prebuilt quantized variants."
    )
    sdist: Path | None = Field(
        None,
        description="A llama-cpp-python sdist tarball to take llama.cpp's converter "
        "from (default: fetched once with pip).",
    )
    repack: Literal["auto", "on", "off"] = Field(
        "auto",
        description="llama.cpp weight repacking / extra buffer types (AMX): auto "
        "(off on CPUs with AMX), on or off; --repack/--no-repack win.",
    )
    deterministic: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Greedy judgements that do not depend on the path (alone, batched, "
        "drafted, prefix-cached): auto (wherever the llama.cpp build and device allow), on "
        "(refuse where they cannot), off (llama.cpp's faster multi-row kernels); "
        "--deterministic/--no-deterministic win.",
    )
    llama_cpp_lib_path: Path | None = Field(
        None,
        validation_alias=AliasChoices("LLAMA_CPP_LIB_PATH"),
        description="LLAMA_CPP_LIB_PATH: llama-cpp-python loads llama.cpp from this folder "
        "instead of its own lib/ (another build); verm-local looks there too.",
    )
    mtmd_cpp_lib: Path | None = Field(
        None,
        validation_alias=AliasChoices("MTMD_CPP_LIB"),
        description="MTMD_CPP_LIB: the folder llama-cpp-python loads libmtmd (the vision "
        "projector) from instead of its own lib/.",
    )
    threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads (llama.cpp, torch, ONNX Runtime) when --threads is not "
        "given (default: one per physical core, no more than the CPUs this process may "
        "use: its affinity and the container's CPU quota).",
    )
    api_key: str | None = Field(
        None,
        description="serve: require `Authorization: Bearer KEY` on /v1 and /metrics; the "
        "RL integrations send it to VERM_LOCAL_REWARD_URL.",
    )
    prompts_url: str = Field(
        "https://raw.githubusercontent.com/InternLM/Visual-ERM",
        description="Where pull fetches the authors' files with the training prompts "
        "(a mirror of raw.githubusercontent.com/<owner>/<repo>).",
    )
    browser: str | None = Field(
        None,
        description="Chromium/Chrome binary that renders predicted HTML tables for "
        "compute_score (default: found on PATH).",
    )
    reward_scale: float | None = Field(
        None, gt=0, description="chart/svg reward: the S divisor (default 50)."
    )
    parse_fail_severity: float | None = Field(
        None,
        description="chart/svg reward: S for an answer unreadable after its tries (default 25).",
    )
    render_fail_reward: float | None = Field(
        None,
        description="chart/svg reward for no code, a failed or an all-white render (default 0.0).",
    )
    table_fail_reward: float | None = Field(
        None, description="table reward for an unreadable answer or any failure (default -4)."
    )
    sandbox: Literal["auto", "bwrap", "limited", "none"] = Field(
        "auto",
        description="The sandbox model-written code renders in: auto (the strongest "
        "this machine offers), or a weaker level on purpose (limited, none).",
    )
    unsafe_render: bool = Field(
        False,
        description="Render model-written code even where no sandbox is available "
        "(--unsafe-render); refused otherwise.",
    )
    debug: bool = Field(False, description="Show tracebacks of internal errors.")
    crash_test: str | None = Field(
        None,
        description="Testing only: raise this signal (SEGV, ABRT, ILL, BUS) at the "
        "first native step, to check crash reporting.",
    )
    reward_url: str | None = Field(
        None,
        description="RL integrations (verl, OpenRLHF, TRL): the reward server, one Ray Serve "
        "URL or a comma-separated list of `verm-local serve` URLs.",
    )
    policy_api_key: str | None = Field(
        None, description="refine: the policy endpoint's key (default: OPENAI_API_KEY)."
    )
    openai_api_key: str | None = Field(
        None,
        validation_alias=AliasChoices("OPENAI_API_KEY"),
        description="OPENAI_API_KEY: key for the LLM matcher of bench agreement.",
    )
    github_step_summary: Path | None = Field(
        None,
        validation_alias=AliasChoices("GITHUB_STEP_SUMMARY"),
        description="GITHUB_STEP_SUMMARY: bench latency appends its table and verdict here.",
    )

    @field_validator("*", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        """`VAR=` (set but empty) means the default, as a shell user expects."""
        return None if value == "" else value


def settings() -> Settings:
    """The current settings (read from the environment now). A malformed value is the
    user's to fix: one InputError naming the variable."""
    from pydantic import ValidationError

    try:
        return Settings()
    except ValidationError as exc:
        err = exc.errors()[0]
        name = PREFIX + str(err["loc"][0]).upper() if err.get("loc") else "environment"
        raise InputError(f"{name}: {err['msg']}") from None


def describe() -> list[dict[str, str]]:
    """Every variable: name, current value (secrets masked), default, description."""
    current = settings()
    rows = []
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        env = alias.choices[0] if isinstance(alias, AliasChoices) else PREFIX + name.upper()
        value = getattr(current, name)
        if value is not None and ("key" in name or "token" in name):
            value = "***"
        rows.append(
            {
                "variable": env,
                "value": "" if value is None else str(value),
                "default": "" if field.default is None else str(field.default),
                "description": field.description or "",
            }
        )
    return rows


def child_env(**extra: str | None) -> dict[str, str]:
    """This process's environment for a child program, with `extra` set (None: removed)."""
    env = dict(os.environ)
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def export_default(name: str, value: str) -> None:
    """Set a variable a library reads (GPTQModel's worker count, tokenizers' threads)
    unless the user set it."""
    os.environ.setdefault(name, value)


def environ(name: str) -> str | None:
    """A variable of another program, read for a child's command line (PYTHONPATH)."""
    return os.environ.get(name)


def hub_endpoint(given: str | None = None) -> str | None:
    """The hub to talk to: `given`, else HF_ENDPOINT as the environment says it now.
    huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE once, when it is first imported;
    a process that sets them later (a notebook, an RL trainer's worker, a harness calling
    the CLI in-process) would still reach hf.co. None: huggingface_hub's default."""
    value = given or os.environ.get("HF_ENDPOINT")
    return value.rstrip("/") if value else None


def hub_offline_now() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as the environment says it now."""
    said = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return said.strip().upper() in {"1", "ON", "YES", "TRUE"}
