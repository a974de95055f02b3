"""Time and memory of one MeZO step on SmolLM2-135M against two forward passes and two reference steps.

Usage: ``python benchmarks/zo_step.py [--quick]`` (``--quick``: the 2-layer slice).
The last printed line is one JSON object. Every time is the median of ``--reps`` interleaved repetitions
after one warm-up each, with min and max. ``careful_reference`` is the baseline (same loss as fedtune, an
explicit generator, in-place adds); ``published_mezo_hf_loss`` is MeZO's published loop with the full Hugging
Face loss, a labelled second figure.

Memory: a fresh subprocess loads the model, then for each mode (two forwards; two ZO steps per kind) resets
the kernel's peak-RSS mark (``echo 5 > /proc/self/clear_refs``) and reads ``VmHWM`` after the work;
``*_peak_mb`` is that peak (the whole process: runtime, weights, activations, caches). Where clear_refs is
unavailable a 1 ms RSS sampling thread is used instead (``memory_method`` says which).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from _timing import interleaved
from torch import nn
from transformers import PreTrainedModel

from fedtune.assets.models import load_causal_lm
from fedtune.data.batch import TokenBatch
from fedtune.zo import MeZOStep, ParamSelection, ZOConfig, answer_loss, select_parameters

EPS, LR = 1e-3, 1e-6
BATCH, LENGTH, ANSWER = 8, 64, 8


def load(quick: bool) -> PreTrainedModel:
    return load_causal_lm("smollm2-135m", num_layers=2 if quick else None)


def random_batch(vocab: int) -> TokenBatch:
    """8 x 64 random token ids (explicit generator) with answer labels on the last 8 tokens."""
    generator = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, vocab, (BATCH, LENGTH), generator=generator)
    labels = torch.full_like(ids, -100)
    labels[:, -ANSWER:] = ids[:, -ANSWER:]
    return TokenBatch(ids, torch.ones_like(ids), labels)


def careful_step(
    model: nn.Module, params: list[nn.Parameter], batch: TokenBatch, seed: int, kind: str
) -> float:
    """The baseline: MeZO as a careful user writes it, with fedtune's loss.

    An explicit generator reseeded for each of the four passes, z regenerated per parameter and added in
    place, and the same answer-only loss as fedtune's step, so the ratio measures the engine alone.
    """
    generator = torch.Generator()

    def perturb(scale: float) -> None:
        generator.manual_seed(seed)
        for p in params:
            if kind == "gaussian":
                z = torch.randn(p.shape, generator=generator)
            else:
                z = torch.randint(0, 2, p.shape, generator=generator, dtype=torch.float32).mul_(2.0).sub_(1.0)
            p.add_(z, alpha=scale)

    with torch.inference_mode():
        perturb(EPS)
        loss_plus = float(answer_loss(model, batch))
        perturb(-2 * EPS)
        loss_minus = float(answer_loss(model, batch))
        perturb(EPS)
        grad = (loss_plus - loss_minus) / (2 * EPS)
        perturb(-LR * grad)
    return grad


def published_step(model: nn.Module, params: list[nn.Parameter], batch: TokenBatch, seed: int) -> float:
    """MeZO as published: global-RNG reseeding, torch.normal per parameter, four passes, full HF loss.

    Kept as a labelled second figure: its full-vocabulary loss is part of what it costs. The only place in
    fedtune that seeds the global RNG; fork_rng restores it after.
    """

    def perturb(scale: float) -> None:
        torch.manual_seed(seed)
        for p in params:
            z = torch.normal(mean=0, std=1, size=p.size(), device=p.device, dtype=p.dtype)
            p.data = p.data + scale * z

    def loss() -> float:
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
        return float(out.loss.item())

    with torch.random.fork_rng(devices=[]), torch.inference_mode():
        perturb(EPS)
        loss_plus = loss()
        perturb(-2 * EPS)
        loss_minus = loss()
        perturb(EPS)
        grad = (loss_plus - loss_minus) / (2 * EPS)
        perturb(-LR * grad)
    return grad


class PeakRss:
    """Peak resident memory of this process during a block, in MB."""

    def __init__(self) -> None:
        self.method = "vmhwm-clear-refs"
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.method = "rss-sampling-1ms"
        self._peak = 0
        self._stop = threading.Event()

    @staticmethod
    def _status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"{key} missing from /proc/self/status")

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self._status("VmRSS"))
            time.sleep(0.001)

    def __enter__(self) -> PeakRss:
        self.baseline_mb = self._status("VmRSS") / 2**20
        if self.method != "vmhwm-clear-refs":
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.method == "vmhwm-clear-refs":
            self.peak_mb = self._status("VmHWM") / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = self._peak / 2**20


def measure_memory(quick: bool, kinds: list[str], cache_z: str) -> dict[str, dict[str, float | str]]:
    """Run inside a fresh subprocess: peak RSS of two forwards, then of two ZO steps per kind.

    The peak mark is reset before each mode; the steppers' buffers are large mmap-backed allocations that go
    back to the OS when freed, so one mode does not inflate the next.
    """
    model = load(quick)
    batch = random_batch(model.config.vocab_size)
    tuned = select_parameters(model, ParamSelection())
    out: dict[str, dict[str, float | str]] = {}
    gc.collect()
    with PeakRss() as rss, torch.inference_mode():
        for _ in range(2):
            answer_loss(model, batch)
            answer_loss(model, batch)
    out["inference"] = {"peak_mb": rss.peak_mb, "baseline_mb": rss.baseline_mb, "method": rss.method}
    for kind in kinds:
        stepper = MeZOStep(model, tuned, ZOConfig(eps=EPS, kind=kind, cache_z=cache_z), run_seed=0)  # type: ignore[arg-type]
        gc.collect()
        with PeakRss() as rss:
            for seed in range(2):
                stepper.step(batch, seed, LR)
        out[kind] = {"peak_mb": rss.peak_mb, "baseline_mb": rss.baseline_mb, "method": rss.method}
        del stepper
        gc.collect()
    return out


def memory_in_subprocess(quick: bool, kinds: list[str], cache_z: str) -> dict[str, dict[str, float | str]]:
    cmd = [sys.executable, __file__, "--memory", "--kinds", ",".join(kinds), "--cache-z", cache_z]
    done = subprocess.run([*cmd, *(["--quick"] if quick else [])], capture_output=True, text=True, check=True)
    result: dict[str, dict[str, float | str]] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2-layer slice, 3 repetitions")
    parser.add_argument("--kinds", default="gaussian,rademacher", help="comma-separated perturbation kinds")
    parser.add_argument("--cache-z", default="auto", choices=["auto", "always", "never"])
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 3)")
    parser.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    kinds = args.kinds.split(",")
    if args.memory:
        print(json.dumps(measure_memory(args.quick, kinds, args.cache_z)))
        return
    reps = args.reps or 3

    model = load(args.quick)
    batch = random_batch(model.config.vocab_size)
    tuned = select_parameters(model, ParamSelection())
    params = list(tuned.tensors)
    zeros = [torch.zeros_like(p) for p in params]

    def two_forward() -> None:
        with torch.inference_mode():
            answer_loss(model, batch)
            answer_loss(model, batch)

    def axpy_pass() -> None:
        with torch.inference_mode():
            for p, z in zip(params, zeros, strict=True):
                p.add_(z, alpha=EPS)

    seeds = iter(range(10_000))
    steppers = {
        kind: MeZOStep(model, tuned, ZOConfig(eps=EPS, kind=kind, cache_z=args.cache_z), run_seed=0)  # type: ignore[arg-type]
        for kind in kinds
    }
    jobs: dict[str, Callable[[], object]] = {
        "two_forward": two_forward,
        "axpy_pass": axpy_pass,
        "published_mezo_hf_loss": lambda: published_step(model, params, batch, next(seeds)),
    }
    for kind, stepper in steppers.items():
        jobs[kind] = lambda s=stepper: s.step(batch, next(seeds), LR)  # type: ignore[misc]
        jobs[f"careful_{kind}"] = lambda k=kind: careful_step(model, params, batch, next(seeds), k)  # type: ignore[misc]
    times = interleaved(jobs, reps)
    med = {name: t["median"] for name, t in times.items()}
    two_forward_s, axpy_pass_s = med["two_forward"], med["axpy_pass"]
    memory = memory_in_subprocess(args.quick, kinds, args.cache_z)
    inference = memory["inference"]

    step_targets = {"gaussian": 1.2, "rademacher": 1.05}
    variants: dict[str, dict[str, object]] = {}
    for kind in kinds:
        zo_step_s = med[kind]
        zo_memory = memory[kind]
        zo_peak, inference_peak = float(zo_memory["peak_mb"]), float(inference["peak_mb"])
        overhead = zo_step_s - two_forward_s
        ratio = zo_step_s / two_forward_s
        target = step_targets.get(kind, 1.2)
        variants[kind] = {
            "kind": kind,
            "cache_z": args.cache_z,
            "cached_tensors": f"{len(steppers[kind].direction.cached)}/{len(params)}",
            "zo_step_s": times[kind],
            "careful_reference_step_s": times[f"careful_{kind}"],
            "step_over_two_forward": round(ratio, 3),
            "speedup_vs_careful_reference": round(med[f"careful_{kind}"] / zo_step_s, 3),
            "speedup_vs_published_mezo_hf_loss": round(med["published_mezo_hf_loss"] / zo_step_s, 3),
            "overhead_s": round(overhead, 4),
            "overhead_over_three_axpy": round(overhead / (3 * axpy_pass_s), 2),
            "zo_peak_mb": round(zo_peak, 1),
            "zo_peak_over_inference": round(zo_peak / inference_peak, 3),
            "targets_met": {
                f"step<={target}x_two_forward": ratio <= target,
                "zo_peak<=1.2x_inference": zo_peak <= 1.2 * inference_peak,
            },
        }

    first = variants[kinds[0]]
    summary = {
        "benchmark": "zo_step",
        "model": "smollm2-135m" + (" (2-layer slice)" if args.quick else ""),
        "batch": f"{BATCH}x{LENGTH}, {ANSWER} answer tokens",
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "num_params": sum(p.numel() for p in params),
        "two_forward_s": times["two_forward"],
        "axpy_pass_s": times["axpy_pass"],
        "published_mezo_hf_loss_step_s": times["published_mezo_hf_loss"],
        "inference_peak_mb": round(float(inference["peak_mb"]), 1),
        "memory_method": inference["method"],
        **{
            k: first[k]
            for k in ("kind", "cache_z", "zo_step_s", "step_over_two_forward", "speedup_vs_careful_reference")
        },
        "zo_peak_mb": first["zo_peak_mb"],
        "variants": variants,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
