"""The chat room benchmark: our server side by side with a thread-per-client server, an asyncio
server and Redis pub/sub, all driven by one C load generator (bench/loadgen.c, compiled here).

    python bench/run.py            everything (about 15 minutes)
    python bench/run.py --quick    each scenario once, for a second or two (CI runs this)
    python bench/run.py --scenarios fan-out chatty     only those, for a quick before/after
    python bench/run.py --scenarios tls --servers chatroom     fan-out to TLS members
    python bench/run.py --scenarios bridge     one room on 1, 2 and 3 servers over one Redis

The server runs on CPU 0 and the load generator on CPU 1 (taskset), so runs compare. Redis
comes from Debian's packages (apt-get install redis-server) and is skipped, with a message,
where redis-server is missing. The tls scenario is fan-out with every member on TLS: stunnel4
(client mode, on the load generator's CPU, as the members' side of TLS) sits between the load
generator and our server, which runs with --require-tls; it is skipped where stunnel4 or
openssl is missing. The fan-out scenario runs our server a second time with half its members
on WebSocket (the load generator speaks the framing), reporting their deliveries and latency
beside the TCP members' of the same run. The bridge scenario is one room spread over 1, 2 and
3 of our servers sharing one redis-server (--redis), all on the server's CPU, members dealt
round the servers; deliveries are timed apart by whether sender and receiver share a server.
Prints a Markdown report and writes it, with one picture per scenario (matplotlib), to
bench/results/ (bench/results/quick/ for --quick); BENCHMARKS.md holds one full run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SERVER_CPU, LOADGEN_CPU = "0", "1"
OPEN_FILES = 20000  # 10,000 members on each side, with room to spare
PASS_DELIVERED = 0.999  # a rate passes when this share of deliveries arrives ...
PASS_P99_MS = 100.0  # ... with this p99 latency, in order, none echoed
SCENARIOS = ["fan-out", "chatty", "scale", "overload", "tls", "bridge"]
BRIDGE_SERVERS = (1, 2, 3)  # the bridge scenario: the room on this many servers, in turn
SCALE_SENDERS, SCALE_RATE = 1, 10.0  # the scale scenario: one member sends 10 messages/s
# Servers whose join time is also measured at smaller rooms, for the scale picture: ours and
# the C server beside it (the Python peers do not join 10,000 at all).
SCALE_SWEPT = ("chatroom", "redis")
WEB_SHARE = 2  # in the fan-out scenario's WebSocket run, one member in this many is a browser
Result = dict[str, Any]


@dataclass(frozen=True)
class Server:
    name: str
    mode: str  # the load generator's protocol: "chat" or "redis"
    command: Callable[[int], list[str]]


def python_peer(script: str, port: int) -> list[str]:
    return [sys.executable, str(BENCH / script), str(port)]


SERVERS = [
    Server(
        "chatroom",
        "chat",
        lambda port: [
            sys.executable,
            str(ROOT / "chatroom_server.py"),
            "--port",
            str(port),
            "--flood-rate",
            "0",  # the one limit the benchmark turns off: it sends in bulk on purpose
        ],  # everything else as shipped: 10,000 members fit the default --max-members
    ),
    Server("asyncio", "chat", lambda port: python_peer("asyncio_server.py", port)),
    Server("threads", "chat", lambda port: python_peer("thread_server.py", port)),
    Server(
        "redis",
        "redis",
        lambda port: [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--maxclients",
            "20000",
        ],
    ),
]  # fmt: skip


@dataclass(frozen=True)
class Sweep:
    name: str
    members: int
    senders: int
    rates: list[float]  # aggregate messages a second, tried in order until one fails
    seconds: float


@dataclass(frozen=True)
class Plan:
    fan_out: Sweep
    chatty: Sweep
    tls: Sweep  # fan-out with TLS members: every share is encrypted for each member
    bridge: Sweep  # fan-out in one room spread over BRIDGE_SERVERS servers and one Redis
    scale_members: int  # the scale scenario's room, in the table
    scale_seconds: float
    scale_sizes: list[int]  # smaller rooms, joined only for the picture of join time
    overload_seconds: float


QUICK = Plan(
    fan_out=Sweep("fan-out", 1000, 10, [500.0], 1),
    chatty=Sweep("chatty", 50, 50, [2000.0], 1),
    tls=Sweep("fan-out", 200, 10, [50.0], 1),
    bridge=Sweep("bridge", 1000, 10, [200.0], 1),
    scale_members=2000,
    scale_seconds=1.0,
    scale_sizes=[500],
    overload_seconds=1.0,
)
FULL = Plan(
    fan_out=Sweep(
        "fan-out",
        1000,
        10,
        [50, 100, 250, 500, 1000, 2000, 3000, 4000, 6000, 8000, 12000, 16000, 24000],
        5,
    ),
    chatty=Sweep("chatty", 50, 50, [1000, 2000, 4000, 8000, 16000, 32000, 64000, 96000, 128000], 5),
    tls=Sweep("fan-out", 200, 10, [25, 50, 100, 150, 200, 300, 400, 600, 800], 5),
    bridge=Sweep("bridge", 1000, 10, [50, 100, 250, 500, 1000, 2000, 3000, 4000, 6000], 5),
    scale_members=10_000,
    scale_seconds=10.0,
    scale_sizes=[1000, 2500, 5000],
    overload_seconds=10.0,
)


@dataclass
class Results:
    """Everything one run measured, by scenario and server."""

    fan_out: dict[str, list[Result]] = field(default_factory=dict)  # every rate tried
    chatty: dict[str, list[Result]] = field(default_factory=dict)
    scale: dict[str, Result] = field(default_factory=dict)  # the full-size room
    scale_sizes: dict[str, list[Result]] = field(default_factory=dict)  # smaller rooms, and it
    overload: dict[str, Result] = field(default_factory=dict)
    tls: dict[str, list[Result]] = field(default_factory=dict)  # fan-out with TLS members
    web: dict[str, list[Result]] = field(default_factory=dict)  # fan-out, half on WebSocket
    bridge: dict[int, list[Result]] = field(default_factory=dict)  # by number of servers


@dataclass(frozen=True)
class TlsFront:
    """TLS for the members: a certificate for the server, and stunnel in front of the load
    generator, which itself speaks plain text."""

    folder: Path
    cert: Path
    key: Path

    @classmethod
    def make(cls, folder: Path) -> TlsFront:
        cert, key = folder / "cert.pem", folder / "key.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
             "ec_paramgen_curve:prime256v1", "-days", "2", "-nodes", "-keyout", str(key),
             "-out", str(cert), "-subj", "/CN=127.0.0.1", "-addext",
             "subjectAltName=IP:127.0.0.1"],
            check=True,
            capture_output=True,
        )  # fmt: skip
        return cls(folder, cert, key)

    def server_args(self) -> list[str]:
        # A TLS join takes a handshake's round trips and at most 8 handshake steps a turn,
        # so a join storm of 1,000 waits longer than --max-unjoined's 256 allow: the room
        # is opened to all of them, as a server expecting such a storm would be.
        tls = ["--tls-cert", str(self.cert), "--tls-key", str(self.key), "--require-tls"]
        return [*tls, "--max-unjoined", "2000"]

    def stunnel(self, accept: int, connect: int) -> list[str]:
        """stunnel as the members' TLS client: the load generator connects to accept in
        plain text, stunnel to the server's port with TLS. Nagle off on both sides, as the
        load generator sets it."""
        config = self.folder / f"stunnel-{accept}.conf"
        config.write_text(
            "foreground = yes\npid =\ndebug = 3\n"
            "socket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n"
            f"[chat]\nclient = yes\naccept = 127.0.0.1:{accept}\n"
            f"connect = 127.0.0.1:{connect}\n"
        )
        return ["stunnel4", str(config)]


def limit_open_files() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (OPEN_FILES, OPEN_FILES))


def pinned(cpu: str, command: list[str]) -> list[str]:
    return ["taskset", "-c", cpu, *command] if shutil.which("taskset") else command


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def proc_status(pid: int, field: str) -> float:
    """A /proc/PID/status memory field (VmRSS, VmHWM) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def listen_overflows() -> int | None:
    """The kernel's count of connections dropped because a listen queue was full (TcpExt
    ListenOverflows in /proc/net/netstat, what nstat shows); None where it cannot be read."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return None
    for names, values in zip(lines, lines[1:]):
        if names.startswith("TcpExt:") and values.startswith("TcpExt:"):
            counters = dict(zip(names.split()[1:], values.split()[1:]))
            return int(counters["ListenOverflows"]) if "ListenOverflows" in counters else None
    return None


class Running:
    """One server process for one measurement."""

    def __init__(self, server: Server, tls: TlsFront | None = None) -> None:
        self.server = server
        self.port = free_port()  # where the load generator connects
        server_port = free_port() if tls else self.port
        extra = tls.server_args() if tls else []
        self.proc = subprocess.Popen(
            pinned(SERVER_CPU, server.command(server_port) + extra),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=limit_open_files,
        )
        self.front: subprocess.Popen[bytes] | None = None  # stunnel, for TLS members
        self._wait_listening(server_port, self.proc)
        if tls is not None:
            self.front = subprocess.Popen(
                pinned(LOADGEN_CPU, tls.stunnel(self.port, server_port)),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                preexec_fn=limit_open_files,
            )
            self._wait_listening(self.port, self.front)
        self.idle_mib = proc_status(self.proc.pid, "VmRSS")

    def _wait_listening(self, port: int, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + 10
        while True:  # a bounded retry: a server's readiness has no event to wait on here
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"{self.server.name} did not start") from None
                time.sleep(0.05)

    def load(
        self,
        loadgen: Path,
        members: int,
        senders: int,
        rate: float,
        seconds: float,
        web_members: int = 0,
    ) -> Result:
        """Runs the load generator once and adds the server's CPU and memory to its report;
        web_members of the members join over WebSocket."""
        cpu_before, started = cpu_seconds(self.proc.pid), time.monotonic()
        overflows_before = listen_overflows()
        command = [str(loadgen), self.server.mode, "127.0.0.1", str(self.port)]
        command += [str(members), str(senders), f"{rate:g}", f"{seconds:g}", "64"]
        command += [str(web_members)]
        try:
            done = subprocess.run(
                pinned(LOADGEN_CPU, command),
                capture_output=True,
                text=True,
                timeout=seconds + 240,
                preexec_fn=limit_open_files,
                check=True,
            )
            result: Result = json.loads(done.stdout)
        except subprocess.TimeoutExpired:
            return {"rate": rate, "passed": False, "timed_out": True}
        elapsed = time.monotonic() - started
        overflows_after = listen_overflows()
        if overflows_before is not None and overflows_after is not None:
            # Only the join opens connections, so this counts the join storm's overflows.
            result["listen_overflows"] = overflows_after - overflows_before
        result["rate"] = rate
        result["members"] = members
        result["server_cpu_pct"] = 100 * (cpu_seconds(self.proc.pid) - cpu_before) / elapsed
        result["server_rss_mib"] = proc_status(self.proc.pid, "VmRSS")
        result["server_peak_mib"] = proc_status(self.proc.pid, "VmHWM")
        result["idle_mib"] = self.idle_mib
        result["kib_per_member"] = 1024 * (result["server_rss_mib"] - self.idle_mib) / members
        result["loadgen_cpu_pct"] = 100 * result["cpu_seconds"] / max(result["wall_seconds"], 1e-9)
        result["deliveries_per_s"] = result["delivered"] / max(result["wall_seconds"], 1e-9)
        joined = members + (senders if self.server.mode == "redis" else 0)
        result["passed"] = passes(result, joined)
        return result

    def stop(self) -> None:
        for proc in (self.front, self.proc):
            if proc is not None:
                proc.kill()
                proc.wait()


def passes(result: Result, joined: int) -> bool:
    """The pass rule (BENCHMARKS.md): everyone joined, ≥ 99.9% of deliveries, in per-sender
    order, none echoed, p99 within the bound."""
    return bool(
        result["joined"] == joined
        and result["delivered"] >= PASS_DELIVERED * result["expected"]
        and 0 <= result["p99_ms"] <= PASS_P99_MS
        and result["order_errors"] == 0
        and result["echoes"] == 0
    )


def server_named(name: str) -> Server:
    return next(server for server in SERVERS if server.name == name)


class Bridged:
    """A redis-server and count of our servers sharing one room on it (--redis), all on the
    server's CPU, for one measurement."""

    def __init__(self, count: int) -> None:
        redis_port = free_port()
        self.procs = [self._start(server_named("redis").command(redis_port), redis_port)]
        url = f"redis://127.0.0.1:{redis_port}"
        self.ports = [free_port() for _ in range(count)]
        for port in self.ports:
            ours = server_named("chatroom").command(port)
            command = [*ours, "--redis", url, "--log-level", "warning"]
            self.procs.append(self._start(command, port))
        deadline = time.monotonic() + 10
        while self._subscribers(redis_port) < count:  # bounded: no event says "linked"
            if time.monotonic() > deadline:
                raise RuntimeError("the servers did not join the room on Redis")
            time.sleep(0.05)

    @staticmethod
    def _start(command: list[str], port: int) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            pinned(SERVER_CPU, command),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=limit_open_files,
        )
        deadline = time.monotonic() + 10
        while True:  # a bounded retry, as Running._wait_listening
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return proc
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"{command[0]} did not start") from None
                time.sleep(0.05)

    @staticmethod
    def _subscribers(redis_port: int) -> int:
        """How many connections listen on the room's channel (PUBSUB NUMSUB)."""
        channel = b"chatroom:0:chatroom"
        request = b"*3\r\n$6\r\nPUBSUB\r\n$6\r\nNUMSUB\r\n$%d\r\n%s\r\n" % (len(channel), channel)
        with socket.create_connection(("127.0.0.1", redis_port), timeout=5) as sock:
            sock.sendall(request)
            reply = sock.recv(4096)  # *2 $N channel :COUNT
        return int(reply.rsplit(b":", 1)[1].split(b"\r\n", 1)[0])

    def load(self, loadgen: Path, plan: Sweep, rate: float) -> Result:
        cpu_before, started = sum(cpu_seconds(p.pid) for p in self.procs), time.monotonic()
        ports = ",".join(str(port) for port in self.ports)
        command = [str(loadgen), "chat", "127.0.0.1", ports, str(plan.members)]
        command += [str(plan.senders), f"{rate:g}", f"{plan.seconds:g}", "64"]
        try:
            done = subprocess.run(
                pinned(LOADGEN_CPU, command),
                capture_output=True,
                text=True,
                timeout=plan.seconds + 240,
                preexec_fn=limit_open_files,
                check=True,
            )
        except subprocess.TimeoutExpired:
            return {"rate": rate, "passed": False, "timed_out": True}
        result: Result = json.loads(done.stdout)
        elapsed = time.monotonic() - started
        cpu = sum(cpu_seconds(p.pid) for p in self.procs) - cpu_before
        result["rate"] = rate
        result["servers_cpu_pct"] = 100 * cpu / elapsed
        result["deliveries_per_s"] = result["delivered"] / max(result["wall_seconds"], 1e-9)
        result["passed"] = passes(result, plan.members)
        return result

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.kill()
            proc.wait()


