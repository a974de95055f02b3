"""In-place axpy kernels over tuned tensors: theta += alpha * z without materializing z for the whole model.

Sign vectors are expanded from packed bits through a 256-entry lookup table one cache-sized chunk at a
time, so a Rademacher pass costs little more than a plain ``add_`` pass (on CPU a compiled kernel,
:func:`.sign_jit.sign_axpy_`, does it in one pass). Work over tensors is spread over a
few Python threads (torch releases the GIL), each owning its scratch buffers, so nothing mutable is shared.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from fedtune.zo.perturbation import sign_lut
from fedtune.zo.sign_jit import sign_axpy_

CPU_CHUNK = 1 << 18
"""Elements expanded per chunk on CPU (1 MiB of float32: stays in L2 between expansion and add)."""
CUDA_CHUNK = 1 << 22
"""Elements per chunk on accelerators, where cache residency matters less than launch count."""


class SignWorkspace:
    """Scratch for applying packed +-1 directions on one device; one per worker thread."""

    def __init__(self, device: torch.device) -> None:
        self.chunk = CPU_CHUNK if device.type == "cpu" else CUDA_CHUNK
        self.lut = sign_lut(device)
        self.index = torch.empty(self.chunk // 8, dtype=torch.int32, device=device)
        self.values = torch.empty(self.chunk // 8, 8, dtype=torch.float32, device=device)

    @property
    def nbytes(self) -> int:
        return self.index.numel() * 4 + self.values.numel() * 4

    def axpy_(self, target: torch.Tensor, packed: torch.Tensor, alpha: float) -> None:
        """``target += alpha * signs(packed)`` for a flat float32 ``target`` on the workspace device."""
        if target.device.type == "cpu":  # compiled one-pass kernel, the same values as the torch ops below
            sign_axpy_(target.numpy(), packed.numpy(), alpha)
            return
        n = target.numel()
        for start in range(0, n, self.chunk):
            stop = min(n, start + self.chunk)
            n_bytes = (stop - start + 7) // 8
            index = self.index[:n_bytes]
            index.copy_(packed[start // 8 : start // 8 + n_bytes])
            values = self.values[:n_bytes]
            torch.index_select(self.lut, 0, index, out=values)
            target[start:stop].add_(values.view(-1)[: stop - start], alpha=alpha)


def flat_view(tensor: torch.Tensor) -> torch.Tensor:
    """The 1-D view of a tuned tensor that kernels write through (no copy)."""
    return tensor.detach().view(-1)


def balanced_groups(numels: Sequence[int], groups: int) -> list[list[int]]:
    """Split positions into at most ``groups`` lists of similar total size (longest-first greedy).

    Each list keeps increasing position order so a worker walks memory in model order.
    """
    groups = max(1, min(groups, len(numels)))
    heap = [(0, g) for g in range(groups)]
    out: list[list[int]] = [[] for _ in range(groups)]
    for position in sorted(range(len(numels)), key=lambda p: (-numels[p], p)):
        load, g = heapq.heappop(heap)
        out[g].append(position)
        heapq.heappush(heap, (load + numels[position], g))
    return [sorted(group) for group in out if group]


def run_groups(groups: Sequence[Sequence[int]], work: Callable[[int, Sequence[int]], None]) -> None:
    """Run ``work(group_id, positions)`` for every group, each in its own worker thread.

    A single group also runs in a worker: issued from the main thread, the many small chunked ops each open
    an OpenMP parallel region, and on a loaded 2-core machine every region waits for a time slice (measured:
    128 chunked adds took 1 s from the main thread, 0.02 s from a worker). Every worker runs under
    ``torch.inference_mode`` itself: grad mode is thread-local, and in-place updates of inference tensors
    (e.g. weights replaced inside inference mode) are only legal there. Torch's thread count is process-wide,
    so nothing else in the process should run torch ops while the workers do (the engine is sequential).
    """

    def guarded(group: int, positions: Sequence[int]) -> None:
        with torch.inference_mode():
            work(group, positions)

    # With several workers each already owns a core: torch's intra-op threads on top oversubscribe them
    # (measured: a 32-seed replay took 3.1 s with 2 torch threads per worker, 2.2 s with 1).
    threads = torch.get_num_threads()
    if len(groups) > 1:
        torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=len(groups), thread_name_prefix="fedtune-zo") as pool:
            futures = [pool.submit(guarded, g, positions) for g, positions in enumerate(groups)]
            for future in futures:
                future.result()  # re-raise the first worker error in the caller
    finally:
        torch.set_num_threads(threads)
