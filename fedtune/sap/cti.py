"""Contributing-token identification (CTI): per-token privacy budgets for classification, as in the vendor
SDK of SAP (Shen et al. 2023, arXiv:2312.15603).

Uniform noise hurts most on the few tokens that decide the label. CTI scores how indicative each token is of a
class and gives such tokens a larger d_chi budget eta (less noise; Feyisetan et al. 2020, "Privacy- and
Utility-Preserving Textual Analysis via Calibrated Multivariate Perturbations"), every other token the floor.

Privacy: the table is computed from private labels and token counts, so each client fits it on its own data
only and it never leaves the client. Those raised budgets also mean the label-revealing tokens are the least
protected ones; that is the utility/privacy trade CTI makes.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True, eq=False)
class ContributingTokens:
    """Per-class, per-token etas for d_chi privatization.

    With N_c(t) the count of token t in examples of class c, p_c(t) = N_c(t) / sum_t N_c(t) and
    xi = 1 / max_c sum_t N_c(t) (a smoothing term of about one occurrence in the largest class):

    - UI_c(t) = sum_{k != c} ln( p_c(t) / (p_k(t) + 3 xi) ) if N_c(t) > 0, else 0;
    - eta_c(t) = max(UI_c(t), floor) * eta_base.

    Training tokens use the eta of their example's label; unlabeled (inference) text uses max_c eta_c(t), as
    the label is unknown. A class with no tokens on this client has p_c = 0 (non-IID clients often lack one).
    Fitted by each client on its own data only; the table depends on private labels and never leaves it.
    ``eq=False``: instances compare by identity (compare ``table`` with ``np.array_equal``).
    """

    table: np.ndarray  # (num_classes, vocab_size) float64 etas, read-only
    eta_base: float

    def __post_init__(self) -> None:
        if not isinstance(self.table, np.ndarray) or self.table.ndim != 2:
            raise ValueError("table must be a 2-D (num_classes, vocab_size) array")
        if self.table.shape[0] < 2 or self.table.shape[1] < 1:
            raise ValueError(f"table must have >= 2 classes and >= 1 token, got shape {self.table.shape}")
        table = np.array(self.table, dtype=np.float64, copy=True)
        if not np.isfinite(table).all() or (table <= 0).any():
            raise ValueError("table etas must be finite and > 0")
        if not _positive_finite(self.eta_base):
            raise ValueError(f"eta_base must be finite and > 0, got {self.eta_base!r}")
        table.setflags(write=False)
        object.__setattr__(self, "table", table)
        object.__setattr__(self, "eta_base", float(self.eta_base))

    @property
    def num_classes(self) -> int:
        return int(self.table.shape[0])

    @property
    def vocab_size(self) -> int:
        return int(self.table.shape[1])

    @classmethod
    def fit(
        cls,
        token_ids: Sequence[Sequence[int]],
        labels: Sequence[int],
        *,
        num_classes: int,
        vocab_size: int,
        eta_base: float,
        floor: float = 0.6,
        ignore_ids: Collection[int] = (),
    ) -> ContributingTokens:
        """Count tokens per class over ``token_ids`` (one sequence per example) and build the eta table.

        ``ignore_ids`` (pad, special tokens) are dropped before counting and may lie outside the vocabulary.
        Deterministic: no randomness.
        """
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size must be an int >= 1, got {vocab_size!r}")
        if not _positive_finite(eta_base):
            raise ValueError(f"eta_base must be finite and > 0, got {eta_base!r}")
        if not _positive_finite(floor):
            raise ValueError(f"floor must be finite and > 0 (it keeps every eta positive), got {floor!r}")
        if len(token_ids) != len(labels):
            raise ValueError(f"token_ids has {len(token_ids)} examples but labels has {len(labels)}")
        if len(labels) == 0:
            raise ValueError("no examples to fit on")

        label_arr = _int_array(labels, "labels")
        if label_arr.ndim != 1:
            raise ValueError("labels must be a flat sequence of ints, one per example")
        if label_arr.min() < 0 or label_arr.max() >= num_classes:
            bad = label_arr[(label_arr < 0) | (label_arr >= num_classes)][0]
            raise ValueError(f"labels must lie in [0, {num_classes}), got {bad}")
        examples = [_int_array(ids, f"token_ids[{i}]").reshape(-1) for i, ids in enumerate(token_ids)]
        lengths = np.array([e.size for e in examples], dtype=np.int64)
        flat = np.concatenate(examples) if examples else np.empty(0, dtype=np.int64)
        owner = np.repeat(label_arr, lengths)
        if ignore_ids:
            keep = ~np.isin(flat, np.fromiter(ignore_ids, dtype=np.int64, count=len(ignore_ids)))
            flat, owner = flat[keep], owner[keep]
        if flat.size == 0:
            raise ValueError("no tokens to count (all examples empty or ignored)")
        if flat.min() < 0 or flat.max() >= vocab_size:
            bad = flat[(flat < 0) | (flat >= vocab_size)][0]
            raise ValueError(f"token ids must lie in [0, {vocab_size}) (or be in ignore_ids), got {bad}")

        counts = np.bincount(owner * vocab_size + flat, minlength=num_classes * vocab_size)
        return cls(
            table=_eta_table(counts.reshape(num_classes, vocab_size), eta_base, floor), eta_base=eta_base
        )

    def etas(self, input_ids: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """(B, S) float32 etas for ``input_ids`` (B, S): by each example's label (B,), or the max over classes
        when ``labels`` is None (inference). On ``input_ids``' device."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
            raise ValueError("input_ids must be a (B, S) tensor")
        if input_ids.is_floating_point() or input_ids.is_complex():
            raise ValueError(f"input_ids must be integer, got {input_ids.dtype}")
        ids = input_ids.detach().cpu().to(torch.int64).numpy()
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"input_ids must lie in [0, {self.vocab_size})")
        if labels is None:
            result = self.table.max(axis=0)[ids]
        else:
            if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != (ids.shape[0],):
                raise ValueError(f"labels must be a ({ids.shape[0]},) tensor or None")
            if labels.is_floating_point() or labels.is_complex():
                raise ValueError(f"labels must be integer, got {labels.dtype}")
            lab = labels.detach().cpu().to(torch.int64).numpy()
            if lab.size and (lab.min() < 0 or lab.max() >= self.num_classes):
                raise ValueError(f"labels must lie in [0, {self.num_classes})")
            result = self.table[lab[:, None], ids]
        return torch.from_numpy(result.astype(np.float32)).to(input_ids.device)