def bridge_sweep(loadgen: Path, plan: Sweep, count: int) -> list[Result]:
    """Each rate on a fresh room of count servers, until one fails."""
    points = []
    for rate in plan.rates:
        bridged = Bridged(count)
        try:
            point = bridged.load(loadgen, plan, rate)
        finally:
            bridged.stop()
        points.append(point)
        log("chatroom", f"bridge x{count}", point)
        if not point["passed"]:
            break
    return points


def bridge_table(plan: Sweep, points: dict[int, list[Result]]) -> list[str]:
    lines = [
        f"### One room on 1, 2 and 3 servers over one Redis: {plan.members:,} members dealt "
        f"round the servers, {plan.senders} sending, 64-byte messages",
        "",
        "| servers | highest passing rate (msg/s) | deliveries/s | same-server p50 / p99 ms "
        "| cross-server p50 / p99 ms | CPU of servers and Redis together |",
        "|---|---|---|---|---|---|",
    ]
    for count, tried in points.items():
        # The highest rate that passed; if none did, the first tried, marked as failing.
        best = best_passing(tried) or (tried[0] if tried else None)
        rate = cell(best, "rate") + ("" if best is None or best["passed"] else " (failed)")
        lines.append(
            f"| {count} | {rate} | {cell(best, 'deliveries_per_s')} "
            f"| {cell(best, 'same_p50_ms', '{:.2f}')} / {cell(best, 'same_p99_ms', '{:.2f}')} "
            f"| {cell(best, 'cross_p50_ms', '{:.2f}')} / {cell(best, 'cross_p99_ms', '{:.2f}')} "
            f"| {cell(best, 'servers_cpu_pct', '{:.0f}%')} |"
        )
    lines += [
        "",
        "Every server and Redis share one CPU here: this is the cost of the bridge, not "
        "scaling (BENCHMARKS.md says how it scales on N machines).",
    ]
    return [*lines, ""]


