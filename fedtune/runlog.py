"""Run folders: resolved config, per-round metrics as JSONL, and PNG plots a person can look at."""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

MetricValue = int | float | str | bool | None


def strict_json_values(record: Mapping[str, MetricValue]) -> dict[str, MetricValue]:
    """NaN/inf become null: ``json.dumps`` would write bare NaN, which strict JSON readers reject."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


class MetricsLog:
    """Appends one JSON object per line and flushes, so a crashed run keeps what it measured."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, record: Mapping[str, MetricValue]) -> None:
        clean = strict_json_values(record)
        clean.setdefault("time", round(time.time(), 3))
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(clean, sort_keys=True) + "\n")

    def extend(self, records: Sequence[Mapping[str, MetricValue]]) -> None:
        """Append rows as given (no time stamp), in one write that is flushed when the file closes."""
        if records:
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write("".join(json.dumps(strict_json_values(r), sort_keys=True) + "\n" for r in records))

    def read(self) -> list[dict[str, MetricValue]]:
        return read_jsonl(self.path)

    def rewrite(self, records: Sequence[Mapping[str, MetricValue]]) -> None:
        """Replace the file's rows atomically (a resumed run keeps only the rows it continues from)."""
        atomic_write_text(
            self.path, "".join(json.dumps(strict_json_values(r), sort_keys=True) + "\n" for r in records)
        )


class PhaseTimer:
    """Wall seconds per named phase of one client round (model load, replay, local steps, ...).

    A node writes them next to its state, so a deployment can be profiled per round without a
    debugger: what the round cost, and which share was fedtune's and which the training's.
    """

    def __init__(self) -> None:
        self._seconds: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self._seconds[name] = self._seconds.get(name, 0.0) + time.perf_counter() - start

    def add(self, name: str, seconds: float) -> None:
        self._seconds[name] = self._seconds.get(name, 0.0) + seconds

    def count(self, name: str, value: int) -> None:
        self._counts[name] = value

    def as_record(self) -> dict[str, MetricValue]:
        out: dict[str, MetricValue] = {f"{k}_s": round(v, 6) for k, v in self._seconds.items()}
        out.update(self._counts)
        return out


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, flush it to disk, then rename it over
    ``path``: a reader (or a crash) sees the old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_jsonl(path: str | Path) -> list[dict[str, MetricValue]]:
    p = Path(path)
    if not p.is_file():
        return []
    out: list[dict[str, MetricValue]] = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{p}:{n} is not valid JSON ({exc}); the metrics file is corrupt") from exc
    return out


def _finite(value: MetricValue) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def plot_curves(
    records: Sequence[Mapping[str, MetricValue]],
    png_path: str | Path,
    *,
    x: str = "round",
    panels: Sequence[tuple[str, str]] = (
        ("heldout_loss", "held-out answer loss"),
        ("rouge_l", "Rouge-L (%)"),
        ("zeroshot_rouge_l", "zero-shot Rouge-L (%)"),
        ("heldout_accuracy", "held-out accuracy"),
        ("train_loss", "train loss (clients)"),
    ),
    title: str = "",
) -> Path:
    """One panel per metric against ``x``; metrics with no finite value in any record are skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [(k, label) for k, label in panels if any(_finite(r.get(k)) for r in records)]
    if not present:
        raise ValueError(f"no plottable metrics among {[k for k, _ in panels]} in {len(records)} records")
    fig, axes = plt.subplots(1, len(present), figsize=(4.2 * len(present), 3.4), squeeze=False)
    for ax, (key, label) in zip(axes[0], present, strict=True):
        pts = [
            (r[x], r[key])
            for r in records
            if isinstance(r.get(key), int | float) and isinstance(r.get(x), int | float)
        ]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3)
        ax.set_xlabel(x)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(png_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
