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
    which a browser's address-space reservations do not count against); `processes` the
    tasks it may start beyond the user's (0: no new process at all, threads only, by a
    seccomp filter: what a renderer of one chart needs); `disk_bytes` the size of its
    writable tmpfs (bwrap level)."""

    memory_bytes: int = 2 << 30
    cpu_s: int = 60
    file_bytes: int = 64 << 20
    processes: int = 0  # new processes it may start (0: none, threads only)
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

# The launcher: set the limits, drop root, then lock the process in before becoming the
# renderer: a Landlock ruleset (the filesystem: read-only where the renderer reads,
# read-write in its own work directory, nothing else) where the kernel has Landlock and
# a seccomp filter (socket() for IPv4/IPv6 fails with EACCES, io_uring is refused, and
# without `processes` no new process can start: clone without CLONE_THREAD, fork and
# vfork fail), both under no_new_privs so nothing regains rights. Run as
# `python -I -S -c`: the standard library alone, nothing from the caller's environment.
_LAUNCHER = r"""
import ctypes, json, os, platform, resource, struct, sys
cfg = json.loads(sys.argv[1])
for name, value in cfg["rlimits"].items():
    resource.setrlimit(getattr(resource, name), (value, value))
if cfg.get("uid") is not None:
    os.setgroups([])
    os.setgid(cfg["uid"])
    os.setuid(cfg["uid"])
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
libc.syscall.restype = ctypes.c_long
libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
linux = sys.platform.startswith("linux")
if linux and cfg.get("landlock"):
    abi = libc.syscall(444, None, 0, 1)  # landlock_create_ruleset(VERSION)
    if abi >= 1:
        every = (1 << 13) - 1 | (1 << 13 if abi >= 2 else 0) | (1 << 14 if abi >= 3 else 0)
        read = 1 | 4 | 8  # EXECUTE, READ_FILE, READ_DIR
        attr = struct.pack("Q", every)
        rs = libc.syscall(444, ctypes.c_char_p(attr), len(attr), 0)
        if rs < 0:
            sys.exit("verm-local sandbox: Landlock refused the ruleset")
        for paths, access in ((cfg["landlock"]["read"], read), (cfg["landlock"]["write"], every)):
            for path in paths:
                try:
                    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
                except OSError:
                    continue
                rule = struct.pack("=Qi", access if os.path.isdir(path) else access & 7, fd)
                libc.syscall(445, rs, 1, ctypes.c_char_p(rule), 0)  # PATH_BENEATH
                os.close(fd)
        if libc.syscall(446, rs, 0) != 0:  # landlock_restrict_self
            sys.exit("verm-local sandbox: Landlock could not be applied")
arch = {"x86_64": (0xC000003E, 41, 425, 56, (57, 58), 435),
        "aarch64": (0xC00000B7, 198, 425, 220, (), 435)}.get(platform.machine())
if linux and arch is not None:
    audit, nr_socket, nr_uring, nr_clone, nr_forks, nr_clone3 = arch
    LD, JEQ, JSET, RET = 0x20, 0x15, 0x45, 0x06  # BPF_LD|W|ABS, JMP|JEQ|K, JMP|JSET|K, RET|K
    ALLOW, EACCES, ENOSYS = 0x7FFF0000, 0x00050000 | 13, 0x00050000 | 38
    prog = [(LD, 0, 0, 4), (JEQ, 1, 0, audit), (RET, 0, 0, ALLOW), (LD, 0, 0, 0)]
    prog += [(JEQ, 0, 1, nr_uring), (RET, 0, 0, EACCES)]
    if cfg.get("no_network"):
        prog += [(JEQ, 0, 5, nr_socket), (LD, 0, 0, 16), (JEQ, 1, 0, 2), (JEQ, 0, 1, 10),
                 (RET, 0, 0, EACCES), (LD, 0, 0, 0)]
    if not cfg.get("processes"):  # threads only: clone with CLONE_THREAD
        for nr in nr_forks:
            prog += [(JEQ, 0, 1, nr), (RET, 0, 0, EACCES)]
        prog += [(JEQ, 0, 1, nr_clone3), (RET, 0, 0, ENOSYS)]  # glibc falls back to clone
        prog += [(JEQ, 0, 3, nr_clone), (LD, 0, 0, 16), (JSET, 1, 0, 0x10000),
                 (RET, 0, 0, EACCES)]
    prog += [(RET, 0, 0, ALLOW)]
    code = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in prog))
    fprog = ctypes.create_string_buffer(struct.pack("HxxxxxxQ", len(prog), ctypes.addressof(code)))
    if libc.prctl(22, 2, ctypes.addressof(fprog), 0, 0) != 0:  # PR_SET_SECCOMP, FILTER
        sys.exit("verm-local sandbox: the seccomp filter could not be set")
