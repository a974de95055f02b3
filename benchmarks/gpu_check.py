"""GPU clients: CPU-vs-CUDA direction equality, ZO step and replay times on each device, z transfer costs.

Usage: ``python benchmarks/gpu_check.py [--quick] [--model-dir PATH]`` (``--quick``: the 2-layer SmolLM2
slice, fewer seeds). The last printed line is one JSON object. Times are medians after one warm-up; CUDA
timings synchronize the device before reading the clock.

* ``z_equality``: z of every tuned tensor applied on CUDA (``SeedDirection`` on zero weights, regenerating
  and caching) against the engine's CPU values: Rademacher must be bit-exact, Gaussian within 1e-6.
* ``devices.<cpu|cuda>``: one MeZO step against two forward passes, and :func:`fedtune.zo.replay` of K seeds
  (1/32 of them non-zero, as in a FedKSeed round), per perturbation kind.
* ``z_transfer`` (CUDA): the engine draws z on the CPU and copies it. For Rademacher it copies the packed bits
  (d/8 bytes) and unpacks them on the GPU; the alternative, expanding on the CPU and copying float32 (4d
  bytes), gives the same values and is timed against it. Gaussian z (engine v2: Philox4x32-10 through a
  16-bit table, generated on the CPU) is timed against torch's CUDA ``normal_`` as a bound on on-device
  generation; that one draws other values (``values_equal`` says so), and the engine's are never changed here.
* ``model_dir``: step and replay on a local Hugging Face model folder (``--model-dir``), on CUDA if present.

Without CUDA the CUDA parts are skipped and the JSON says why.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import numpy.typing as npt
import torch
from _timing import interleaved
from transformers import PreTrainedModel
from zo_step import random_batch

from fedtune.assets.models import load_causal_lm
from fedtune.zo import (
    MeZOStep,
    ParamSelection,
    Perturbation,
    SeedDirection,
    TunedParameters,
    ZOConfig,
    answer_loss,
    replay,
    select_parameters,
)
from fedtune.zo.perturbation import expand_signs

KINDS = ("rademacher", "gaussian")
EPS, LR = 1e-3, 1e-6
NO_CUDA = "torch.cuda.is_available() is False"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median seconds of ``fn`` after one warm-up, the device synchronized around each call."""
    fn()
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def coefficients(k: int, nonzero: int) -> npt.NDArray[np.float64]:
    draws = np.random.Generator(np.random.PCG64(np.random.SeedSequence([7, k])))
    dense = np.zeros(k)
    dense[draws.choice(k, nonzero, replace=False)] = draws.normal(0.0, 1e-6, nonzero)
    return dense


def zeros_like_tuned(tuned: TunedParameters, device: torch.device) -> TunedParameters:
    tensors = tuple(
        torch.nn.Parameter(torch.zeros(t.shape, dtype=torch.float32, device=device), requires_grad=False)
        for t in tuned.tensors
    )
    return TunedParameters(tuned.names, tensors)


def z_equality(tuned: TunedParameters, device: torch.device, seeds: tuple[int, ...]) -> dict[str, Any]:
    """z applied on ``device`` (theta = 0 + 1 * z) against the engine's CPU values, every tensor."""
    out: dict[str, Any] = {}
    for kind in KINDS:
        pert = Perturbation(kind=kind, run_seed=0, shapes=tuned.shapes)  # type: ignore[arg-type]
        worst, exact = 0.0, True
        for cache in ("never", "always"):
            target = zeros_like_tuned(tuned, device)
            direction = SeedDirection(target, pert, cache=cache, budget_bytes=0, threads=2)
            for seed in seeds:
                with torch.no_grad():
                    for t in target.tensors:
                        t.zero_()
                direction.reset(seed)
                direction.add_(1.0)
                for position, t in enumerate(target.tensors):
                    expected = pert.materialize(seed, position)
                    got = t.detach().cpu()
                    exact = exact and torch.equal(got, expected)
                    worst = max(worst, float((got - expected).abs().max()))
            del target, direction
        tolerance_ok = exact if kind == "rademacher" else worst <= 1e-6
        out[kind] = {
            "seeds": list(seeds),
            "bit_exact": exact,
            "max_abs_diff": worst,
            "required": "bit-exact" if kind == "rademacher" else "max_abs_diff <= 1e-6",
            "ok": tolerance_ok,
        }
    return out


