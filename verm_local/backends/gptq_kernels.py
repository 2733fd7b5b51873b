"""GPTQModel's CPU kernels, built ahead of first use:
`python -m verm_local.backends.gptq_kernels` (scripts/install.sh runs it once).

GPTQModel compiles its CPU kernels (torch C++ extensions) the first time a process needs
one, and keeps them in its cache (~/.cache/gptqmodel). Left to that, the first
`convert gptq` on a machine waits for the packer (30 s on 2 cores), and the first GPTQ
judgement on an AVX512-BF16 CPU for the fused int4 kernel (85 s), with nothing on the
screen. Which ones this machine loads is `hardware.gptq_cpu_kernels`."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable


def build_gptq_kernels(names: Iterable[str]) -> list[tuple[str, float, str | None]]:
    """Build each of GPTQModel's extensions `names`, or load the build in its cache:
    (name, seconds, None) when it loads, (name, seconds, why) when it does not (GPTQModel
    then takes a slower path of its own: the Python packer, another kernel)."""
    from gptqmodel import extension

    results = []
    for name in names:
        t0 = time.perf_counter()
        try:
            extension.load(name)
        except Exception as exc:  # noqa: BLE001 - any compile failure: reported, GPTQModel falls back
            # GPTQModel's message: "Extension load failed:\n- NAME: NAME: why | build_root=..."
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            why = lines[-1] if lines else type(exc).__name__
            for prefix in (f"- {name}:", f"{name}:"):
                why = why.removeprefix(prefix).strip()
            why = why.split(" | ")[0]
            results.append((name, time.perf_counter() - t0, why))
        else:
            results.append((name, time.perf_counter() - t0, None))
    return results


def main() -> int:
    """One line per kernel; exit 0 even where one does not build: GPTQModel works without
    it, more slowly, and `verm-local` needs GPTQModel only for GPTQ models. GPTQModel's
    own log and compile progress go to stderr."""
    import contextlib
    import importlib.util

    from ..errors import first_line
    from ..hardware import gptq_cpu_kernels, probe

    if importlib.util.find_spec("gptqmodel") is None:
        print("GPTQModel is not installed: no GPTQ kernels to build")
        return 0
    try:
        with contextlib.redirect_stdout(sys.stderr):
            results = build_gptq_kernels(gptq_cpu_kernels(probe(with_torch=False)))
    except Exception as exc:  # noqa: BLE001 - GPTQModel does not import: the install goes on
        print(f"GPTQModel kernels not built ({first_line(exc)})")
        return 0
    for name, seconds, why in results:
        if why is None:
            print(f"GPTQModel kernel {name}: ready ({seconds:.0f} s)")
        else:
            print(f"GPTQModel kernel {name}: not built, GPTQModel falls back ({why})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
