"""Process plumbing for bench/: the systems under test, the load generators, and what is
measured around them (CPU time, per-CPU busy time, PSS of a process tree).

Every process started here is registered in `PROCESSES` and stopped by pid (SIGTERM to the
server's master, then SIGKILL to its own process group) by `cleanup()`, which bench.py runs on
exit, on Ctrl-C and on errors. Nothing here touches a process it did not start.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
BUILD = BENCH / ".build"
VENV = BENCH / ".venv"
LOGS = BUILD / "logs"

HOST = "127.0.0.1"  # every load goes to loopback, never anywhere else

# Every process we started and have not reaped yet: pid -> Popen.
PROCESSES: dict[int, subprocess.Popen] = {}


# ---------------------------------------------------------------------------------------------
# CPUs and pinning


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))


@dataclass
class Pinning:
    """Servers on one set of CPUs, the load generator on another (taskset)."""

    server_cpus: list[int]
    load_cpus: list[int]
    note: str = ""

    @classmethod
    def detect(cls) -> "Pinning":
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2 or not shutil.which("taskset"):
            return cls([], [], "1 CPU (or no taskset): server and load generator share the CPU, "
                       "no pinning; ratios still hold, absolute numbers are lower")
        # The load generator gets the first CPU, the servers all the others.
        return cls(cpus[1:], cpus[:1])

    @property
    def enabled(self) -> bool:
        return bool(self.server_cpus)

    def server_prefix(self) -> list[str]:
        return ["taskset", "-c", ",".join(map(str, self.server_cpus))] if self.enabled else []

    def load_prefix(self) -> list[str]:
        return ["taskset", "-c", ",".join(map(str, self.load_cpus))] if self.enabled else []

    @property
    def server_cpu_count(self) -> int:
        return len(self.server_cpus) if self.enabled else cpu_count()

    @property
    def load_cpu_count(self) -> int:
        return len(self.load_cpus) if self.enabled else cpu_count()


# ---------------------------------------------------------------------------------------------
# /proc readings


def clk_tck() -> int:
    return os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may contain spaces and parentheses: split after the last ')'.
    return raw[raw.rindex(")") + 2:].split()


def start_time(pid: int) -> int | None:
    """Start time of a process (clock ticks since boot): with the pid, identifies it."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def _zombie(pid: int) -> bool:
    fields = _stat_fields(pid)
    return bool(fields) and fields[0] == "Z"


