"""What the loop counts for the operator's status line: joins and leaves since the last one,
leaves by reason. Pure: no I/O, no clock of its own (time is an argument)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Stats:
    since: float  # when the counts were last started again: the last status line
    joins: int = 0  # members who joined since then
    leaves: Counter[str] = field(default_factory=Counter)  # members who left since, by reason

    def joined(self) -> None:
        self.joins += 1

    def left(self, reason: str) -> None:
        self.leaves[reason] += 1

    def summary_line(
        self, now: float, members: int, connections: int, max_connections: int, queued: int
    ) -> str:
        """One line for the log: the room now, then what changed since the last line."""
        left = sum(self.leaves.values())
        reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(self.leaves.items()))
        elapsed = now - self.since
        return (
            f"status: {members} members, {connections} connections (max {max_connections}), "
            f"{queued} bytes queued; in the last {elapsed:.{0 if elapsed >= 10 else 1}f} s: "
            f"{self.joins} joined, {left} left" + (f" ({reasons})" if reasons else "")
        )

    def restart(self, now: float) -> None:
        """Starts the counts again, after a status line."""
        self.since = now
        self.joins = 0
        self.leaves.clear()
