"""The sandbox every render of code a model wrote runs in (chart code for compute_score,
`render`, `refine`, the server's critique): whatever calls the renderer, the code runs
here, never in the caller's process or with the caller's rights.

Levels, decided from the machine (`level()`, shown by `verm-local doctor`):

- `bwrap` (Linux with bubblewrap and user namespaces): the child sees only what the
  renderer needs, read-only (the system's /usr and /etc/fonts, the Python installation
  and its site-packages), its own tmpfs of bounded size as its only writable place and
  working directory, no network (its own empty network namespace), its own PID namespace
  (the whole tree dies with it), a scrubbed environment;
- `limited` (no namespaces; macOS adds `sandbox-exec` with a profile that denies the
  network and writes outside the work directory): resource limits, a scrubbed
  environment, a work directory of its own;
- `none` (neither): rendering is refused unless the user says `--unsafe-render`
  (`VERM_LOCAL_UNSAFE_RENDER=1`).

At every level a small launcher sets the limits before the renderer starts: memory
(RLIMIT_DATA), CPU seconds, file size, processes (RLIMIT_NPROC, counted for the user the
child runs as: started as root, the child runs as `nobody`, so the limit holds), no core
files; the parent kills the whole process group at the wall-clock timeout. The renderer
writes its PNG to stdout, so nothing the child wrote has to be read back from disk."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import RenderError, SandboxError, VermError

log = logging.getLogger(__name__)

LEVELS = ("bwrap", "limited", "none")
HOME = "/sandbox"  # the renderer's home and working directory under bwrap
NOBODY = 65534


@dataclass(frozen=True)
class Limits:
    """What a render may use. `memory_bytes` bounds private writable memory (RLIMIT_DATA,
    which a browser's address-space reservations do not count against); `processes` is
    the tasks (processes and threads) it may start; `disk_bytes` the size of its
    writable tmpfs (bwrap level)."""

    memory_bytes: int = 2 << 30
    cpu_s: int = 60
    file_bytes: int = 64 << 20
    processes: int = 64
    timeout_s: float = 30.0
    disk_bytes: int = 256 << 20
    output_bytes: int = 64 << 20

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class Level:
    name: str  # bwrap | limited | none
    reason: str
    user: int | None = None  # the uid the child runs as (None: the caller's)
    tools: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


_cache: dict[str, Level] = {}

# Set limits, drop root, then become the renderer. Run as `python -I -S -c`: the
# standard library alone, nothing from the caller's environment.
_LAUNCHER = r"""
import json, os, resource, sys
cfg = json.loads(sys.argv[1])
for name, value in cfg["rlimits"].items():
    resource.setrlimit(getattr(resource, name), (value, value))
if cfg.get("uid") is not None:
    os.setgroups([])
    os.setgid(cfg["uid"])
    os.setuid(cfg["uid"])
os.execvpe(sys.argv[2], sys.argv[2:], cfg["env"])
"""


def level() -> Level:
    """The strongest sandbox this machine offers (probed once per process)."""
    if "level" not in _cache:
        _cache["level"] = _probe()
    return _cache["level"]


def _reachable(path: Path, uid: int) -> bool:
    """Whether `uid` (not root) can reach `path` through its parents (each o+x)."""
    for parent in [path, *path.parents]:
        try:
            st = parent.stat()
        except OSError:
            return False
        if parent != path and st.st_uid != uid and not st.st_mode & 0o001:
            return False
    return True


def _probe() -> Level:
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    if sys.platform.startswith("linux"):
        bwrap = shutil.which("bwrap")
        if bwrap is not None:
            # Started as root, the renderer drops to nobody inside the sandbox (root is
            # exempt from RLIMIT_NPROC); bwrap itself runs with the caller's rights.
            lvl = Level(
                "bwrap",
                "bubblewrap: no network, only the renderer's files visible (read-only), "
                "a bounded tmpfs to write in, resource limits",
                NOBODY if root else None,
                {"bwrap": bwrap},
            )
            try:
                r = run(["/bin/true"], limits=Limits(timeout_s=20), at=lvl)
                ok, why = r.returncode == 0, describe(r)
            except (OSError, VermError) as exc:
                ok, why = False, str(exc)
            if ok:
                return lvl
            reason = f"bubblewrap cannot create its namespaces here ({why})"
        else:
            reason = "bubblewrap (bwrap) is not installed (apt-get install bubblewrap)"
        user = NOBODY if root and _reachable(Path(sys.executable), NOBODY) else None
        tail = "" if user is not None or not root else "; the renderer runs as root"
        return Level(
            "limited",
            f"{reason}: resource limits only, the network and files stay reachable{tail}",
            user,
        )
    if sys.platform == "darwin" and shutil.which("sandbox-exec"):
        return Level(
            "limited",
            "sandbox-exec: no network, writes only in the work directory; resource limits",
            None,
            {"sandbox-exec": shutil.which("sandbox-exec") or ""},
        )
    if os.name == "posix":
        return Level("limited", "resource limits only (no namespaces on this system)")
    return Level("none", "no sandbox on this platform")


def _system_dirs() -> list[Path]:
    """What any renderer needs to start: the system's programs and libraries, fonts, the
    dynamic loader's cache, and the Python installation with its packages."""
    dirs = [Path(p) for p in ("/usr", "/etc/fonts", "/etc/ld.so.cache", "/etc/alternatives")]
    dirs += [Path(p) for p in ("/lib", "/lib64", "/bin", "/sbin") if not Path(p).is_symlink()]
    py = {Path(sys.base_prefix), Path(sys.executable).resolve().parent}
    # The environment's packages, not the whole environment nor other sys.path entries
    # (an editable install's source tree, the current directory).
    py |= {
        Path(p)
        for p in sys.path
        if p and Path(p).is_absolute() and Path(p).name in ("site-packages", "dist-packages")
    }
    py |= {Path(sys.prefix) / "bin", Path(sys.prefix) / "pyvenv.cfg"}
    return [p for p in [*dirs, *sorted(py)] if p.exists()]


def _wrap(
    argv: list[str], workdir: Path, limits: Limits, bwrap: str, as_root: bool, ro: list[Path]
) -> list[str]:
    """The bwrap command line: a filesystem made of explicit read-only binds, the inputs
    read-only under /input, a bounded tmpfs as home and working directory."""
    # As root, bwrap makes its namespaces itself and the launcher drops to nobody inside;
    # otherwise an unprivileged user namespace, closed to further ones.
    spaces = (
        ["--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
        if as_root
        else ["--unshare-all", "--disable-userns"]
    )
    cmd = [bwrap, *spaces, "--die-with-parent", "--new-session", "--proc", "/proc", "--dev", "/dev"]
    for link in ("/lib", "/lib64", "/bin", "/sbin"):
        p = Path(link)
        if p.is_symlink():
            cmd += ["--symlink", os.readlink(p), link]
    # The writable places first: binds below them (a venv under /tmp) stay visible.
    for place in ("/tmp", HOME):
        cmd += ["--perms", "01777", "--size", str(limits.disk_bytes), "--tmpfs", place]
    made: set[Path] = {Path("/"), Path("/tmp"), Path(HOME)}
    for d in [*_system_dirs(), *(p for p in ro if p.exists())]:
        # Parents bwrap would make 0700 are made 0755: the renderer (nobody, when started
        # as root) must pass through them to what is bound below.
        for parent in reversed(d.parents):
            if parent not in made:
                cmd += ["--perms", "0755", "--dir", str(parent)]
                made.add(parent)
        cmd += ["--ro-bind", str(d), str(d)]
    if (workdir / "input").is_dir():
        cmd += ["--ro-bind", str(workdir / "input"), "/input"]
    return [*cmd, "--chdir", HOME, "--"] + argv


def _launcher(argv: list[str], limits: Limits, uid: int | None, env: dict[str, str]) -> list[str]:
    rlimits = {
        "RLIMIT_DATA": limits.memory_bytes,
        "RLIMIT_CPU": int(limits.cpu_s),
        "RLIMIT_FSIZE": limits.file_bytes,
        "RLIMIT_NPROC": _nproc(limits.processes, uid),
        "RLIMIT_CORE": 0,
    }
    cfg = {"rlimits": rlimits, "uid": uid, "env": env}
    return [sys.executable, "-I", "-S", "-c", _LAUNCHER, json.dumps(cfg), *argv]


def _nproc(limit: int, uid: int | None) -> int:
    """RLIMIT_NPROC counts every task of the user: the user's tasks now plus the limit."""
    target = uid if uid is not None else os.getuid()
    count = 0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(ln.split(":", 1) for ln in status.read_text().splitlines() if ":" in ln)
        except OSError:
            continue
        if fields.get("Uid", "").split()[:1] == [str(target)]:
            count += int(fields.get("Threads", "1").strip() or 1)
    return count + limit


def _darwin_profile(workdir: Path) -> str:
    return (
        "(version 1)(allow default)(deny network*)"
        '(deny file-write* (require-not (subpath "' + str(workdir) + '")))'
        '(deny file-read* (subpath "' + str(Path.home()) + '"))'
    )


def run(
    argv: list[str],
    *,
    files: dict[str, bytes] | None = None,
    limits: Limits = Limits(),
    env: dict[str, str] | None = None,
    unsafe: bool | None = None,
    at: Level | None = None,
    ro: list[Path] = (),
) -> subprocess.CompletedProcess:
    """Run `argv` in the sandbox with `files` readable under `{input}` (an argument of
    `argv` written `{input}/NAME` names one at any level) and `env` as its only
    environment (HOME and the working directory its own writable place); `ro`: more
    paths the program needs to read (a browser's configuration). The whole
    process group is killed at the timeout (RenderError). At level `none`, SandboxError
    unless `unsafe` (default: the setting)."""
    from .settings import settings

    lvl = at or level()
    if lvl.name == "none":
        allowed = settings().unsafe_render if unsafe is None else unsafe
        if not allowed:
            raise SandboxError(
                f"no sandbox on this machine ({lvl.reason}): rendering model-written code "
                "is refused; --unsafe-render (VERM_LOCAL_UNSAFE_RENDER=1) runs it anyway"
            )
    with tempfile.TemporaryDirectory(prefix="verm-render-") as tmp:
        workdir = Path(tmp)
        if lvl.user is not None:
            os.chown(workdir, lvl.user, lvl.user)
        if files:
            (workdir / "input").mkdir()
            for name, data in files.items():
                (workdir / "input" / name).write_bytes(data)
        bwrapped = lvl.name == "bwrap"
        home = HOME if bwrapped else str(workdir)
        inside_env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": home,
            "TMPDIR": "/tmp" if bwrapped else str(workdir),
            "LANG": "C.UTF-8",
            **{k: v.replace("{home}", home) for k, v in (env or {}).items()},
        }
        inputs = "/input" if bwrapped else str(workdir / "input")
        inner = [a.replace("{input}", inputs).replace("{home}", home) for a in argv]
        if lvl.name == "none":
            cmd = inner
        elif bwrapped:
            launch = _launcher(inner, limits, lvl.user, inside_env)
            cmd = _wrap(launch, workdir, limits, lvl.tools["bwrap"], lvl.user is not None, list(ro))
        else:
            if "sandbox-exec" in lvl.tools:
                inner = [lvl.tools["sandbox-exec"], "-p", _darwin_profile(workdir), *inner]
            cmd = _launcher(inner, limits, lvl.user, inside_env)
        proc = subprocess.Popen(
            cmd,
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            env={"PATH": inside_env["PATH"], "LANG": "C.UTF-8"},
        )
        try:
            out, err = proc.communicate(timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.communicate()
            raise RenderError(f"the render timed out after {limits.timeout_s:g} s") from None
        finally:
            _kill_group(proc)  # whatever it left running in its group
    if len(out) > limits.output_bytes:
        raise RenderError(f"the render wrote over {limits.output_bytes} bytes")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def describe(result: subprocess.CompletedProcess) -> str:
    """Why a sandboxed render failed, in a few words: the signal that ended it (a limit),
    or the last line it wrote on stderr."""
    code = result.returncode
    limits = {
        signal.SIGXCPU: "its CPU time limit",
        signal.SIGXFSZ: "its file size limit",
        signal.SIGKILL: "killed (a limit)",
        signal.SIGSEGV: "a crash (SIGSEGV)",
    }
    if code < 0:
        return limits.get(-code, f"signal {-code}")
    lines = [ln for ln in result.stderr.decode(errors="replace").splitlines() if ln.strip()]
    return lines[-1][-300:] if lines else f"exit code {code}"