def _comm(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


# Processes of a tree we started that were still alive after their master stopped (killed then).
LEFT_BEHIND: list[dict] = []


def process_tree(root: int) -> list[int]:
    """`root` and all its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is None:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        if Path(f"/proc/{pid}").exists():
            tree.append(pid)
            todo.extend(children.get(pid, []))
    return tree


def tree_cpu_seconds(root: int) -> float:
    """User+system CPU of a process tree so far, including its reaped children."""
    ticks = 0
    for pid in process_tree(root):
        fields = _stat_fields(pid)
        if fields:
            # utime stime cutime cstime are fields 14..17 of stat (1-based); here offset by 3.
            ticks += sum(int(x) for x in fields[11:15])
    return ticks / clk_tck()


def cpu_busy_ticks() -> dict[int, tuple[int, int]]:
    """Per CPU: (busy, total) jiffies from /proc/stat."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        m = re.match(r"cpu(\d+) (.*)", line)
        if m:
            vals = [int(x) for x in m.group(2).split()]
            idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
            total = sum(vals[:8])
            out[int(m.group(1))] = (total - idle, total)
    return out


def cpu_busy_fraction(before, after, cpus) -> float | None:
    busy = sum(after[c][0] - before[c][0] for c in cpus if c in after and c in before)
    total = sum(after[c][1] - before[c][1] for c in cpus if c in after and c in before)
    return busy / total * len(cpus) if total else None


def smaps_rollup(pid: int) -> dict[str, int]:
    """kB figures of /proc/PID/smaps_rollup (Rss, Pss, Private_Dirty, ...)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            m = re.match(r"(\w+):\s+(\d+) kB", line)
            if m:
                out[m.group(1)] = int(m.group(2))
    except OSError:
        pass
    return out


def tree_memory(root: int) -> dict:
    return processes_memory(process_tree(root))


def processes_memory(pids: list[int]) -> dict:
    """PSS, RSS and USS (kB) summed over `pids`."""
    pss = rss = uss = 0
    for pid in pids:
        r = smaps_rollup(pid)
        pss += r.get("Pss", 0)
        rss += r.get("Rss", 0)
        uss += r.get("Private_Clean", 0) + r.get("Private_Dirty", 0)
    return {"processes": len(pids), "pss_kib": pss, "rss_kib": rss, "uss_kib": uss}


class MemorySampler:
    """Samples the memory of a running system, summed over every process tree it is made of
    (nginx's and gunicorn's), every `interval` s in a thread, for as long as the `with` block
    lasts (a load run). `pids` collects every process seen. The thread runs on the load
    generator's CPUs, so that reading /proc takes nothing from the servers'."""

    def __init__(self, run: "Running", pin: "Pinning", interval: float = 0.2):
        self.run, self.pin, self.interval = run, pin, interval
        self.samples: list[dict] = []
        self.pids: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        if self.pin.enabled:
            os.sched_setaffinity(0, self.pin.load_cpus)  # 0: this thread only
        t0 = time.monotonic()
        while True:
            pids = [pid for root in self.run.roots for pid in process_tree(root)]
            self.pids.update(pids)
            m = processes_memory(pids)
            m["t"] = round(time.monotonic() - t0, 3)
            self.samples.append(m)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)


def cpu_by_process() -> dict[int, tuple[str, int]]:
    """pid -> (command name, utime+stime ticks) for every process."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        comm = raw[raw.index("(") + 1:raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2:].split()
        out[int(entry)] = (comm, int(fields[11]) + int(fields[12]))
    return out


def top_other_cpu(before, after, exclude: set[int], wall: float, n: int = 3) -> list[dict]:
    """The processes (not ours) that used the most CPU between two `cpu_by_process` snapshots:
    other load on the machine that would disturb a measurement."""
    rows = []
    for pid, (comm, ticks) in after.items():
        if pid in exclude:
            continue
        delta = ticks - before.get(pid, (comm, 0))[1]
        if delta > 0:
            rows.append({"pid": pid, "comm": comm, "cpu": round(delta / clk_tck() / wall, 3)})
    rows.sort(key=lambda r: -r["cpu"])
    return [r for r in rows[:n] if r["cpu"] >= 0.02]


def wait_for_quiet(max_wait: float, threshold: float = 0.15, sample: float = 0.5) -> float:
    """Waits (at most `max_wait` s) until processes that are not ours use less than `threshold`
    of a CPU in total over `sample` s. The machine may be shared (builds, test suites): better
    to measure between their bursts. Returns the others' CPU use seen last."""
    deadline = time.monotonic() + max_wait
    ours = {os.getpid()} | {p for proc in PROCESSES.values() for p in process_tree(proc.pid)}
    while True:
        before = cpu_by_process()
        time.sleep(sample)
        busy = sum(r["cpu"] for r in top_other_cpu(before, cpu_by_process(), ours, sample, n=50))
        if busy < threshold or time.monotonic() > deadline:
            return busy
        time.sleep(1.5)


def tcp_retransmits() -> int:
    """RetransSegs from /proc/net/snmp: a lost segment on loopback costs a 200 ms+ timeout, so a
    tail spike during a run with retransmits is the kernel's, not the server's."""
    lines = [l.split() for l in Path("/proc/net/snmp").read_text().splitlines() if l.startswith("Tcp:")]
    return int(lines[1][lines[0].index("RetransSegs")]) if len(lines) >= 2 else 0


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


# ---------------------------------------------------------------------------------------------
# CPU quota (cgroup): makes the server the bottleneck when it and the load generator each have
# one CPU and the server is as fast as the load generator (nginx, supervisor on `GET /`).

CGROUPS: list[Path] = []  # the cgroups we made, removed by cleanup()
CFS_PERIOD_US = 10_000  # short period: a throttled server stalls at most a few ms


def cpu_quota_supported() -> str | None:
    """None if a CPU quota can be set here, else why not."""
    if os.geteuid() != 0:
        return "not root"
    if Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").exists():
        return None
    v2 = Path("/sys/fs/cgroup/cgroup.subtree_control")
    if v2.exists() and "cpu" in v2.read_text().split():
        return None
    return "no writable cgroup cpu controller"


def apply_cpu_quota(pids: list[int], cpus: float) -> Path:
    """Moves `pids` into a new cgroup limited to `cpus` CPUs (e.g. 0.5)."""
    name = f"supervisor-bench-{os.getpid()}-{len(CGROUPS)}"
    quota = int(CFS_PERIOD_US * cpus)
    v1 = Path("/sys/fs/cgroup/cpu")
    if (v1 / "cpu.cfs_quota_us").exists():
        cg = v1 / name
        cg.mkdir()
        CGROUPS.append(cg)
        (cg / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
        (cg / "cpu.cfs_quota_us").write_text(str(quota))
    else:
        cg = Path("/sys/fs/cgroup") / name
        cg.mkdir()
        CGROUPS.append(cg)
        (cg / "cpu.max").write_text(f"{quota} {CFS_PERIOD_US}")
    for pid in pids:
        (cg / "cgroup.procs").write_text(str(pid))
    return cg


def remove_cgroup(cg: Path) -> None:
    for _ in range(50):
        try:
            cg.rmdir()
            break
        except FileNotFoundError:
            break
        except OSError:
            time.sleep(0.05)  # the last processes are still exiting
    if cg in CGROUPS:
        CGROUPS.remove(cg)


# ---------------------------------------------------------------------------------------------
# Processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def spawn(cmd: list[str], log: Path, cwd: Path | None = None, env: dict | None = None,
          new_session: bool = True) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=cwd, env=env, start_new_session=new_session)
    PROCESSES[proc.pid] = proc
    return proc


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM to the process we started (a server's master), wait, then SIGKILL its group."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    # Its workers and helpers live in the process group we created for it (start_new_session),
    # whose id is the pid we started: kill whatever is left of that group only.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass
    PROCESSES.pop(proc.pid, None)


def stop_pid(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM to a server process we did not start ourselves (the new master of a binary
    upgrade), then wait a bounded time for it to go; the caller kills its group after."""
    try:
        os.kill(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists() and not _zombie(pid):
        time.sleep(0.02)


def cleanup() -> None:
    for proc in list(PROCESSES.values()):
        stop(proc, timeout=3.0)
    for cg in list(CGROUPS):
        remove_cgroup(cg)


def http_get(port: int, path: str = "/", timeout: float = 1.0) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(f"http://{HOST}:{port}{path}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as res:
            return res.status, dict(res.headers), res.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def uvicorn_app_command() -> list[str]:
    """bench/app.py under uvicorn on the private Unix socket supervisor gives each worker (the
    `{socket}` placeholder); uvicorn from bench/.venv, so with uvloop and httptools."""
    return [str(VENV / "bin" / "uvicorn"), "--app-dir", str(BENCH), "app:app",
            "--uds", "{socket}", "--log-level", "warning"]


def wait_http_200(port: int, deadline: float, proc: subprocess.Popen | None = None,
                  poll: float = 0.002) -> float:
    """Polls GET / until 200; returns the monotonic time of the first 200."""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering")
        try:
            status, _, _ = http_get(port, "/", timeout=0.5)
            if status == 200:
                return time.monotonic()
        except OSError:
            pass
        time.sleep(poll)
    raise RuntimeError(f"no 200 from {HOST}:{port} in time")


# ---------------------------------------------------------------------------------------------
# Systems under test


@dataclass
class Running:
    system: "System"
    proc: subprocess.Popen
    port: int
    workers: int
    log: Path
    started: float  # monotonic time just before spawn
    first_200: float = 0.0
    all_ready: float = 0.0
    tmp: Path | None = None
    cgroup: Path | None = None
    tree: list = field(default_factory=list)  # (pid, start time) of the tree once ready
    # Processes behind `proc` that belong to the system and that we started apart (gunicorn
    # behind nginx): their CPU counts as the server's, and they are stopped after `proc`.
    backends: list = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def roots(self) -> list[int]:
        """The pids whose process trees make up the system: the front process and its backends."""
        return [self.proc.pid] + [b.pid for b in self.backends]

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def stop(self) -> None:
        # The front first (it stops taking requests), then what it forwarded to.
        for proc in [self.proc] + self.backends:
            stop(proc)
        # An app under supervisor runs in a process group of its own, out of reach of the
        # killpg in stop(): whatever of the tree we started outlived its master is killed here
        # (the same pid with the same start time, so never a recycled pid) and recorded.
        def survivors():
            return [pid for pid, started in self.tree if pid not in self.roots
                    and started is not None and start_time(pid) == started and not _zombie(pid)]

        deadline = time.monotonic() + 2.0  # the master is gone; its descendants may be exiting
        while survivors() and time.monotonic() < deadline:
            time.sleep(0.02)
        for pid in survivors():
            LEFT_BEHIND.append({"system": self.system.key, "pid": pid, "comm": _comm(pid) or "?"})
            log(f"  !! {self.system.key}: pid {pid} outlived its master; killing it")
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self.cgroup:
            remove_cgroup(self.cgroup)
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)


@dataclass
class System:
    """One server configuration: how to start it with W workers and when it is ready."""

    key: str  # short id used in results, e.g. "supervisor", "nginx"
    label: str  # human name for tables
    kind: str  # supervisor | nginx | granian | gunicorn | uvicorn
    settings: dict = field(default_factory=dict)  # supervisor --set values
    # supervisor only: the app each worker starts (after `--`, e.g. uvicorn_app_command());
    # empty: the built-in app. Keyword-only, so subclasses' positional fields stay as they are.
    app: list = field(default_factory=list, kw_only=True)
    # Peers only: extra command-line arguments for gunicorn (also behind nginx) or granian, like
    # `--max-requests 1000` or `--loop uvloop`.
    args: list = field(default_factory=list, kw_only=True)

    def command(self, port: int, workers: int, tmp: Path) -> tuple[list[str], Path | None]:
        py = VENV / "bin"
        if self.kind == "supervisor":
            cmd = [str(supervisor_bin()), "start", "-b", f"{HOST}:{port}", "-w", str(workers)]
            for k, v in self.settings.items():
                cmd += ["--set", f"{k}={v}"]
            if self.app:
                cmd += ["--", *self.app]
            # cwd is an empty temp dir: no supervisor.toml is picked up, defaults apply.
            return cmd, tmp
        if self.kind == "uvicorn":
            # One uvicorn process on a TCP port, no master: the app without anything in front.
            if workers != 1:
                raise ValueError("uvicorn alone runs one process (workers=1)")
            return [str(py / "uvicorn"), "--app-dir", str(BENCH), "app:app", "--host", HOST,
                    "--port", str(port), "--log-level", "warning"], BENCH
        if self.kind == "nginx":
            conf = tmp / "nginx.conf"
            conf.write_text(nginx_conf(port, workers, tmp))
            return [nginx_bin(), "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "error.log")], tmp
        if self.kind == "granian":
            return [str(py / "granian"), "--interface", "asgi", "--host", HOST, "--port", str(port),
                    "--workers", str(workers), "--log-level", "warning", "--no-ws",
                    "--working-dir", str(BENCH), *self.args, "app:app"], BENCH
        if self.kind == "gunicorn":
            return gunicorn_command(workers, f"{HOST}:{port}", extra=self.args), BENCH
        if self.kind == "nginx-gunicorn":
            # nginx in front; gunicorn (backend_command) behind it on a Unix socket.
            conf = tmp / "nginx.conf"
            conf.write_text(nginx_proxy_conf(port, gunicorn_socket(tmp), tmp))
            return [nginx_bin(), "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "error.log")], tmp
        raise ValueError(self.kind)

    def backend_command(self, workers: int, tmp: Path) -> list[str] | None:
        """What the front process forwards to, started before it, or None when there is no such
        process of its own (nginx-gunicorn: gunicorn with the `workers` on a Unix socket)."""
        if self.kind == "nginx-gunicorn":
            # Longer than nginx's idle upstream connections live (keepalive_timeout, 60 s), as
            # gunicorn's docs advise behind a proxy: nginx, not gunicorn, closes an idle one,
            # and never sends a request into a connection that gunicorn is closing.
            return gunicorn_command(workers, f"unix:{gunicorn_socket(tmp)}", keep_alive_s=75,
                                    extra=self.args)
        return None

    def expected_processes(self, workers: int) -> int | None:
        if self.kind == "uvicorn":
            return 1  # a single process, no master
        # master + workers; granian's Python main process spawns its workers likewise.
        return workers + 1

    def start(self, workers: int, pin: Pinning, timeout: float = 30.0, name: str = "",
              cpu_quota: float | None = None) -> Running:
        port = free_port()
        tmp = Path(tempfile.mkdtemp(prefix=f"bench-{self.key}-", dir=BUILD))
        cmd, cwd = self.command(port, workers, tmp)
        backend_cmd = self.backend_command(workers, tmp)
        log = LOGS / f"{name or self.key}-w{workers}-{port}.log"
        backend_log = log.with_suffix(".backend.log")
        env = dict(os.environ)
        env.setdefault("PYTHONDONTWRITEBYTECODE", "1")
        started = time.monotonic()
        # On the same CPUs as the front: the whole system shares the servers' CPUs.
        backends = [spawn(pin.server_prefix() + backend_cmd, backend_log, cwd=BENCH, env=env)
                    ] if backend_cmd else []
        proc = spawn(pin.server_prefix() + cmd, log, cwd=cwd, env=env)
        run = Running(self, proc, port, workers, log, started, tmp=tmp, backends=backends)
        deadline = started + timeout
        try:
            if backends:
                wait_unix_socket(gunicorn_socket(tmp), deadline, backends[0])
            run.first_200 = wait_http_200(port, deadline, proc)
            self._wait_all_workers(run, deadline)
            run.tree = [(pid, start_time(pid)) for root in run.roots for pid in process_tree(root)]
            if cpu_quota:
                # Every process of the tree now exists; respawned ones would inherit the cgroup.
                run.cgroup = apply_cpu_quota([pid for pid, _ in run.tree], cpu_quota)
        except Exception as e:
            # (nginx writes its errors to a file in tmp, which stop() removes)
            tail = "".join(f.read_text(errors="replace")[-2000:]
                           for f in (log, backend_log, tmp / "error.log") if f.exists())
            run.stop()
            raise RuntimeError(f"{self.key} with {workers} worker(s) did not start: {e}\n{tail}")
        return run

    def _wait_all_workers(self, run: Running, deadline: float) -> None:
        want = self.expected_processes(run.workers)
        while time.monotonic() < deadline:
            if run.proc.poll() is not None:
                raise RuntimeError(f"exited with {run.proc.returncode}")
            for backend in run.backends:
                if backend.poll() is not None:
                    raise RuntimeError(f"its backend exited with {backend.returncode}")
            if self.kind == "supervisor":
                # The master logs `INFO ready ...` once every child it runs (workers, and app
                # processes when it has a pool of them) has said it is ready; the counts that
                # follow depend on the topology, the line's start does not.
                if re.search(r"\bINFO ready\b", run.log.read_text(errors="replace")):
                    run.all_ready = time.monotonic()
                    return
            elif self.kind == "nginx-gunicorn":
                # nginx's master and its one worker; gunicorn's master and its `workers`.
                if (len(process_tree(run.pid)) >= 2
                        and len(process_tree(run.backends[0].pid)) >= run.workers + 1):
                    run.all_ready = time.monotonic()
                    return
            elif len(process_tree(run.pid)) >= want:
                run.all_ready = time.monotonic()
                return
            time.sleep(0.002)
        raise RuntimeError("not every worker came up in time")


NGINX_HELLO = """default_type "text/plain; charset=utf-8";
            return 200 "Hello, World!";"""

# Idle connections to gunicorn each nginx worker keeps (`keepalive` of the upstream): as many
# as the proxy scenario's client connections, so that no request waits for a new connection.
NGINX_UPSTREAM_KEEPALIVE = 64


def nginx_conf(port: int, workers: int, tmp: Path, location: str = NGINX_HELLO,
               http_extra: str = "", main_extra: str = "") -> str:
    return f"""# generated by bench/: nginx as a plain process of ours, never the system service
daemon off;{main_extra}
master_process on;
worker_processes {workers};
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;{http_extra}
    server {{
        listen {HOST}:{port} reuseport;
        location / {{
            {location}
        }}
    }}
}}
"""


def nginx_proxy_conf(port: int, sock: Path, tmp: Path) -> str:
    """nginx in front of gunicorn as gunicorn's docs deploy it (upstream on a Unix socket, the
    client's Host, X-Forwarded-For and -Proto passed on), with one worker process and the
    upstream connections kept alive: HTTP/1.1 to gunicorn, `Connection` cleared, up to
    NGINX_UPSTREAM_KEEPALIVE idle connections cached and, as for clients, no limit on the
    requests one connection carries."""
    upstream = f"""
    upstream app {{
        server unix:{sock} fail_timeout=0;
        keepalive {NGINX_UPSTREAM_KEEPALIVE};
        keepalive_requests 1000000;
    }}"""
    location = """proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_redirect off;"""
    # Started by root, nginx runs its workers as `nobody`, who cannot reach gunicorn's socket in
    # our private temp dir (a deployment gives nginx's user access to it instead): here the
    # workers run as the user who started the bench, which changes nothing in what they do.
    user = ""
    if os.geteuid() == 0:
        pw = pwd.getpwuid(os.geteuid())
        user = f"\nuser {pw.pw_name} {grp.getgrgid(pw.pw_gid).gr_name};"
    return nginx_conf(port, 1, tmp, location, upstream, user)


def gunicorn_command(workers: int, bind: str, keep_alive_s: int | None = None,
                     extra: list[str] = ()) -> list[str]:
    """gunicorn with `workers` UvicornWorkers serving bench/app.py on `bind` (host:port or
    unix:path), with `extra` arguments."""
    cmd = [str(VENV / "bin" / "gunicorn"), "-w", str(workers), "-k",
           "uvicorn_worker.UvicornWorker", "-b", bind, "--log-level", "warning",
           "--graceful-timeout", "5", "--chdir", str(BENCH)]
    if keep_alive_s is not None:
        cmd += ["--keep-alive", str(keep_alive_s)]
    return cmd + list(extra) + ["app:app"]


def gunicorn_socket(tmp: Path) -> Path:
    sock = tmp / "gunicorn.sock"
    if len(str(sock)) > 107:  # sun_path holds 108 bytes with the final NUL
        raise ValueError(f"Unix socket path too long ({len(str(sock))} bytes, at most 107): "
                         f"{sock}; run bench/ from a shorter path")
    return sock


def wait_unix_socket(path: Path, deadline: float, proc: subprocess.Popen) -> None:
    """Polls until `proc` has created the Unix socket `path`."""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the process that should listen on {path} exited with "
                               f"{proc.returncode}")
        if path.is_socket():
            return
        time.sleep(0.01)
    raise RuntimeError(f"no Unix socket {path} in time")


def supervisor_bin() -> Path:
    override = os.environ.get("SUPERVISOR_BIN")
    if override:
        return Path(override)
    # where `cargo build --release` put it (bench/run builds from the repository root)
    target = Path(os.environ.get("CARGO_TARGET_DIR") or "target")
    return (target if target.is_absolute() else REPO / target) / "release" / "supervisor"


def nginx_bin() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


def oha_bin() -> str:
    local = BUILD / "cargo" / "bin" / "oha"
    return str(local) if local.exists() else (shutil.which("oha") or "oha")


def wrk_bin() -> str:
    return shutil.which("wrk") or "wrk"


# ---------------------------------------------------------------------------------------------
# Load generators


@dataclass
class LoadResult:
    tool: str
    cmd: list[str]
    wall_s: float
    cpu_s: float  # load generator's own user+system CPU
    server_cpu_s: float  # server process tree CPU during the run
    server_cpus_busy: float | None  # busy fraction of the server CPUs (all processes), in CPUs
    load_cpus_busy: float | None
    data: dict
    others: list = field(default_factory=list)  # other processes that used CPU meanwhile
    retransmits: int = 0  # TCP segments the kernel retransmitted meanwhile (machine-wide)
    stdout: str = ""
    # CPU of the companions (processes of ours that serve the system under test, like a
    # redis-server) during the run; None when there were none.
    companion_cpu_s: float | None = None

    def to_json(self) -> dict:
        return {
            "tool": self.tool, "cmd": self.cmd, "wall_s": round(self.wall_s, 3),
            "loadgen_cpu_s": round(self.cpu_s, 3), "server_cpu_s": round(self.server_cpu_s, 3),
            "server_cpus_busy": self.server_cpus_busy, "load_cpus_busy": self.load_cpus_busy,
            "other_processes_cpu": self.others, "tcp_retransmits": self.retransmits,
            "companion_cpu_s": self.companion_cpu_s,
            **self.data,
        }


@dataclass
class Loaded:
    """One load generator's share of a `run_loads`: its output, wall time (from the common
    start to its own exit), own CPU and its server's CPU."""

    text: str
    wall: float
    cpu: float
    server_cpu: float


