"""The tokenized batch that every training and evaluation loop consumes."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenBatch:
    """A right-padded batch for causal-LM training.

    ``labels`` equals ``input_ids`` on answer tokens and is -100 on prompt and padding tokens, so
    the loss covers only what the model must produce.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        shapes = {self.input_ids.shape, self.attention_mask.shape, self.labels.shape}
        if len(shapes) != 1 or self.input_ids.dim() != 2:
            raise ValueError(
                "input_ids, attention_mask and labels must share one 2-D shape (batch, length); got "
                f"{[tuple(t.shape) for t in (self.input_ids, self.attention_mask, self.labels)]}"
            )

    @property
    def num_answer_tokens(self) -> int:
        return int((self.labels != -100).sum())

    def to(self, device: torch.device | str) -> TokenBatch:
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))