def step_and_replay(
    model: PreTrainedModel,
    device: torch.device,
    *,
    reps: int,
    ks: tuple[int, ...],
    nonzero_fraction: float,
    threads: int,
) -> dict[str, Any]:
    """Two forwards vs one MeZO step per kind, then replay of K seeds per kind, all on ``device``."""
    model.to(device)  # type: ignore[arg-type]
    tuned = select_parameters(model, ParamSelection())
    batch = random_batch(model.config.vocab_size).to(device)
    peak: dict[str, float] = {}

    def two_forward() -> None:
        with torch.inference_mode():
            answer_loss(model, batch)
            answer_loss(model, batch)

    steppers = {
        kind: MeZOStep(model, tuned, ZOConfig(eps=EPS, kind=kind, threads=threads), run_seed=0)  # type: ignore[arg-type]
        for kind in KINDS
    }
    seeds = iter(range(100_000))

    def job(fn: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            fn()
            sync(device)

        return run

    jobs: dict[str, Callable[[], object]] = {
        "two_forward": job(two_forward),
        **{kind: job(lambda s=s: s.step(batch, next(seeds), LR)) for kind, s in steppers.items()},  # type: ignore[misc]
    }
    times = {name: t["median"] for name, t in interleaved(jobs, reps).items()}
    if device.type == "cuda":
        for name, fn in jobs.items():
            torch.cuda.reset_peak_memory_stats(device)
            fn()
            peak[name] = torch.cuda.max_memory_allocated(device) / 2**20
    steps: dict[str, Any] = {}
    for kind, stepper in steppers.items():
        row: dict[str, Any] = {
            "zo_step_s": round(times[kind], 4),
            "step_over_two_forward": round(times[kind] / times["two_forward"], 3),
            "cached_tensors": f"{len(stepper.direction.cached)}/{len(tuned.tensors)}",
        }
        if peak:
            row["cuda_peak_mb"] = round(peak[kind], 1)
            row["cuda_peak_over_inference"] = round(peak[kind] / peak["two_forward"], 3)
        steps[kind] = row
    del steppers

    weights = [t.detach().clone() for t in tuned.tensors]
    replays: dict[str, Any] = {}
    for kind in KINDS:
        pert = Perturbation(kind=kind, run_seed=0, shapes=tuned.shapes)  # type: ignore[arg-type]
        replay(tuned, pert, coefficients(8, 1), threads=threads)  # warm-up (buffers, LUT)
        for k in ks:
            dense = coefficients(k, max(1, int(k * nonzero_fraction)))
            sync(device)
            start = time.perf_counter()
            applied = replay(tuned, pert, dense, threads=threads)
            sync(device)
            replay_s = time.perf_counter() - start
            replays[f"{kind}_K{k}"] = {
                "K": k,
                "nonzero_seeds": applied,
                "replay_s": round(replay_s, 4),
                "replay_s_per_seed": round(replay_s / applied, 5),
            }
        with torch.no_grad():
            for t, w in zip(tuned.tensors, weights, strict=True):
                t.copy_(w)
    return {
        "device": str(device),
        "num_params": tuned.numel,
        "two_forward_s": round(times["two_forward"], 4),
        **({"cuda_inference_peak_mb": round(peak["two_forward"], 1)} if peak else {}),
        "zo_step": steps,
        "replay": replays,
    }


def z_transfer(tuned: TunedParameters, device: torch.device, reps: int) -> dict[str, Any]:
    """One pass over the tuned tensors: the engine's way of getting z onto the GPU, and the alternatives."""
    numels = [t.numel() for t in tuned.tensors]
    rad = Perturbation(kind="rademacher", run_seed=0, shapes=tuned.shapes)
    gau = Perturbation(kind="gaussian", run_seed=0, shapes=tuned.shapes)
    largest = max(numels)
    cpu_buf = torch.empty(largest, dtype=torch.float32)
    gpu_buf = torch.empty(largest, dtype=torch.float32, device=device)
    cuda_gen = torch.Generator(device=device)
    seed = 3

    def packed_cpu() -> None:  # PCG64 on the CPU only: the part no transfer strategy avoids
        for p in range(len(numels)):
            rad.packed_signs(seed, p)

    def packed_copy_unpack_gpu() -> None:  # the engine: d/8 bytes over PCIe, LUT expansion on the GPU
        for p, n in enumerate(numels):
            gpu_buf[:n].copy_(expand_signs(rad.packed_signs(seed, p).to(device), n))

    def expand_cpu_copy() -> None:  # the alternative: expand to float32 on the CPU, copy 4d bytes
        for p, n in enumerate(numels):
            gpu_buf[:n].copy_(expand_signs(rad.packed_signs(seed, p), n))

    def gaussian_cpu_copy() -> None:  # the engine: Philox and table on the CPU, copy 4d bytes
        for p, n in enumerate(numels):
            gpu_buf[:n].copy_(gau.fill_gaussian(seed, p, cpu_buf))

    def gaussian_on_gpu() -> None:  # torch's CUDA normal_: fast, but other values
        for p, n in enumerate(numels):
            cuda_gen.manual_seed(seed * len(numels) + p)
            gpu_buf[:n].normal_(generator=cuda_gen)

    # Values of the alternatives, checked on one tensor against the engine's CPU values.
    p0, n0 = 0, numels[0]
    rad_alt_equal = torch.equal(
        expand_signs(rad.packed_signs(seed, p0).to(device), n0).cpu(), rad.materialize(seed, p0).view(-1)
    )
    cuda_gen.manual_seed(seed * len(numels) + p0)
    on_gpu = torch.empty(n0, dtype=torch.float32, device=device).normal_(generator=cuda_gen).cpu()
    gau_alt_equal = torch.equal(on_gpu, gau.materialize(seed, p0).view(-1))
    t = {
        name: timed(fn, device, reps)
        for name, fn in {
            "packed_cpu": packed_cpu,
            "packed_copy_unpack_gpu": packed_copy_unpack_gpu,
            "expand_cpu_copy": expand_cpu_copy,
            "gaussian_cpu_copy": gaussian_cpu_copy,
            "gaussian_on_gpu": gaussian_on_gpu,
        }.items()
    }
    faster = (
        "packed_copy_unpack_gpu" if t["packed_copy_unpack_gpu"] <= t["expand_cpu_copy"] else "expand_cpu_copy"
    )
    return {
        "num_params": sum(numels),
        "rademacher": {
            "engine": "packed_copy_unpack_gpu",
            "cpu_pcg64_s": round(t["packed_cpu"], 4),
            "packed_copy_unpack_gpu_s": round(t["packed_copy_unpack_gpu"], 4),
            "expand_cpu_copy_s": round(t["expand_cpu_copy"], 4),
            "bytes_copied_engine": sum((n + 7) // 8 for n in numels),
            "bytes_copied_alternative": 4 * sum(numels),
            "alternative_values_equal": rad_alt_equal,
            "faster": faster,
        },
        "gaussian": {
            "engine": "gaussian_cpu_copy",
            "cpu_generate_copy_s": round(t["gaussian_cpu_copy"], 4),
            "on_gpu_philox_s": round(t["gaussian_on_gpu"], 4),
            "on_gpu_values_equal": gau_alt_equal,
            "note": "torch's CUDA normal_ draws other values than the engine; a speed bound only"
            if not gau_alt_equal
            else "the CUDA generator matched on this tensor",
        },
    }


def load(name: str, num_layers: int | None) -> PreTrainedModel:
    return load_causal_lm(name, num_layers=num_layers)


def run(
    *,
    quick: bool,
    model_dir: str | None = None,
    num_layers: int | None = None,
    reps: int | None = None,
    threads: int = 2,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    layers = num_layers if num_layers is not None else (2 if quick else None)
    reps = reps or (2 if quick else 3)
    ks = (256,) if quick else (1024, 4096)
    cuda = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    skipped: dict[str, str] = {}
    model = load("smollm2-135m", layers)
    label = "smollm2-135m" + (f" ({layers}-layer slice)" if layers else "")
    result: dict[str, Any] = {
        "benchmark": "gpu_check",
        "quick": quick,
        "model": label,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": cuda is not None,
        "gpu": torch.cuda.get_device_name(cuda) if cuda is not None else None,
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    tuned_cpu = select_parameters(model, ParamSelection())
    if cuda is None:
        skipped["z_equality"] = skipped["z_transfer"] = skipped["devices.cuda"] = NO_CUDA
        result["z_equality"] = {"skipped": NO_CUDA}
        result["z_transfer"] = {"skipped": NO_CUDA}
    else:
        result["z_equality"] = z_equality(tuned_cpu, cuda, seeds=(0, 4095) if quick else (0, 17, 4095))
        result["z_transfer"] = z_transfer(tuned_cpu, cuda, reps)
    devices: dict[str, Any] = {}
    # On a GPU machine the CPU figures come from a copy (the CUDA run moves the model).
    cpu_model = copy.deepcopy(model) if cuda is not None else model
    # With a GPU the CPU is only the reference: its smallest K keeps the full run under 5 minutes.
    devices["cpu"] = step_and_replay(
        cpu_model,
        torch.device("cpu"),
        reps=reps,
        ks=ks if cuda is None else ks[:1],
        nonzero_fraction=1 / 32,
        threads=threads,
    )
    del cpu_model
    if cuda is None:
        devices["cuda"] = {"skipped": NO_CUDA}
    else:
        devices["cuda"] = step_and_replay(
            model, cuda, reps=reps, ks=ks, nonzero_fraction=1 / 32, threads=threads
        )
        devices["cuda"]["step_speedup_vs_cpu"] = {
            kind: round(devices["cpu"]["zo_step"][kind]["zo_step_s"] / row["zo_step_s"], 2)
            for kind, row in devices["cuda"]["zo_step"].items()
        }
    result["devices"] = devices
    del model
    if model_dir is None:
        skipped["model_dir"] = "no --model-dir given"
        result["model_dir"] = {"skipped": "no --model-dir given"}
    else:
        device = cuda if cuda is not None else torch.device("cpu")
        other = load(model_dir, num_layers)
        result["model_dir"] = {
            "path": str(Path(model_dir).resolve()),
            **step_and_replay(
                other,
                device,
                reps=reps,
                ks=(256,) if quick else (1024,),
                nonzero_fraction=1 / 32,
                threads=threads,
            ),
        }
        del other
    # None when there was no GPU to compare against: equality was not checked, so it is not claimed.
    result["z_equal_ok"] = None if cuda is None else all(row["ok"] for row in result["z_equality"].values())
    result["skipped"] = skipped
    result["elapsed_s"] = round(time.perf_counter() - t0, 1)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2-layer slice, K = 256, 2 repetitions")
    parser.add_argument("--model-dir", default=None, help="also time a local Hugging Face model folder")
    parser.add_argument(
        "--num-layers",
        type=int,
        default=None,
        help="keep the first N layers (default: 2 with --quick, all otherwise)",
    )
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 2 quick, 3 full)")
    parser.add_argument("--threads", type=int, default=2, help="engine worker threads")
    args = parser.parse_args(argv)
    result = run(
        quick=args.quick,
        model_dir=args.model_dir,
        num_layers=args.num_layers,
        reps=args.reps,
        threads=args.threads,
    )
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