def measure(
    server: Server,
    loadgen: Path,
    members: int,
    senders: int,
    rate: float,
    seconds: float,
    tls: TlsFront | None = None,
    web_members: int = 0,
) -> Result:
    running = Running(server, tls)
    try:
        return running.load(loadgen, members, senders, rate, seconds, web_members)
    finally:
        running.stop()


def sweep(
    server: Server,
    loadgen: Path,
    plan: Sweep,
    tls: TlsFront | None = None,
    web_members: int = 0,
) -> tuple[Result | None, list[Result]]:
    """Tries each rate until one fails; gives the highest that passed and every point."""
    best, points = None, []
    load = (plan.members, plan.senders)
    for rate in plan.rates:
        point = measure(
            server, loadgen, *load, rate, plan.seconds, tls=tls, web_members=web_members
        )
        points.append(point)
        log(server.name, plan.name + (" tls" if tls else " web" if web_members else ""), point)
        if not point["passed"]:
            break
        best = point
    return best, points


def overload(server: Server, loadgen: Path, rate: float, seconds: float) -> Result:
    """Twice the highest passing fan-out rate; then, on the same server, half of it again."""
    running = Running(server)
    try:
        over = running.load(loadgen, 1000, 10, 2 * rate, seconds)
        after = running.load(loadgen, 1000, 10, rate / 2, min(seconds, 3))
        log(server.name, "overload", over)
        log(server.name, "recovery", after)
        return {
            "rate": 2 * rate,
            "delivered_pct": 100 * over.get("delivered", 0) / max(over.get("expected", 1), 1),
            "dropped_slow": over.get("dropped_slow", 0),
            "growth_mib": over.get("server_peak_mib", running.idle_mib) - running.idle_mib,
            "recovered": after["passed"],
            "recovery_p99_ms": after.get("p99_ms", -1),
        }
    finally:
        running.stop()


