"""What a datagen run did: samples written per kind, rejected per reason, skipped, tokens, cost."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Summary:
    written: dict[str, int] = field(default_factory=dict)  # per kind (or per source for mix)
    rejected: dict[str, int] = field(default_factory=dict)  # per reason
    skipped: int = 0  # already in the output (or rejects) file from an earlier run: resume
    unfinished: int = 0  # no reply came (timeouts): neither written nor rejected, a rerun asks again
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0  # transport retries (429, 5xx, timeouts, malformed responses)
    cost: float | None = None  # in the currency of the prices given; None when no prices were given

    def wrote(self, kind: str, n: int = 1) -> None:
        self.written[kind] = self.written.get(kind, 0) + n

    def reject(self, reason: str, n: int = 1) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + n

    @property
    def n_written(self) -> int:
        return sum(self.written.values())

    @property
    def n_rejected(self) -> int:
        return sum(self.rejected.values())

    def text(self) -> str:
        lines = [f"written {self.n_written}, rejected {self.n_rejected}, skipped (already done) {self.skipped}"
                 + (f", unfinished (no reply; run again to retry) {self.unfinished}" if self.unfinished else "")]
        lines += [f"  {k:<40}{n:>8}" for k, n in sorted(self.written.items())]
        if self.rejected:
            lines.append("rejected by reason:")
            lines += [f"  {r:<40}{n:>8}" for r, n in sorted(self.rejected.items(), key=lambda kv: -kv[1])]
        if self.prompt_tokens or self.completion_tokens:
            lines.append(f"tokens: {self.prompt_tokens} prompt + {self.completion_tokens} completion"
                         f"{f', {self.retries} retries' if self.retries else ''}")
        if self.cost is not None:
            lines.append(f"cost: {self.cost:.4f}")
        return "\n".join(lines)
