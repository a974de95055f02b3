"""Per-run bookkeeping shared by every algorithm: run folder, progress line, JSONL, plots, summary."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from fedtune.config import RunConfig
from fedtune.data.prompts import prompt_text
from fedtune.runlog import MetricsLog, MetricValue, atomic_write_text, plot_curves, strict_json_values

console = Console(stderr=False, highlight=False, soft_wrap=True)


def new_run_dir(cfg: RunConfig, path: Path | None = None) -> Path:
    """``output_dir/name/YYYYmmdd-HHMMSS[-n]`` (or ``path``), with the resolved ``config.toml``.

    Never overwrites an earlier run: a given ``path`` must not hold one.
    """
    if path is not None:
        if (path / "config.toml").exists():
            raise ValueError(f"{path} already holds a run; resume it or pick a new folder")
        path.mkdir(parents=True, exist_ok=True)
    else:
        root = Path(cfg.run.output_dir) / cfg.run.name
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = root / stamp
        n = 1
        while path.exists():
            n += 1
            path = root / f"{stamp}-{n}"
        path.mkdir(parents=True)
    (path / "config.toml").write_text(cfg.to_toml(), encoding="utf-8")
    return path


def _numbers(records: list[dict[str, MetricValue]], key: str) -> list[float]:
    return [float(v) for r in records if isinstance(v := r.get(key), int | float)]


@dataclass
class RunRecorder:
    """Writes one JSONL record per round (plus round 0, the untuned model), the plots, and each
    evaluated round's greedy generations (``generations.jsonl``: what the model now answers)."""

    run_dir: Path
    cfg: RunConfig
    quiet: bool = False
    resume: bool = False
    records: list[dict[str, MetricValue]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        self.generations = MetricsLog(self.run_dir / "generations.jsonl")
        if not self.resume and self.metrics.path.exists():
            raise ValueError(f"{self.metrics.path} exists; resume that run or pick a new run folder")
        self._t0 = time.perf_counter()
        self._offset = 0.0

    def restore(self, *, up_to_round: int) -> None:
        """Reload the rows of rounds <= ``up_to_round`` (a resumed run drops rows after its checkpoint)."""
        rows = [r for r in self.metrics.read() if isinstance(n := r.get("round"), int) and n <= up_to_round]
        self.metrics.rewrite(rows)
        self.records = rows
        # Generations of rounds after the checkpoint are written again when those rounds rerun.
        gens = self.generations.read()
        kept = [r for r in gens if isinstance(n := r.get("round"), int) and n <= up_to_round]
        if len(kept) != len(gens):
            self.generations.rewrite(kept)
        last = rows[-1].get("elapsed_s") if rows else 0.0
        self._offset = float(last) if isinstance(last, int | float) else 0.0

    def note(self, text: str) -> None:
        """A progress line on the console (not in metrics.jsonl), printed once."""
        if not self.quiet:
            console.print(f"[dim]{time.strftime('%H:%M:%S')}  {text}[/dim]")

    def record_generations(
        self,
        server_round: int,
        split: str,
        prompts: Sequence[str],
        references: Sequence[str],
        generations: Sequence[str],
    ) -> None:
        """Append one ``generations.jsonl`` row per greedy generation of ``split`` at ``server_round``.

        Prompts are written as readable text (an input or earlier turns spelled out, not the
        tagged form the task's ``prompt`` column carries them in).
        """
        self.generations.extend(
            [
                {
                    "round": server_round,
                    "split": split,
                    "prompt": prompt_text(p),
                    "reference": r,
                    "generation": g,
                }
                for p, r, g in zip(prompts, references, generations, strict=True)
            ]
        )

    def record(self, values: Mapping[str, MetricValue]) -> None:
        rec = dict(values)
        rec["elapsed_s"] = round(self._offset + time.perf_counter() - self._t0, 3)
        self.records.append(rec)
        self.metrics.append(rec)
        if not self.quiet:
            console.print(self._progress_line(rec))

    def _progress_line(self, rec: Mapping[str, MetricValue]) -> str:
        if rec.get("applied") is False:
            head = f"[bold]round {rec.get('round')}/{self.cfg.federation.num_rounds}[/bold]"
            return f"{head}  [red]skipped[/red]: {rec.get('note', '')}  ({rec.get('rejected', 0)} rejected)"

        def fmt(key: str, spec: str) -> str:
            v = rec.get(key)
            return format(v, spec) if isinstance(v, int | float) else "-"

        # A classifier has an accuracy and no generations to score.
        quality = (
            f"accuracy {fmt('heldout_accuracy', '.3f')}  "
            if "heldout_accuracy" in rec
            else f"Rouge-L {fmt('rouge_l', '.2f')}  EM {fmt('exact_match', '.3f')}  "
        )
        if "zeroshot_rouge_l" in rec:
            quality += f"zero-shot Rouge-L {fmt('zeroshot_rouge_l', '.2f')}  "
        return (
            f"[bold]round {rec.get('round')}/{self.cfg.federation.num_rounds}[/bold]  "
            f"train {fmt('train_loss', '.4f')}  held-out {fmt('heldout_loss', '.4f')}  {quality}"
            f"up {fmt('payload_bytes_up', ',.0f')} B  down {fmt('payload_bytes_down', ',.0f')} B  "
            f"{fmt('round_s', '.1f')} s"
        )

    def finish(self, extra: Mapping[str, MetricValue] | None = None) -> dict[str, MetricValue]:
        """Plots and ``summary.json``; returns the summary (first vs last evaluated round)."""
        evaluated = [r for r in self.records if isinstance(r.get("heldout_loss"), int | float)]
        summary: dict[str, MetricValue] = {
            "run_dir": str(self.run_dir),
            "algorithm": self.cfg.run.algorithm,
            "rounds": int(max(_numbers(self.records, "round"), default=0)),
            "wall_s": round(self._offset + time.perf_counter() - self._t0, 1),
        }
        if evaluated:
            first, last = evaluated[0], evaluated[-1]
            keys = ["heldout_loss", "rouge_l", "exact_match"]
            keys += ["heldout_accuracy"] if "heldout_accuracy" in last else []
            keys += [
                k for k in ("heldout_loss_per_example", "zeroshot_loss", "zeroshot_rouge_l") if k in last
            ]
            for key in keys:
                summary[f"initial_{key}"] = first.get(key)
                summary[f"final_{key}"] = last.get(key)
        # The privacy spent by the whole run: the ledger's figures after its last round.
        private = [r for r in self.records if "epsilon" in r]
        if private:
            for key in ("epsilon", "epsilon_rdp", "epsilon_prv"):
                summary[f"final_{key}"] = private[-1].get(key)
        # Averages are over rounds that trained; a skipped round moved no model.
        trained = [r for r in self.records if r.get("applied") is True]
        if trained:
            for key in ("payload_bytes_up", "payload_bytes_down", "message_bytes_up", "message_bytes_down"):
                vals = _numbers(trained, key)
                summary[f"mean_{key}"] = round(sum(vals) / len(vals), 1) if vals else None
            secs = _numbers(trained, "round_s")
            summary["mean_round_s"] = round(sum(secs) / len(secs), 2) if secs else None
            peaks = _numbers(trained, "client_peak_mb")
            summary["client_peak_mb"] = round(max(peaks), 1) if peaks else None
        summary.update(extra or {})
        summary = strict_json_values(summary)
        if len(self.records) > 1:
            plot_curves(
                self.records,
                self.run_dir / "curves.png",
                title=f"{self.cfg.run.algorithm}: {self.cfg.run.name}",
            )
        atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2))
        if not self.quiet:
            start, end = summary.get("initial_heldout_loss"), summary.get("final_heldout_loss")
            loss = (
                f"held-out {start:.4f} -> {end:.4f}, "
                if isinstance(start, float) and isinstance(end, float)
                else ""
            )
            console.print(
                f"[bold green]finished[/bold green] {summary.get('completed_rounds', '-')} rounds, {loss}"
                f"{summary['wall_s']} s; run folder {self.run_dir} (summary.json)"
            )
        return summary
