"""Start and stop the tritonserver bundled in nvidia-pytriton, configured for this project.

Used by the serve command and by the tests, so both run the server the same way.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from twopass_asr import REPO_ROOT

DEFAULT_MODEL_REPOSITORY = REPO_ROOT / "model_repository"


class TritonStartError(RuntimeError):
    pass


class TritonLoadUnconfirmed(TritonStartError):
    """Models whose stubs finished loading, but tritonserver never took note (UNCONFIRMED_LOAD_S)."""


class TritonStartTimeout(TritonStartError):
    """The server ran but did not become ready in time; `stacks`: its processes' Python stacks."""

    def __init__(self, message: str, stacks: str):
        super().__init__(message)
        self.stacks = stacks


def load_progress(log_text: str) -> tuple[list[str], list[str]]:
    """(loaded, still loading) model names, from tritonserver's log of its start."""
    loading = dict.fromkeys(re.findall(r'"loading: ([^:"]+):\d+"', log_text))
    loaded = dict.fromkeys(re.findall(r"\"successfully loaded '([^']+)'", log_text))
    return list(loaded), [name for name in loading if name not in loaded]


# The Python backend (2.51) sometimes never hears that a stub's initialize returned: the stub has
# logged its last line and idles, while tritonserver waits on it with no time limit (rare; seen in
# CI and test runs). Every model of this project logs "<model>: loaded " as the last
# step of its initialize, so a load that stays unconfirmed this long after it is lost, and a
# fresh start is the way out.
UNCONFIRMED_LOAD_S = 60.0


def unconfirmed_loads(log_text: str) -> list[str]:
    """Models of a start's log that tritonserver still reports loading although every instance
    it began initialising has logged this project's "<model>: loaded " line."""
    _, loading = load_progress(log_text)
    stuck = []
    for name in loading:
        started = len(re.findall(rf'"TRITONBACKEND_ModelInstanceInitialize: {re.escape(name)}_\d+_\d+ ', log_text))
        finished = len(re.findall(rf'\] "{re.escape(name)}: loaded ', log_text))
        if started and finished >= started:
            stuck.append(name)
    return stuck


def group_processes(pgid: int) -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of the live processes of a process group."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                found[int(stat.parent.name)] = (int(fields[1]),
                                                (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except (OSError, IndexError, ValueError):
            continue  # exited while being read
    return found


def python_stacks(pgid: int, timeout_s: float = 10.0) -> str:
    """The Python stacks of every process of a process group (py-spy, where installed): what a
    server that hangs is waiting for. Processes without Python say why they have none."""
    py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if py_spy is None:
        return "py-spy is not installed: no stacks"
    parts = []
    for pid, (_, command) in sorted(group_processes(pgid).items()):
        try:
            dump = subprocess.run([py_spy, "dump", "--pid", str(pid)], capture_output=True, text=True,
                                  timeout=timeout_s)
            stacks = dump.stdout or dump.stderr
        except subprocess.TimeoutExpired:
            stacks = f"py-spy gave no stacks within {timeout_s:.0f} s"
        parts.append(f"=== pid {pid}: {command[:200]}\n{stacks.strip()}")
    return "\n".join(parts)


_SAMPLE_LINE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{([^}]*)\})? (\S+)", re.MULTILINE)
_MODEL_LABEL = re.compile(r'(?:^|,)model="([^"]*)"')


def metric_samples(text: str) -> dict[str, dict[str, float]]:
    """The samples of a Prometheus text exposition by name as exposed, then by model label
    ("" for samples without one), summed over their other labels (instances, versions)."""
    samples: dict[str, dict[str, float]] = {}
    for name, labels, value in _SAMPLE_LINE.findall(text):
        model = _MODEL_LABEL.search(labels or "")
        by_model = samples.setdefault(name, {})
        key = model.group(1) if model else ""
        by_model[key] = by_model.get(key, 0.0) + float(value)
    return samples


def read_metric_samples(url: str, timeout_s: float = 10.0) -> dict[str, dict[str, float]]:
    """metric_samples of a metrics endpoint; OSError when it cannot be read."""
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return metric_samples(response.read().decode())


# Ports free_port has handed out in this process: none twice.
_handed_out: set[int] = set()
LOWEST_FREE_PORT = 10000


