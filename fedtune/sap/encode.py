"""What a client does to a batch before anything leaves it: bottom, d_chi noise (CTI etas), snapping.

Used by the client for training and inference, by the server to score its own held-out split the
way an inference client would send it, and by the privacy benchmark, so all three privatize
identically.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from fedtune.sap.batches import SplitBatch
from fedtune.sap.cti import ContributingTokens
from fedtune.sap.privatizer import DChiPrivatizer, NoiseStats, snap_to_vocab
from fedtune.sap.split import Bottom


@dataclass(frozen=True)
class Encoded:
    """What crosses the wire for one batch: representations (or token ids), and the noise stats."""

    inputs: torch.Tensor  # B x S x d float32, or B x S int64 (text-level variant)
    stats: NoiseStats

    def wire(self, dtype: str) -> npt.NDArray[np.generic]:
        if self.inputs.dtype == torch.long:
            return self.inputs.numpy().astype("<i8")
        return self.inputs.numpy().astype("<f2" if dtype == "float16" else "<f4")


class ClientEncoder:
    """Bottom -> privatizer (per-token eta from CTI when fitted) -> optional snap to vocabulary."""

    def __init__(
        self,
        bottom: Bottom,
        privatizer: DChiPrivatizer | None,
        cti: ContributingTokens | None = None,
        *,
        text: bool = False,
    ) -> None:
        if cti is not None and privatizer is None:
            raise ValueError("CTI sets per-token noise levels; it needs a privatizer")
        if text and privatizer is None:
            raise ValueError("the text-level variant snaps noised embeddings; it needs a privatizer")
        self.bottom, self.privatizer, self.cti, self.text = bottom, privatizer, cti, text

    def __call__(self, batch: SplitBatch, *, labelled: bool) -> Encoded:
        """``labelled``: training (each token's eta from its example's class); else max over classes."""
        ids, mask = batch.input_ids, batch.attention_mask
        h = self.bottom(ids, mask)
        if self.privatizer is None:
            keep = mask.bool()
            norms = h[keep].norm(dim=-1)
            stats = NoiseStats(int(keep.sum()), float(norms.mean()) if norms.numel() else 0.0, 0.0)
            return Encoded(h, stats)
        etas = None
        if self.cti is not None:
            etas = self.cti.etas(ids, batch.groups if labelled else None)
        noised, stats = self.privatizer(h, mask, etas)
        if self.text:
            return Encoded(snap_to_vocab(noised, self.bottom.embedding_matrix, mask, ids), stats)
        return Encoded(noised, stats)
