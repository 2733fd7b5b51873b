"""Human-readable rendering of a Judgement for the terminal."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .constants import SEVERITY_NAMES
from .schema import Judgement


def print_judgement(result: Judgement, console: Console | None = None) -> None:
    console = console or Console()
    with_location = any(e.location is not None for e in result.errors)
    table = Table(title=f"{result.task} discrepancies (image 2 vs image 1)", show_lines=False)
    table.add_column("#", justify="right")
    table.add_column("category")
    table.add_column("severity")
    if with_location:
        table.add_column("location")
    table.add_column("description", overflow="fold")
    for i, e in enumerate(result.errors, 1):
        cells = [str(i), e.category, f"{e.severity} {SEVERITY_NAMES[e.severity]}"]
        if with_location:
            cells.append(Text(e.location or ""))
        table.add_row(*cells, Text(e.description))
    if not result.complete:
        console.print(
            f"incomplete judgement: {result.problem}",
            style="bold red",
            markup=False,
            highlight=False,
        )
    elif result.errors:
        console.print(table)
    else:
        console.print("no discrepancies found")
    counts = ", ".join(f"{k} {v}" for k, v in result.counts.items())
    console.print(f"counts: {counts}")
    console.print(
        f"total severity {result.total_severity:g}  ->  reward {result.reward:.3f} "
        f"(judge's term, score {result.rm_reward:.3f})",
        style="bold",
    )
    t, m = result.timings, result.model
    console.print(
        f"model {m.path} ({m.quant}, vision {m.vision}); prompt {result.prompt_source}; "
        f"load {t.load_s:.2f} s, vision {t.vision_s:.2f} s, prefill {t.prefill_s:.2f} s "
        f"({t.prompt_tokens} tokens), decode {t.decode_s:.2f} s ({t.completion_tokens} tokens)",
        style="dim",
        markup=False,
        highlight=False,
    )


def print_request(described: dict, console: Console | None = None) -> None:
    """`judge --dry-run`: the request as it would be sent."""
    console = console or Console(highlight=False)
    console.print(
        f"[bold]{described['task']} request[/bold] (prompt: {described['prompt_source']})"
    )
    for m in described["messages"]:
        content = m["content"]
        if isinstance(content, str):
            console.print(f"  {m['role']}: {content}", markup=False)
            continue
        console.print(f"  {m['role']}:", markup=False)
        for p in content:
            if p.get("type") == "image":
                w, h = p["size"]
                sw, sh = p["sent_size"]
                console.print(
                    f"    image {p['source']}: sent as {p['encoding']} {sw}x{sh}, "
                    f"seen at {w}x{h} ({p['visual_tokens']} visual tokens)",
                    markup=False,
                )
            else:
                console.print("    text: " + p["text"].replace("\n", "\n          "), markup=False)
    b, d = described.get("bounds"), described["decoding"]
    console.print(f"  decoding: {d}", markup=False)
    if b:
        console.print(
            f"  answer: at most {b['max_errors']} errors, strings "
            f"{b['max_lengths']} characters (schema: --json)",
            markup=False,
        )
    else:
        console.print("  answer: free (no schema)")
    console.print(f"  reward: {described['reward']['recipe']}", markup=False)


def print_rows(rows: list[dict], title: str, console: Console | None = None) -> None:
    """A list of flat dicts as a table (store listing, catalog)."""
    console = console or Console()
    if not rows:
        console.print(f"{title}: empty")
        return
    table = Table(title=title)
    for key in rows[0]:
        table.add_column(key, overflow="fold")
    for row in rows:
        table.add_row(*(Text(_human(k, v)) for k, v in row.items()))
    console.print(table)


def _human(key: str, value: object) -> str:
    if key == "size" and isinstance(value, int):
        return f"{value / 1e9:.2f} GB" if value >= 1e8 else f"{value / 1e6:.1f} MB"
    return str(value)


def print_doctor(
    hw,
    plan,
    path,
    settings_rows: list[dict] | None = None,
    console: Console | None = None,
    sandbox: dict | None = None,
    build: str = "",
) -> None:
    """`verm-local doctor`: the hardware record, the plan and its reasons."""
    console = console or Console(highlight=False)
    gb = 1e9
    console.print("[bold]machine[/bold]")
    cores = f"{hw.cores_physical or '?'} cores / {hw.cores_logical} threads"
    console.print(
        f"  cpu      {hw.cpu_model or hw.arch} ({cores}); "
        f"{', '.join(hw.cpu_flags) or 'no SIMD flags seen'}",
        markup=False,
    )
    console.print(f"  ram      {hw.ram_total / gb:.1f} GB, {hw.ram_available / gb:.1f} GB free")
    for g in hw.cuda:
        console.print(
            f"  cuda:{g.index}   {g.name}, {g.total_bytes / gb:.1f} GB, "
            f"{g.free_bytes / gb:.1f} GB free",
            markup=False,
        )
    if not hw.cuda:
        console.print("  cuda     none")
    metal = f"yes, working set {hw.metal_working_set / gb:.1f} GB" if hw.metal else "no"
    console.print(f"  metal    {metal}")
    console.print(
        f"  llama.cpp {hw.llama_cpp_version or 'not installed'}; GPU offload "
        f"{'yes' if hw.llama_gpu_offload else 'no (CPU build)'}"
    )
    torch = hw.torch_version or "not installed"
    if hw.torch_version:
        torch += f", CUDA {'yes' if hw.torch_cuda else 'no'}"
    console.print(
        f"  torch    {torch}; GPTQModel {'yes' if hw.gptqmodel else 'no'}; "
        f"onnxruntime {', '.join(hw.onnxruntime_providers) or 'no'}",
        markup=False,
    )
    console.print("[bold]plan[/bold]")
    layers = {-1: "all", 0: "none"}.get(plan.gpu_layers, str(plan.gpu_layers))
    console.print(
        f"  {plan.variant} on {plan.backend}, device {plan.device}, GPU layers "
        f"{layers}, {plan.threads} threads, context {plan.n_ctx}; needs "
        f"{plan.memory_bytes / gb:.1f} GB of {plan.budget_bytes / gb:.1f} GB",
        markup=False,
    )
    console.print(f"  vision   {plan.vision}", markup=False)
    console.print(f"  repack   {plan.repack_reason}", markup=False)
    console.print(f"  determinism {plan.deterministic.reason}", markup=False)
    if build:
        console.print(f"  build    {build}", markup=False)
    pre = plan.prefill
    console.print(
        f"  prefill  n_ubatch {pre.n_ubatch}, flash attention "
        f"{'on' if pre.flash_attn else 'off'}, KV {pre.kv_type}: {pre.reason}",
        markup=False,
    )
    for reason in plan.reasons:
        console.print(f"  why      {reason}", markup=False)
    where = str(path) if path else f"not in the store: run `verm-local pull {plan.variant}`"
    console.print(f"  store    {where}", markup=False)
    if sandbox is not None:
        console.print("[bold]sandbox[/bold] (where model-written code renders)")
        console.print(f"  level    {sandbox['name']}: {sandbox['reason']}", markup=False)
    if settings_rows:
        table = Table(title="settings (environment)", title_justify="left")
        for col in ("variable", "value", "description"):
            table.add_column(col, overflow="fold")
        for row in settings_rows:
            table.add_row(
                Text(row["variable"]),
                Text(row["value"] or f"({row['default'] or 'unset'})"),
                Text(row["description"]),
            )
        console.print(table)
