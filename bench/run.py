"""The chat room benchmark: our server side by side with a thread-per-client server, an asyncio
server and Redis pub/sub, all driven by one C load generator (bench/loadgen.c, compiled here).

    python bench/run.py            everything (about 10 minutes)
    python bench/run.py --quick    each scenario once, for a second or two (CI runs this)

The server runs on CPU 0 and the load generator on CPU 1 (taskset), so runs compare. Redis
comes from Debian's packages (apt-get install redis-server) and is skipped, with a message,
where redis-server is missing. Prints a Markdown report; BENCHMARKS.md holds one full run.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SERVER_CPU, LOADGEN_CPU = "0", "1"
OPEN_FILES = 20000  # 10,000 members on each side, with room to spare
PASS_DELIVERED = 0.999  # a rate passes when this share of deliveries arrives ...
PASS_P99_MS = 100.0  # ... with this p99 latency, in order, none echoed
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
            "--max-members",
            "20000",  # room for the 10,000-member scenario
        ],
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


class Running:
    """One server process for one measurement."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.port = free_port()
        self.proc = subprocess.Popen(
            pinned(SERVER_CPU, server.command(self.port)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=limit_open_files,
        )
        deadline = time.monotonic() + 10
        while True:  # a bounded retry: a server's readiness has no event to wait on here
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"{server.name} did not start") from None
                time.sleep(0.05)
        self.idle_mib = proc_status(self.proc.pid, "VmRSS")

    def load(
        self, loadgen: Path, members: int, senders: int, rate: float, seconds: float
    ) -> Result:
        """Runs the load generator once and adds the server's CPU and memory to its report."""
        cpu_before, started = cpu_seconds(self.proc.pid), time.monotonic()
        command = [str(loadgen), self.server.mode, "127.0.0.1", str(self.port)]
        command += [str(members), str(senders), f"{rate:g}", f"{seconds:g}", "64"]
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
        result["rate"] = rate
        result["server_cpu_pct"] = 100 * (cpu_seconds(self.proc.pid) - cpu_before) / elapsed
        result["server_rss_mib"] = proc_status(self.proc.pid, "VmRSS")
        result["server_peak_mib"] = proc_status(self.proc.pid, "VmHWM")
        result["idle_mib"] = self.idle_mib
        result["loadgen_cpu_pct"] = 100 * result["cpu_seconds"] / max(result["wall_seconds"], 1e-9)
        result["deliveries_per_s"] = result["delivered"] / max(result["wall_seconds"], 1e-9)
        result["passed"] = (
            result["joined"] == members + (senders if self.server.mode == "redis" else 0)
            and result["delivered"] >= PASS_DELIVERED * result["expected"]
            and 0 <= result["p99_ms"] <= PASS_P99_MS
            and result["order_errors"] == 0
            and result["echoes"] == 0
        )
        return result

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def measure(server: Server, loadgen: Path, *load: Any) -> Result:
    running = Running(server)
    try:
        return running.load(loadgen, *load)
    finally:
        running.stop()


def sweep(server: Server, loadgen: Path, plan: Sweep) -> tuple[Result | None, list[Result]]:
    """Tries each rate until one fails; gives the highest that passed and every point."""
    best, points = None, []
    for rate in plan.rates:
        point = measure(server, loadgen, plan.members, plan.senders, rate, plan.seconds)
        points.append(point)
        log(server.name, plan.name, point)
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


def log(server: str, scenario: str, point: Result) -> None:
    shown = {key: point.get(key) for key in ("rate", "passed", "delivered", "expected", "p99_ms")}
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
    if point is None or key not in point:
        return "—"
    value = point[key]
    if isinstance(value, bool):
        return "yes" if value else "no"
    return form.format(value) if isinstance(value, (int, float)) else str(value)


def sweep_table(title: str, results: dict[str, Result | None]) -> list[str]:
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


def report(
    quick: bool,
    fan_out: dict[str, Result | None],
    chatty: dict[str, Result | None],
    scale: dict[str, Result],
    overloads: dict[str, Result],
    members_at_scale: int,
) -> str:
    redis = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout
    lines = [
        f"Command: `python bench/run.py{' --quick' if quick else ''}`  ",
        f"Machine: {os.cpu_count()} CPUs, {platform.platform()}, Python {platform.python_version()}"
        + (f", {redis.split()[2]}" if redis else ""),
        f"A rate passes when ≥ {PASS_DELIVERED:.1%} of deliveries arrive, in per-sender order, "
        f"none echoed, with p99 ≤ {PASS_P99_MS:.0f} ms. Latency runs from each message's "
        "scheduled send time (open loop).",
        "",
        *sweep_table("Fan-out: 1,000 members, 10 sending, 64-byte messages", fan_out),
        *sweep_table("Chatty room: 50 members, all sending", chatty),
        f"### Scale: {members_at_scale:,} members, one sending 10 messages/s",
        "",
        "| server | all joined in (s) | p99 ms | delivered | memory per member (KiB) |",
        "|---|---|---|---|---|",
    ]
    for name, point in scale.items():
        per_member = (
            1024 * (point["server_rss_mib"] - point["idle_mib"]) / members_at_scale
            if "server_rss_mib" in point
            else None
        )
        lines.append(
            f"| {name} | {cell(point, 'join_seconds', '{:.2f}')} "
            f"| {cell(point, 'p99_ms', '{:.2f}')} "
            f"| {cell(point, 'delivered')}/{cell(point, 'expected')} "
            f"| {'—' if per_member is None else f'{per_member:.2f}'} |"
        )
    lines += [
        "",
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
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="each scenario once, briefly")
    parser.add_argument(
        "--servers", nargs="+", default=[server.name for server in SERVERS], help="which to run"
    )
    args = parser.parse_args()
    servers = available([server for server in SERVERS if server.name in args.servers])
    if args.quick:
        fan_out_plan = Sweep("fan-out", 1000, 10, [500], 1)
        chatty_plan = Sweep("chatty", 50, 50, [2000], 1)
        scale_members, scale_seconds, overload_seconds = 2000, 1.0, 1.0
    else:
        rates = [50, 100, 250, 500, 1000, 2000, 3000, 4000, 6000, 8000, 12000, 16000, 24000]
        fan_out_plan = Sweep("fan-out", 1000, 10, [float(rate) for rate in rates], 5)
        chatty_rates = [1000, 2000, 4000, 8000, 16000, 32000, 64000, 96000, 128000]
        chatty_plan = Sweep("chatty", 50, 50, [float(rate) for rate in chatty_rates], 5)
        scale_members, scale_seconds, overload_seconds = 10_000, 10.0, 10.0
    with tempfile.TemporaryDirectory() as folder:
        loadgen = compile_loadgen(Path(folder))
        fan_out: dict[str, Result | None] = {}
        chatty: dict[str, Result | None] = {}
        scale: dict[str, Result] = {}
        overloads: dict[str, Result] = {}
        for server in servers:
            fan_out[server.name], _ = sweep(server, loadgen, fan_out_plan)
            chatty[server.name], _ = sweep(server, loadgen, chatty_plan)
            point = measure(server, loadgen, scale_members, 1, 10, scale_seconds)
            log(server.name, "scale", point)
            scale[server.name] = point
            best = fan_out[server.name]
            overloads[server.name] = overload(
                server, loadgen, best["rate"] if best else fan_out_plan.rates[0], overload_seconds
            )
    print(report(args.quick, fan_out, chatty, scale, overloads, scale_members))
    return 0


if __name__ == "__main__":
    sys.exit(main())
