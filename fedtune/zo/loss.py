"""The training objective of a zeroth-order step: mean cross-entropy over answer tokens.

It equals Hugging Face's causal-LM loss (``model(..., labels=labels).loss``) but applies ``lm_head`` only at
positions whose next token is an answer token. On SmolLM2 (49k vocabulary) the full-vocabulary logits at every
position are a large share of the forward cost, and a two-point step pays it twice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedtune.data.batch import TokenBatch

IGNORE_INDEX = -100

# Config attributes that rescale logits after lm_head; models with them take the generic path.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling")


def _split_head(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """(decoder, lm_head) when the model is a plain decoder followed by a linear head, else None."""
    get_decoder = getattr(model, "get_decoder", None)
    get_head = getattr(model, "get_output_embeddings", None)
    if not callable(get_decoder) or not callable(get_head):
        return None
    config = getattr(model, "config", None)
    if any(getattr(config, attr, None) not in (None, 1, 1.0) for attr in _LOGIT_TRANSFORMS):
        return None
    try:
        decoder, head = get_decoder(), get_head()
    except (AttributeError, NotImplementedError):
        return None
    if decoder is None or decoder is model or type(head) is not nn.Linear:
        return None
    return decoder, head


def _answer_logits(model: nn.Module, batch: TokenBatch, keep: torch.Tensor) -> torch.Tensor:
    """Logits at the kept (answer) positions only: the LM head runs on those rows where it splits off."""
    split = _split_head(model)
    if split is None:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        selected: torch.Tensor = logits[:, :-1][keep]
        return selected
    decoder, head = split
    out = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    kept: torch.Tensor = head(hidden[:, :-1][keep])
    return kept


def answer_loss(model: nn.Module, batch: TokenBatch) -> torch.Tensor:
    """Float32 scalar: mean next-token cross-entropy over positions whose label is not -100.

    Raises
    ------
    ValueError
        If the batch has no answer token after the first position (the mean would be 0/0).
    """
    device = next(model.parameters()).device
    batch = batch.to(device)
    targets = batch.labels[:, 1:]
    keep = targets != IGNORE_INDEX
    if not bool(keep.any()):
        raise ValueError("batch has no answer tokens (every label after position 0 is -100)")
    selected = _answer_logits(model, batch, keep)
    return F.cross_entropy(selected.float(), targets[keep], reduction="mean")


def answer_loss_sums(model: nn.Module, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example: the summed next-token cross-entropy over its answer tokens (float32) and their count.

    One forward pass gives both evaluation means: token-weighted (``sums.sum() / counts.sum()``, what
    :func:`answer_loss` computes) and per-example (the mean of ``sums / counts``, the reference
    FedKSeed code's), without the full-vocabulary logits where the head can be split off.
    """
    device = next(model.parameters()).device
    batch = batch.to(device)
    targets = batch.labels[:, 1:]
    keep = targets != IGNORE_INDEX
    counts = keep.sum(dim=1)
    sums = torch.zeros(targets.shape[0], dtype=torch.float32, device=device)
    if not bool(keep.any()):
        return sums, counts
    selected = _answer_logits(model, batch, keep)
    losses = F.cross_entropy(selected.float(), targets[keep], reduction="none")
    rows = keep.nonzero()[:, 0]  # row of each kept position, in the (row-major) order of the mask
    return sums.index_add_(0, rows, losses), counts


def answer_loss_per_example(model: nn.Module, batch: TokenBatch) -> torch.Tensor:
    """Float32 ``(B,)``: each example's mean cross-entropy over its own answer tokens (0 for none).

    The per-example losses DP-ZO clips (Tang et al. 2024): one example's influence on a released
    two-point scalar is bounded only if each example's loss is computed on its own.
    """
    sums, counts = answer_loss_sums(model, batch)
    return sums / counts.clamp(min=1).to(sums.dtype)