os.execvpe(sys.argv[2], sys.argv[2:], cfg["env"])
"""


def level() -> Level:
    """The sandbox renders run in: the strongest this machine offers (probed once per
    process), or a weaker one the `sandbox` setting asks for."""
    from .settings import settings

    want = settings().sandbox
    key = f"level-{want}"
    if key not in _cache:
        best = _probe()
        rank = {name: i for i, name in enumerate(LEVELS)}
        if want != "auto" and rank[want] > rank[best.name]:
            best = _weaker(want)
        elif want == "bwrap" and best.name != "bwrap":
            raise SandboxError(f"VERM_LOCAL_SANDBOX=bwrap, but {best.reason}")
        _cache[key] = best
    return _cache[key]


def _weaker(name: str) -> Level:
    if name == "none":
        return Level("none", "VERM_LOCAL_SANDBOX=none")
    return _limited("VERM_LOCAL_SANDBOX=limited")


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
        return _limited(reason)
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


def _limited(reason: str) -> Level:
    """The limited level on Linux: Landlock (where the kernel has it) for the files, a
    seccomp filter for the network and processes, resource limits; as nobody when
    started as root and nobody can reach the interpreter."""
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    user = NOBODY if root and _reachable(Path(sys.executable).resolve(), NOBODY) else None
    parts = ["a seccomp filter (no network, no new processes)", "resource limits"]
    if _landlock_abi() >= 1:
        parts.insert(
            0, "Landlock (only the renderer's files readable, writes only in its directory)"
        )
    else:
        parts.append("the user's files stay readable (no Landlock in this kernel)")
    if root and user is None:
        parts.append("the renderer runs as root")
    return Level("limited", f"{reason}: " + ", ".join(parts), user)


def _landlock_abi() -> int:
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        return int(libc.syscall(444, None, 0, 1))
    except (OSError, AttributeError):
        return -1


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


def _launcher(
    argv: list[str],
    limits: Limits,
    uid: int | None,
    env: dict[str, str],
    landlock: dict[str, list[str]] | None = None,
) -> list[str]:
    rlimits = {
        "RLIMIT_DATA": limits.memory_bytes,
        "RLIMIT_CPU": int(limits.cpu_s),
        "RLIMIT_FSIZE": limits.file_bytes,
        "RLIMIT_CORE": 0,
    }
    if limits.processes:
        rlimits["RLIMIT_NPROC"] = _nproc(limits.processes, uid)
    cfg = {
        "rlimits": rlimits,
        "uid": uid,
        "env": env,
        "no_network": True,
        "processes": limits.processes,
        "landlock": landlock,
    }
    return [sys.executable, "-I", "-S", "-c", _LAUNCHER, json.dumps(cfg), *argv]


def _landlock_paths(workdir: Path, ro: list[Path]) -> dict[str, list[str]]:
    """The limited level's filesystem: read where the renderer reads, write in its own
    work directory (and the null device)."""
    read = [*map(str, _system_dirs()), *map(str, ro), "/etc", "/dev", "/proc", "/sys"]
    return {"read": read, "write": [str(workdir), "/dev/null"]}


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
            landlock = None
            if "sandbox-exec" in lvl.tools:
                inner = [lvl.tools["sandbox-exec"], "-p", _darwin_profile(workdir), *inner]
            elif sys.platform.startswith("linux"):
                landlock = _landlock_paths(workdir, list(ro))
            cmd = _launcher(inner, limits, lvl.user, inside_env, landlock)
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