def scale(server: Server, loadgen: Path, plan: Plan) -> tuple[Result, list[Result]]:
    """The full-size room for the table; for the picture also the smaller rooms, which only
    need to join, so they run briefly."""
    load = (SCALE_SENDERS, SCALE_RATE)
    point = measure(server, loadgen, plan.scale_members, *load, plan.scale_seconds)
    log(server.name, "scale", point)
    sizes = []
    if server.name in SCALE_SWEPT:
        for members in plan.scale_sizes:
            sizes.append(measure(server, loadgen, members, *load, min(plan.scale_seconds, 1.0)))
            log(server.name, f"scale {members}", sizes[-1])
    return point, [*sizes, point]


def log(server: str, scenario: str, point: Result) -> None:
    keys = (
        *("rate", "passed", "delivered", "expected", "p99_ms", "join_seconds"),
        *("listen_overflows", "server_cpu_pct"),
    )
    shown = {key: point[key] for key in keys if key in point}
    print(f"  {server:9} {scenario:9} {shown}", file=sys.stderr, flush=True)


def compile_loadgen(folder: Path) -> Path:
    loadgen = folder / "loadgen"
    subprocess.run(
        ["cc", "-O2", "-Wall", "-Wextra", "-o", str(loadgen), str(BENCH / "loadgen.c")], check=True
    )
    return loadgen


