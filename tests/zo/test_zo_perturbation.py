from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from fedtune.zo.fingerprint import Fingerprint
from fedtune.zo.perturbation import ENGINE_VERSION, MAX_SEED_INDEX, Perturbation, expand_signs

SHAPES = ((300, 70), (513,), (7, 3, 5))


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_directions_are_deterministic_and_keyed(kind: str) -> None:
    a = Perturbation(kind=kind, run_seed=11, shapes=SHAPES)  # type: ignore[arg-type]
    b = Perturbation(kind=kind, run_seed=11, shapes=SHAPES)  # type: ignore[arg-type]
    other_run = Perturbation(kind=kind, run_seed=12, shapes=SHAPES)  # type: ignore[arg-type]
    z = a.materialize(5, 0)
    assert z.shape == (300, 70) and z.dtype == torch.float32
    assert torch.equal(z, b.materialize(5, 0))
    assert not torch.equal(z, a.materialize(6, 0))
    assert not torch.equal(z, other_run.materialize(5, 0))
    assert not torch.equal(a.materialize(5, 1)[:100], z.reshape(-1)[:100])


def test_value_distributions() -> None:
    gauss = Perturbation(kind="gaussian", run_seed=0, shapes=SHAPES).materialize(1, 0)
    signs = Perturbation(kind="rademacher", run_seed=0, shapes=SHAPES).materialize(1, 0)
    assert abs(float(gauss.mean())) < 0.02 and abs(float(gauss.std()) - 1.0) < 0.02
    assert set(torch.unique(signs).tolist()) == {-1.0, 1.0}
    assert abs(float(signs.mean())) < 0.02


def test_rademacher_bit_layout_is_little_endian_pcg64() -> None:
    pert = Perturbation(kind="rademacher", run_seed=3, shapes=SHAPES)
    packed = pert.packed_signs(9, 2)
    assert packed.dtype == torch.uint8 and packed.numel() == (105 + 7) // 8
    bits = np.unpackbits(packed.numpy(), bitorder="little")[:105]
    assert np.array_equal(pert.materialize(9, 2).reshape(-1).numpy(), bits * 2.0 - 1.0)
    assert torch.equal(expand_signs(packed, 105), pert.materialize(9, 2).reshape(-1))


def test_gaussian_values_do_not_depend_on_the_buffer() -> None:
    pert = Perturbation(kind="gaussian", run_seed=3, shapes=SHAPES)
    big = torch.full((50_000,), 7.0)
    filled = pert.fill_gaussian(4, 1, big)
    assert torch.equal(filled, pert.materialize(4, 1))
    assert torch.all(big[513:] == 7.0)


def test_gaussian_directions_differ_for_every_seed_and_tensor() -> None:
    # Each (seed, tensor) is its own Philox counter, so even the extreme seed indices give new values.
    pert = Perturbation(kind="gaussian", run_seed=123, shapes=((8,),) * 16)
    seeds = [*range(0, MAX_SEED_INDEX, 9973), MAX_SEED_INDEX - 1]
    firsts = {pert.materialize(s, p).numpy().tobytes() for s in seeds for p in range(16)}
    assert len(firsts) == len(seeds) * 16


_CHILD = (
    "from fedtune.zo.fingerprint import Fingerprint; import sys; "
    "f = Fingerprint.from_json(sys.stdin.read()); print(f.z_checksum(77))"
)


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_two_processes_produce_the_same_checksum(kind: str) -> None:
    fingerprint = Fingerprint(("a", "b", "c"), SHAPES, "x", kind, ENGINE_VERSION, "g", 21_618, 5)  # type: ignore[arg-type]
    done = subprocess.run(
        [sys.executable, "-c", _CHILD],
        input=fingerprint.to_json(),
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip() == fingerprint.z_checksum(77)
    assert fingerprint.z_checksum(77) != fingerprint.z_checksum(78)


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_concurrent_generation_equals_sequential(kind: str) -> None:
    pert = Perturbation(kind=kind, run_seed=8, shapes=((400, 500),) * 4)  # type: ignore[arg-type]
    keys = [(s, p) for s in range(3) for p in range(4)]
    sequential = [pert.materialize(s, p) for s, p in keys]
    results: dict[int, list[torch.Tensor]] = {}

    def work(worker: int) -> None:
        results[worker] = [pert.materialize(s, p) for s, p in keys]

    threads = [threading.Thread(target=work, args=(w,)) for w in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for worker in range(2):
        assert all(torch.equal(x, y) for x, y in zip(results[worker], sequential, strict=True))


def test_global_rng_untouched_by_generation() -> None:
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    for kind in ("gaussian", "rademacher"):
        Perturbation(kind=kind, run_seed=1, shapes=SHAPES).materialize(0, 0)  # type: ignore[arg-type]
    assert torch.equal(torch_state, torch.get_rng_state())
    assert all(np.array_equal(a, b) for a, b in zip(np_state, np.random.get_state(), strict=True))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "uniform"}, "kind must be one of"),
        ({"run_seed": -1}, "run_seed must be in"),
        ({"run_seed": 1.5}, "run_seed must be an int"),
        ({"shapes": ()}, "shapes is empty"),
        ({"shapes": ((2,),) * 5000}, "exceed the engine limit"),
    ],
)
def test_perturbation_validation(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"kind": "gaussian", "run_seed": 0, "shapes": SHAPES, **kwargs}
    with pytest.raises(ValueError, match=message):
        Perturbation(**args)  # type: ignore[arg-type]


def test_index_and_kind_errors() -> None:
    pert = Perturbation(kind="gaussian", run_seed=0, shapes=SHAPES)
    with pytest.raises(ValueError, match="seed_index must be in"):
        pert.materialize(MAX_SEED_INDEX, 0)
    with pytest.raises(ValueError, match="position must be in"):
        pert.materialize(0, 3)
    with pytest.raises(ValueError, match="needs kind='rademacher'"):
        pert.packed_signs(0, 0)
    with pytest.raises(ValueError, match="holds 10 elements"):
        pert.fill_gaussian(0, 1, torch.empty(10))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_cuda_parameters_see_the_cpu_directions(kind: str) -> None:
    from fedtune.zo.directions import SeedDirection
    from fedtune.zo.params import TunedParameters

    pert = Perturbation(kind=kind, run_seed=2, shapes=((1000, 37), (5,)))  # type: ignore[arg-type]
    tensors = tuple(
        torch.nn.Parameter(torch.zeros(s, device="cuda"), requires_grad=False) for s in pert.shapes
    )
    direction = SeedDirection(
        TunedParameters(("w", "b"), tensors), pert, cache="never", budget_bytes=0, threads=1
    )
    direction.reset(4)
    direction.add_(1.0)
    for position, tensor in enumerate(tensors):
        assert torch.equal(tensor.cpu(), pert.materialize(4, position))
