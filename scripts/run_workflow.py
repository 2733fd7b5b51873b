#!/usr/bin/env python3
"""Run a GitHub Actions workflow's shell steps here, in order, with the same commands:

    python scripts/run_workflow.py examples/ci/github-actions.yml [--workspace DIR]
        [--skip "Install verm-local"] [--env KEY=VALUE ...]

What GitHub's runner would provide is provided: a workspace (a new temporary directory
unless --workspace), the `env:` of the workflow, job and step (`${{ github.workspace }}`
and `${{ runner.temp }}` filled in), the files behind GITHUB_OUTPUT, GITHUB_ENV,
GITHUB_PATH and GITHUB_STEP_SUMMARY (what a step writes to GITHUB_ENV and GITHUB_PATH
reaches the steps after it), and `bash -eo pipefail` as the shell. `uses:` steps are
actions, not commands: the checkout of verm-local becomes a link to this checkout, the
others (the user's checkout, caches, uploads) are skipped and said so. Exits with the
first failing step's status; the step summary is printed at the end.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
_EXPR = re.compile(r"\$\{\{\s*([^}]*?)\s*\}\}")


def _fill(value: object, context: dict[str, str]) -> str:
    """`${{ github.workspace }}`-style expressions that this runner knows; any other is an
    error (a step that needs one cannot run the same here)."""

    def one(m: re.Match) -> str:
        key = m.group(1)
        if key in context:
            return context[key]
        raise SystemExit(f"run_workflow: cannot evaluate ${{{{ {key} }}}} outside GitHub")

    return _EXPR.sub(one, str(value))


def _read_env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            out[k] = v
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workflow", type=Path)
    ap.add_argument("--workspace", type=Path, default=None)
    ap.add_argument("--job", default=None, help="Job id (default: the only one).")
    ap.add_argument("--skip", action="append", default=[], help="A step name to skip.")
    ap.add_argument("--env", action="append", default=[], help="KEY=VALUE over the workflow's.")
    a = ap.parse_args(argv)

    flow = yaml.safe_load(a.workflow.read_text())
    jobs = flow["jobs"]
    job = jobs[a.job] if a.job else next(iter(jobs.values()))
    ws = (a.workspace or Path(tempfile.mkdtemp(prefix="workflow-"))).resolve()
    ws.mkdir(parents=True, exist_ok=True)
    temp = ws / ".runner-temp"
    temp.mkdir(exist_ok=True)
    files = {
        name: temp / name.lower()
        for name in ("GITHUB_OUTPUT", "GITHUB_ENV", "GITHUB_PATH", "GITHUB_STEP_SUMMARY")
    }
    for f in files.values():
        f.touch()
    context = {"github.workspace": str(ws), "runner.temp": str(temp)}
    env = dict(os.environ)
    env.update({"GITHUB_WORKSPACE": str(ws), "RUNNER_TEMP": str(temp), "CI": "true"})
    env.update({k: str(v) for k, v in files.items()})
    for scope in (flow.get("env") or {}, job.get("env") or {}):
        env.update({k: _fill(v, context) for k, v in scope.items()})
    env.update(dict(kv.split("=", 1) for kv in a.env))
    context.update({f"env.{k}": v for k, v in env.items()})
    paths: list[str] = []

    for i, step in enumerate(job["steps"], 1):
        name = step.get("name") or step.get("uses") or f"step {i}"
        if name in a.skip:
            print(f"== [{i}] {name}: skipped (--skip)", file=sys.stderr)
            continue
        if "uses" in step:
            target = (step.get("with") or {}).get("path")
            if step["uses"].startswith("actions/checkout") and target:
                link = ws / target
                if not link.exists():
                    link.symlink_to(ROOT, target_is_directory=True)
                print(f"== [{i}] {name}: {target} -> {ROOT}", file=sys.stderr)
            else:
                print(f"== [{i}] {name}: an action ({step['uses']}), skipped", file=sys.stderr)
            continue
        step_env = dict(env)
        step_env.update({k: _fill(v, context) for k, v in (step.get("env") or {}).items()})
        step_env["PATH"] = os.pathsep.join(paths + [env.get("PATH", "")])
        script = temp / f"step-{i}.sh"
        script.write_text(_fill(step["run"], context))
        print(f"== [{i}] {name}", file=sys.stderr)
        rc = subprocess.run(
            ["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)],
            cwd=ws,
            env=step_env,
        ).returncode
        if rc != 0:
            print(f"run_workflow: step {i} ({name}) failed with exit code {rc}", file=sys.stderr)
            return rc
        env.update(_read_env_file(files["GITHUB_ENV"]))
        context.update({f"env.{k}": v for k, v in env.items()})
        paths = [p for p in files["GITHUB_PATH"].read_text().splitlines() if p.strip()][::-1]
    summary = files["GITHUB_STEP_SUMMARY"].read_text()
    print(f"== step summary ({files['GITHUB_STEP_SUMMARY']}):\n{summary}", file=sys.stderr)
    print(f"run_workflow: all steps passed in {ws}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