def _eta_table(counts: np.ndarray, eta_base: float, floor: float) -> np.ndarray:
    """The formula of ``ContributingTokens`` on a (C, V) count matrix, vectorized over classes and tokens."""
    num_classes = counts.shape[0]
    totals = counts.sum(axis=1)
    xi = 1.0 / float(totals.max())
    p = counts / np.maximum(totals, 1)[:, None]  # a class without tokens has p = 0
    smoothed = np.log(p + 3.0 * xi)  # ln(p_k(t) + 3 xi), finite
    present = counts > 0
    log_p = np.log(p, out=np.zeros_like(p), where=present)
    # sum over k != c of (ln p_c - ln(p_k + 3 xi)) = (C - 1) ln p_c - (sum_k smoothed_k - smoothed_c)
    ui = (num_classes - 1) * log_p - (smoothed.sum(axis=0)[None, :] - smoothed)
    ui = np.where(present, ui, 0.0)
    result: np.ndarray = np.maximum(ui, floor) * eta_base
    return result


def _positive_finite(x: object) -> bool:
    return not isinstance(x, bool) and isinstance(x, int | float) and math.isfinite(x) and x > 0


def _int_array(values: object, what: str) -> np.ndarray:
    arr = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    if arr.size == 0:
        return arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{what} must hold ints, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)