def _ephemeral_ports_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def port_in_use(host: str, port: int) -> bool:
    """Whether a server could not listen on host:port now. With SO_REUSEADDR, as the
    servers have it: connections of an earlier run left in TIME_WAIT do not count."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a server that binds it later.

    Chosen below the kernel's ephemeral range: the ports the kernel hands out meanwhile (to
    outgoing connections, and to listening sockets bound to port 0, as vLLM's and torch's
    are) never take it while the server that is to bind it still loads its models."""
    start = _ephemeral_ports_start()
    if start <= LOWEST_FREE_PORT:  # an unusual kernel range: let the kernel choose
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]
    for _ in range(1000):
        port = random.randrange(LOWEST_FREE_PORT, start)
        if port not in _handed_out and not port_in_use("127.0.0.1", port):
            _handed_out.add(port)
            return port
    raise RuntimeError(f"no free TCP port on 127.0.0.1 between {LOWEST_FREE_PORT} and {start}")


def tritonserver_dir() -> Path:
    import pytriton

    return Path(pytriton.__file__).resolve().parent / "tritonserver"


def server_environment(model_store: Path | None, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment in which the Python-backend stub finds this venv's packages."""
    env = dict(os.environ)
    venv_bin = str(Path(sys.executable).parent)
    # The stub ignores PYTHONPATH; it picks up the venv only when its bin/ leads PATH.
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
    env["VIRTUAL_ENV"] = str(Path(sys.executable).parent.parent)
    # Load the same libpython as the venv's interpreter, not Debian's copy.
    libdir = sysconfig.get_config_var("LIBDIR")
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, env.get("LD_LIBRARY_PATH")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    # vad, paraformer_streaming and vLLM's worker each run OpenMP teams as wide as the machine;
    # spinning idle threads starve the others (perf/RESULTS.md, 2026-11-28, whole service).
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.setdefault("VLLM_CACHE_ROOT", str(REPO_ROOT / ".cache" / "vllm"))
    if model_store is not None:
        env["TWOPASS_ASR_MODELS"] = str(Path(model_store).resolve())
    env.update(extra or {})
    return env


class TritonServer:
    """A tritonserver process in its own process group (so model subprocesses die with it)."""

    def __init__(
        self,
        model_store: Path | None,
        model_repository: Path = DEFAULT_MODEL_REPOSITORY,
        *,
        host: str = "127.0.0.1",
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        log_path: Path | None = None,
        log_verbose: int = 0,
        env: dict[str, str] | None = None,
        unconfirmed_load_s: float = UNCONFIRMED_LOAD_S,
    ):
        self.model_store = model_store
        self.model_repository = Path(model_repository)
        self.host = host
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.log_path = Path(log_path) if log_path else None
        self.log_verbose = log_verbose
        self.extra_env = env
        self.unconfirmed_load_s = unconfirmed_load_s
        self.process: subprocess.Popen | None = None
        self._log_file = None
        self._log_start = 0  # where this start's part of an appended log begins

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def command(self) -> list[str]:
        root = tritonserver_dir()
        return [
            str(root / "bin" / "tritonserver"),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={root / 'backends'}",
            f"--cache-directory={root / 'caches'}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            "--pinned-memory-pool-byte-size=0",
            f"--log-verbose={self.log_verbose}",
        ]

    # The full-size models load in minutes on 2 cores, vLLM's compilation included.
    def start(self, timeout: float = 600.0, progress: Callable[[str], None] | None = None,
              progress_every_s: float = 30.0, attempts: int = 3) -> "TritonServer":
        """Start and wait until ready; `progress` (if given) gets a line on the models loaded
        so far every progress_every_s while waiting (when the server writes a log file). A
        start whose model load went unconfirmed (UNCONFIRMED_LOAD_S) is stopped and made again,
        `attempts` starts in all; `progress` (else stderr) is told."""
        for attempt in range(1, attempts):
            try:
                return self._start_once(timeout, progress, progress_every_s)
            except TritonLoadUnconfirmed as lost:
                (progress or _print_stderr)(f"{lost}; starting tritonserver again ({attempt + 1} of {attempts})")
        return self._start_once(timeout, progress, progress_every_s)

    def _start_once(self, timeout: float, progress: Callable[[str], None] | None,
                    progress_every_s: float) -> "TritonServer":
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.log_path, "ab")
            out = self._log_file
        else:
            out = None
        self._log_start = self.log_path.stat().st_size if self.log_path else 0
        self.process = subprocess.Popen(
            self.command(),
            env=server_environment(self.model_store, self.extra_env),
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            start_new_session=True,
        )
        try:
            self.wait_ready(timeout, progress, progress_every_s)
        except TritonLoadUnconfirmed:
            self.stop(timeout=5)  # nothing to wind down: tritonserver waits on a load that is lost
            raise
        except BaseException:
            self.stop()
            raise
        return self

    def log_text(self) -> str:
        """What this start has written to the log file (which may hold earlier starts too)."""
        if not self.log_path or not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as handle:
            handle.seek(self._log_start)
            return handle.read().decode(errors="replace")

    def progress_line(self, elapsed_s: float) -> str:
        line = f"tritonserver starting ({elapsed_s:.0f} s)"
        if not self.log_path or not self.log_path.exists():
            return line
        loaded, loading = load_progress(self.log_text())
        return (f"{line}: loaded {', '.join(loaded) or 'nothing yet'}"
                + (f"; loading {', '.join(loading)}" if loading else ""))

    def model_counter(self, model: str, name: str) -> float:
        """A model's counter or gauge (summed over its instances) from the metrics endpoint."""
        value = read_metric_samples(f"http://{self.host}:{self.metrics_port}/metrics").get(name, {}).get(model)
        if value is None:
            raise LookupError(f"{name} of {model} missing from tritonserver's metrics")
        return value

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def wait_ready(self, timeout: float, progress: Callable[[str], None] | None = None,
                   progress_every_s: float = 30.0) -> None:
        started = time.monotonic()
        deadline = started + timeout
        next_progress = started + progress_every_s
        stuck_since: dict[str, float] = {}
        while time.monotonic() < deadline:
            if progress is not None and time.monotonic() >= next_progress:
                progress(self.progress_line(time.monotonic() - started))
                next_progress += progress_every_s
            if self.process.poll() is not None:
                raise TritonStartError(self.exit_report(" before becoming ready"))
            if self.is_ready():
                return
            if self.log_path:
                now = time.monotonic()
                stuck_since = {name: stuck_since.get(name, now) for name in unconfirmed_loads(self.log_text())}
                lost = [name for name, since in stuck_since.items() if now - since >= self.unconfirmed_load_s]
                if lost:
                    raise TritonLoadUnconfirmed(
                        f"tritonserver never confirmed loading {', '.join(lost)} {self.unconfirmed_load_s:.0f} s "
                        f"after its stub had finished (a Python backend fault)")
            time.sleep(0.5)
        stacks = python_stacks(self.process.pid)
        if self.log_path:
            where = self.log_path.with_name(self.log_path.name + ".stacks")
            where.write_text(stacks + "\n")
            hint = f"; the Python stacks of its processes are in {where}"
        else:
            hint = f"; the Python stacks of its processes:\n{stacks}\n"
        raise TritonStartTimeout(f"tritonserver not ready after {timeout:.0f} s{hint}" + self._log_hint(), stacks)

    def exit_status(self) -> str | None:
        """None while the server runs; else how it ended: its exit code, or the signal that
        killed it."""
        if self.process is None or self.process.poll() is None:
            return None
        code = self.process.returncode
        return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"

    def exit_report(self, when: str = "") -> str | None:
        """exit_status, `when`, and the last lines of the log."""
        status = self.exit_status()
        return None if status is None else f"tritonserver {status}{when}{self._log_hint()}"

    def _log_hint(self) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        tail = self.log_text().splitlines()[-40:]
        return f"; last log lines ({self.log_path}):\n" + "\n".join(tail)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the whole process group, then SIGKILL whatever is left (vLLM's
        EngineCore ignores SIGTERM while loading)."""
        if self.process is None:
            return
        pgid = self.process.pid
        if self.process.poll() is None:
            _signal_group(pgid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        _signal_group(pgid, signal.SIGKILL)
        self.process.wait()
        if self._log_file:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> "TritonServer":
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def _print_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