def available(servers: list[Server]) -> list[Server]:
    ready = []
    for server in servers:
        if server.mode == "redis" and shutil.which("redis-server") is None:
            print(
                "redis-server not found: Redis pub/sub is skipped "
                "(install it with: apt-get install redis-server)",
                file=sys.stderr,
            )
        else:
            ready.append(server)
    return ready


def cell(point: Result | None, key: str, form: str = "{:,.0f}") -> str:
    if point is None or key not in point or point[key] == -1:  # -1: nothing measured
        return "—"
    value = point[key]
    if isinstance(value, bool):
        return "yes" if value else "no"
    return form.format(value) if isinstance(value, (int, float)) else str(value)


def sweep_table(title: str, points: dict[str, list[Result]]) -> list[str]:
    results = {name: best_passing(tried) for name, tried in points.items()}
    lines = [
        f"### {title}",
        "",
        "| server | highest passing rate (msg/s) | deliveries/s | p50 ms | p99 ms "
        "| server CPU | server peak RSS (MiB) | load generator CPU | generator saturated |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, best in results.items():
        lines.append(
            f"| {name} | {cell(best, 'rate')} | {cell(best, 'deliveries_per_s')} "
            f"| {cell(best, 'p50_ms', '{:.2f}')} | {cell(best, 'p99_ms', '{:.2f}')} "
            f"| {cell(best, 'server_cpu_pct', '{:.0f}%')} "
            f"| {cell(best, 'server_peak_mib', '{:.1f}')} "
            f"| {cell(best, 'loadgen_cpu_pct', '{:.0f}%')} | {cell(best, 'saturated')} |"
        )
    ours = results.get("chatroom")
    for name, best in results.items():
        if name != "chatroom" and ours and best:
            lines.append("")
            lines.append(f"chatroom / {name}: {ours['rate'] / best['rate']:.2f}x the rate")
        elif name != "chatroom" and ours and best is None:
            lines.append("")
            lines.append(f"chatroom / {name}: {name} passed no rate tried")
    return [*lines, ""]


def web_table(title: str, points: dict[str, list[Result]]) -> list[str]:
    """Each run's WebSocket members beside its TCP members, at its highest passing rate."""
    lines = [
        f"### {title}",
        "",
        "| run | rate (msg/s) | members | TCP p50 ms | TCP p99 ms | WebSocket delivered "
        "| WebSocket p50 ms | WebSocket p99 ms | server CPU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, tried in points.items():
        best = best_passing(tried)
        members = "—" if best is None else f"{best['members'] - best['web_members']:,} TCP"
        members += "" if best is None else f" + {best['web_members']:,} WebSocket"
        delivered = "—" if best is None else f"{best['web_delivered']:,}/{best['web_expected']:,}"
        lines.append(
            f"| {name} | {cell(best, 'rate')} | {members} "
            f"| {cell(best, 'tcp_p50_ms', '{:.2f}')} | {cell(best, 'tcp_p99_ms', '{:.2f}')} "
            f"| {delivered} | {cell(best, 'web_p50_ms', '{:.2f}')} "
            f"| {cell(best, 'web_p99_ms', '{:.2f}')} | {cell(best, 'server_cpu_pct', '{:.0f}%')} |"
        )
    return [*lines, ""]


def best_passing(points: list[Result]) -> Result | None:
    """The highest rate that passed: the sweep stops at the first that fails."""
    passed = [point for point in points if point["passed"]]
    return passed[-1] if passed else None


def scale_table(
    members: int, scale: dict[str, Result], sizes: dict[str, list[Result]]
) -> list[str]:
    lines = [
        f"### Scale: {members:,} members, one sending {SCALE_RATE:g} messages/s",
        "",
        "| server | all joined in (s) | listen-queue overflows while joining | p99 ms "
        "| delivered | memory per member (KiB) |",
        "|---|---|---|---|---|---|",
    ]
    for name, point in scale.items():
        lines.append(scale_row(name, point))
    if sizes:
        lines += [
            "",
            "Smaller rooms (the picture's other points):",
            "",
            "| server | members | all joined in (s) | listen-queue overflows while joining "
            "| memory per member (KiB) |",
            "|---|---|---|---|---|",
        ]
        for name, points in sizes.items():
            for point in points[:-1]:  # the last is the full-size room, in the table above
                lines.append(
                    f"| {name} | {point['members']:,} | {cell(point, 'join_seconds', '{:.2f}')} "
                    f"| {cell(point, 'listen_overflows')} "
                    f"| {cell(point, 'kib_per_member', '{:.2f}')} |"
                )
    return [*lines, ""]


def scale_row(name: str, point: Result) -> str:
    return (
        f"| {name} | {cell(point, 'join_seconds', '{:.2f}')} "
        f"| {cell(point, 'listen_overflows')} | {cell(point, 'p99_ms', '{:.2f}')} "
        f"| {cell(point, 'delivered')}/{cell(point, 'expected')} "
        f"| {cell(point, 'kib_per_member', '{:.2f}')} |"
    )


def overload_table(overloads: dict[str, Result]) -> list[str]:
    lines = [
        "### Overload: twice the highest passing fan-out rate, then half of it again",
        "",
        "| server | rate (msg/s) | delivered | members dropped as too slow | memory growth (MiB) "
        "| recovered (p99 ms) |",
        "|---|---|---|---|---|---|",
    ]
    for name, point in overloads.items():
        lines.append(
            f"| {name} | {cell(point, 'rate')} | {cell(point, 'delivered_pct', '{:.1f}%')} "
            f"| {cell(point, 'dropped_slow')} | {cell(point, 'growth_mib', '{:.1f}')} "
            f"| {cell(point, 'recovered')} ({cell(point, 'recovery_p99_ms', '{:.1f}')}) |"
        )
    return [*lines, ""]


def report(command: str, plan: Plan, results: Results) -> str:
    redis = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout
    lines = [
        f"Command: `{command}`  ",
        f"Machine: {os.cpu_count()} CPUs, {platform.platform()}, Python {platform.python_version()}"
        + (f", {redis.split()[2]}" if redis else ""),
        f"A rate passes when ≥ {PASS_DELIVERED:.1%} of deliveries arrive, in per-sender order, "
        f"none echoed, with p99 ≤ {PASS_P99_MS:.0f} ms. Latency runs from each message's "
        "scheduled send time (open loop).",
        "",
    ]
    if results.fan_out:
        title = (
            f"Fan-out: {plan.fan_out.members:,} members, {plan.fan_out.senders} sending, "
            "64-byte messages"
        )
        lines += sweep_table(title, results.fan_out)
    if results.web:
        title = (
            f"Fan-out to WebSocket members: {plan.fan_out.members:,} members, one in {WEB_SHARE} "
            "a browser (the load generator speaks the framing)"
        )
        lines += web_table(title, results.web)
    if results.chatty:
        lines += sweep_table(
            f"Chatty room: {plan.chatty.members} members, all sending", results.chatty
        )
    if results.scale:
        lines += scale_table(plan.scale_members, results.scale, results.scale_sizes)
    if results.overload:
        lines += overload_table(results.overload)
    if results.tls:
        title = (
            f"Fan-out with TLS members: {plan.tls.members:,} members, "
            f"{plan.tls.senders} sending, through stunnel on the load generator's CPU"
        )
        lines += sweep_table(title, results.tls)
    if results.bridge:
        lines += bridge_table(plan.bridge, results.bridge)
    return "\n".join(lines)


def draw_pictures(out: Path, plan: Plan, results: Results, quick: bool) -> None:
    """One PNG per scenario that ran, next to results.md; smaller with --quick."""
    try:
        import pictures  # bench/pictures.py; needs matplotlib (requirements-dev.txt)
    except ImportError as exc:
        print(f"no pictures: {exc} (pip install -r requirements-dev.txt)", file=sys.stderr)
        return
    dpi = 50 if quick else 120

    def p99_against_rate(points: dict[str, list[Result]]) -> pictures.Series:
        return {
            name: [(p["rate"], p["p99_ms"], p["passed"]) for p in tried if p.get("p99_ms", -1) > 0]
            for name, tried in points.items()
        }

    if results.fan_out:
        title = f"Fan-out: {plan.fan_out.members:,} members, {plan.fan_out.senders} sending"
        pictures.latency_against_rate(
            out / "fan-out.png", title, p99_against_rate(results.fan_out), PASS_P99_MS, dpi
        )
    if results.chatty:
        title = f"Chatty room: {plan.chatty.members} members, all sending"
        pictures.latency_against_rate(
            out / "chatty.png", title, p99_against_rate(results.chatty), PASS_P99_MS, dpi
        )
    if results.scale_sizes:
        joined = {
            name: [(p["members"], p["join_seconds"], p["joined"] >= p["members"]) for p in points]
            for name, points in results.scale_sizes.items()
        }
        memory = {
            name: [(p["members"], p["kib_per_member"], p["joined"] >= p["members"]) for p in points]
            for name, points in results.scale_sizes.items()
        }
        title = f"Scale: rooms up to {plan.scale_members:,} members joining at once"
        pictures.scale(out / "scale.png", title, joined, memory, dpi)
    if results.tls:
        title = f"Fan-out with TLS members: {plan.tls.members:,} members"
        pictures.latency_against_rate(
            out / "tls.png", title, p99_against_rate(results.tls), PASS_P99_MS, dpi
        )
    if results.overload:
        pictures.overload(
            out / "overload.png",
            "Overload: twice each server's highest passing fan-out rate",
            {name: point["delivered_pct"] for name, point in results.overload.items()},
            {name: max(point["growth_mib"], 0.1) for name, point in results.overload.items()},
            dpi,
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="each scenario once, briefly")
    parser.add_argument(
        "--servers", nargs="+", default=[server.name for server in SERVERS], help="which to run"
    )
    parser.add_argument(
        "--scenarios",
        nargs="+",
        choices=SCENARIOS,
        default=SCENARIOS,
        help="which to run (default: all); overload runs at twice fan-out's best rate, so it "
        "brings fan-out along",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="where the report and pictures go (default: bench/results, or bench/results/quick "
        "with --quick)",
    )
    args = parser.parse_args()
    servers = available([server for server in SERVERS if server.name in args.servers])
    chosen = set(args.scenarios) | ({"fan-out"} if "overload" in args.scenarios else set())
    plan = QUICK if args.quick else FULL
    out: Path = args.out or (BENCH / "results" / "quick" if args.quick else BENCH / "results")
    results = Results()
    if "tls" in chosen and not all(shutil.which(tool) for tool in ("stunnel4", "openssl")):
        print(
            "stunnel4 or openssl not found: the tls scenario is skipped "
            "(install them with: apt-get install stunnel4 openssl)",
            file=sys.stderr,
        )
        chosen.discard("tls")
    with tempfile.TemporaryDirectory() as folder:
        loadgen = compile_loadgen(Path(folder))
        for server in servers:
            if "fan-out" in chosen:
                _, results.fan_out[server.name] = sweep(server, loadgen, plan.fan_out)
            if "fan-out" in chosen and server.name == "chatroom":
                web_members = plan.fan_out.members // WEB_SHARE
                _, results.web["chatroom, WebSocket and TCP"] = sweep(
                    server, loadgen, plan.fan_out, web_members=web_members
                )
            if "chatty" in chosen:
                _, results.chatty[server.name] = sweep(server, loadgen, plan.chatty)
            if "scale" in chosen:
                point, sizes = scale(server, loadgen, plan)
                results.scale[server.name] = point
                if server.name in SCALE_SWEPT:
                    results.scale_sizes[server.name] = sizes
            if "overload" in chosen:
                best = best_passing(results.fan_out[server.name])
                rate = best["rate"] if best else plan.fan_out.rates[0]
                results.overload[server.name] = overload(
                    server, loadgen, rate, plan.overload_seconds
                )
            if "tls" in chosen and server.name == "chatroom":
                tls = TlsFront.make(Path(folder))
                _, results.tls["chatroom, TLS members"] = sweep(server, loadgen, plan.tls, tls)
        if "bridge" in chosen and "chatroom" in args.servers:
            if shutil.which("redis-server") is None or find_spec("hiredis") is None:
                print(
                    "redis-server or hiredis not found: the bridge scenario is skipped "
                    "(apt-get install redis-server; pip install 'chatroom[redis]')",
                    file=sys.stderr,
                )
            else:
                for count in BRIDGE_SERVERS:
                    results.bridge[count] = bridge_sweep(loadgen, plan.bridge, count)
    command = " ".join(["python bench/run.py", *sys.argv[1:]])
    text = report(command, plan, results)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text)
    draw_pictures(out, plan, results, args.quick)
    print(f"report and pictures in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