@dataclass
class Around:
    """What `run_loads` saw around all its load generators at once."""

    server_cpus_busy: float | None
    load_cpus_busy: float | None
    others: list
    retransmits: int
    companion_cpu: float | None


def server_cpu_seconds(server: Running | None) -> float:
    """CPU of a system so far: every process tree it is made of (nginx's and gunicorn's)."""
    return sum(tree_cpu_seconds(root) for root in server.roots) if server else 0.0


def run_loads(tool: str, cmds: list[list[str]], pin: Pinning, servers: list[Running | None],
              timeout: float, companions: tuple[int, ...] = ()) -> tuple[list[Loaded], Around]:
    """Runs load generators side by side, `cmds[i]` against `servers[i]`, all on the load CPUs,
    until every one has finished (each bounded by `timeout`). The processes of every server, of
    the load generators and the `companions` (and their trees) are ours: their CPU never counts
    as other processes' (which would make the measurement look disturbed)."""
    roots = [pid for s in servers if s for pid in s.roots]
    srv_before = [server_cpu_seconds(s) for s in servers]
    comp_before = sum(tree_cpu_seconds(p) for p in companions)
    procs_before = cpu_by_process()
    retrans_before = tcp_retransmits()
    ticks_before = cpu_busy_ticks()
    t0 = time.monotonic()
    procs, paths = [], []
    try:
        for i, cmd in enumerate(cmds):
            paths.append(LOGS / f"{tool}-{os.getpid()}-{int(t0 * 1000)}-{i}.out")
            paths[-1].parent.mkdir(parents=True, exist_ok=True)
            with open(paths[-1], "wb") as out:
                proc = subprocess.Popen(pin.load_prefix() + cmd, stdout=out,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            PROCESSES[proc.pid] = proc
            procs.append(proc)
        deadline = t0 + timeout
        ended: dict[int, tuple[float, object]] = {}  # index -> (wall, rusage)
        while len(ended) < len(procs):
            overdue = time.monotonic() > deadline
            for i, proc in enumerate(procs):
                if i in ended:
                    continue
                if overdue:
                    proc.kill()
                pid, status, rusage = os.wait4(proc.pid, 0 if overdue else os.WNOHANG)
                if pid:
                    proc.returncode = os.waitstatus_to_exitcode(status)
                    ended[i] = (time.monotonic() - t0, rusage)
            if overdue:
                raise RuntimeError(f"{tool} did not finish within {timeout:.0f}s: "
                                   f"{pin.load_prefix() + cmds[0]}")
            if len(ended) < len(procs):
                time.sleep(0.01)
    finally:
        for proc in procs:
            if proc.returncode is None:  # interrupted: the loop above did not reap it
                proc.kill()
                proc.wait()
            PROCESSES.pop(proc.pid, None)
    wall = time.monotonic() - t0
    ticks_after = cpu_busy_ticks()
    srv_after = [server_cpu_seconds(s) for s in servers]
    ours = {os.getpid()} | {p.pid for p in procs}
    for root in roots + list(companions):
        ours |= set(process_tree(root))
    others = top_other_cpu(procs_before, cpu_by_process(), ours, wall)
    retransmits = tcp_retransmits() - retrans_before
    texts = []
    for proc, path, cmd in zip(procs, paths, cmds):
        text = path.read_text(errors="replace")
        path.unlink(missing_ok=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{tool} exited {proc.returncode}: "
                               f"{' '.join(pin.load_prefix() + cmd)}\n{text[-2000:]}")
        texts.append(text)
    srv_cpus = pin.server_cpus if pin.enabled else sorted(os.sched_getaffinity(0))
    load_cpus = pin.load_cpus if pin.enabled else srv_cpus
    around = Around(cpu_busy_fraction(ticks_before, ticks_after, srv_cpus),
                    cpu_busy_fraction(ticks_before, ticks_after, load_cpus), others, retransmits,
                    sum(tree_cpu_seconds(p) for p in companions) - comp_before
                    if companions else None)
    loaded = [Loaded(text, ended[i][0], ended[i][1].ru_utime + ended[i][1].ru_stime,
                     srv_after[i] - srv_before[i]) for i, text in enumerate(texts)]
    return loaded, around


def _result(tool: str, cmd: list[str], one: Loaded, around: Around, data: dict) -> LoadResult:
    return LoadResult(tool, cmd, one.wall, one.cpu, one.server_cpu, around.server_cpus_busy,
                      around.load_cpus_busy, data, others=list(around.others),
                      retransmits=around.retransmits, stdout=one.text,
                      companion_cpu_s=around.companion_cpu)


WRK_LUA = BENCH / "wrk_report.lua"


def wrk(server: Running, path: str, connections: int, duration: float, pin: Pinning,
        script: Path | None = None, headers: dict | None = None,
        companions: tuple[int, ...] = ()) -> LoadResult:
    """Closed loop: `connections` connections each sending back-to-back requests."""
    return wrk_many([server], path, connections, duration, pin, script, headers, companions)[0]


def wrk_many(servers: list[Running], path: str, connections: int, duration: float,
             pin: Pinning, script: Path | None = None, headers: dict | None = None,
             companions: tuple[int, ...] = ()) -> list[LoadResult]:
    """`wrk` against each server at the same time (one wrk each, `connections` each)."""
    cmds = []
    for server in servers:
        cmd = [wrk_bin(), "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s",
               "--timeout", "10s", "-s", str(script or WRK_LUA)]
        for k, v in (headers or {}).items():
            cmd += ["-H", f"{k}: {v}"]
        cmds.append(cmd + [server.url + path])
    loaded, around = run_loads("wrk", cmds, pin, list(servers), duration + 30, companions)
    out = []
    for cmd, one in zip(cmds, loaded):
        m = re.search(r"^BENCH_JSON (.*)$", one.text, re.M)
        if not m:
            raise RuntimeError(f"wrk printed no summary:\n{one.text[-2000:]}")
        out.append(_result("wrk", cmd, one, around, json.loads(m.group(1))))
    return out


def oha(server: Running, path: str, duration: float, pin: Pinning, rate: float | None = None,
        connections: int = 64, urls_file: Path | None = None, headers: dict | None = None,
        disable_keepalive: bool = False, timeout_s: float = 30.0,
        wait_ongoing: bool = True, companions: tuple[int, ...] = ()) -> LoadResult:
    """Open loop when `rate` is set (oha -q with latency correction: a request's latency counts
    from when it was due, not when a free connection sent it). Returns per-request records."""
    return oha_many([server], path, duration, pin, rate, connections, urls_file, headers,
                    disable_keepalive, timeout_s, wait_ongoing, companions)[0]


def oha_many(servers: list[Running], path: str, duration: float, pin: Pinning,
             rate: float | None = None, connections: int = 64, urls_file: Path | None = None,
             headers: dict | None = None, disable_keepalive: bool = False,
             timeout_s: float = 30.0, wait_ongoing: bool = True,
             companions: tuple[int, ...] = ()) -> list[LoadResult]:
    """`oha` against each server at the same time: one oha each, with `rate` and `connections`
    each."""
    cmds, files = [], []
    for server in servers:
        fd, name = tempfile.mkstemp(prefix="oha-", dir=BUILD)
        os.close(fd)
        db, out_json = Path(name + ".sqlite"), Path(name + ".json")
        Path(name).unlink()
        files.append((db, out_json))
        cmd = [oha_bin(), "--no-tui", "--output-format", "json", "-o", str(out_json),
               "-z", f"{duration:g}s", "-c", str(connections), "-t", f"{timeout_s:g}s",
               "--db-url", str(db)]
        if rate:
            cmd += ["-q", f"{rate:g}", "--latency-correction"]
        if wait_ongoing:
            cmd += ["-w"]
        if disable_keepalive:
            cmd += ["--disable-keepalive"]
        for k, v in (headers or {}).items():
            cmd += ["-H", f"{k}: {v}"]
        if urls_file:
            cmd += ["--urls-from-file", str(urls_file)]
        else:
            cmd.append(server.url + path)
        cmds.append(cmd)
    try:
        loaded, around = run_loads("oha", cmds, pin, list(servers), duration + timeout_s + 60,
                                   companions)
        out = []
        for cmd, one, (db, out_json) in zip(cmds, loaded, files):
            data = {"summary": json.loads(out_json.read_text()), "records": read_oha_db(db)}
            out.append(_result("oha", cmd, one, around, data))
    finally:
        for db, out_json in files:
            db.unlink(missing_ok=True)
            out_json.unlink(missing_ok=True)
    return out


def read_oha_db(db: Path) -> list[tuple[str, int, float, float]]:
    """(path, status, latency_s, end_s) for every request that got a response. With -q and
    --latency-correction, latency counts from when the request was due (the schedule), so time
    spent waiting for a free connection is included: no coordinated omission."""
    import sqlite3

    if not db.exists():
        return []
    con = sqlite3.connect(db)
    try:
        rows = con.execute(
            "SELECT url, status, end - COALESCE(start_latency_correction, start), end FROM oha"
        ).fetchall()
    finally:
        con.close()
    return [(urllib.parse.urlsplit(u).path or u, int(st), float(lat), float(end))
            for u, st, lat, end in rows]


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100) of unsorted values."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(p / 100.0 * len(s) + 0.5)) - 1))
    return s[k]


def median(values):
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None
    n = len(vals)
    return vals[n // 2] if n % 2 else (vals[n // 2 - 1] + vals[n // 2]) / 2


def supervisor_status(run: Running) -> dict:
    out = subprocess.run([str(supervisor_bin()), "status", "--pid", str(run.pid), "--json"],
                         capture_output=True, text=True, timeout=10)
    if out.returncode != 0:
        raise RuntimeError(f"supervisor status failed: {out.stderr}")
    return json.loads(out.stdout)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
