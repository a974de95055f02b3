"""Token-recovery attacks on split-and-privatize (SAP) representations, to measure empirical privacy.

SAP (Shen et al. 2023, arXiv:2312.15603) sends the server the privatized output of the bottom of a
language model. The server is honest but curious, so the privacy that counts is what its best
attack can undo: *empirical privacy = 1 - token recovery rate*, scored on held-out text that the
attacker never trained on. The attacks here follow embedding inversion (Song & Raghunathan 2020,
"Information Leakage in Embedding Models"):

* :func:`knn_inversion` (EIA-KNN): the nearest vocabulary embedding; optimal-ish for an
  embedding-layer split, useless once blocks have mixed the tokens.
* :class:`LearnedInversion` (EIA-learned): an MLP trained on public text run through the
  attacker's own copy of the (public) bottom model and the (public) noise mechanism.
* :class:`MaskedLMInversion`: reads the text-level variant (privatized token ids) with a small
  masked-LM-style encoder that uses context to undo the substitutions.

The model pieces come in as callables (:data:`Bottom`, :data:`Privatize`) so this module does not
depend on how the bottom model or the privatizer are built.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, BertConfig, BertForMaskedLM, PreTrainedTokenizerBase

from fedtune.assets.models import load_encoder, resolve_model_dir

__all__ = [
    "AttackResult",
    "Bottom",
    "LearnedInversion",
    "MaskedLMInversion",
    "Privatize",
    "PrivatizeIds",
    "evaluate_attack",
    "knn_inversion",
    "public_text_batches",
    "recovery_rate",
    "scored_mask",
]

Bottom = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(input_ids B x S, attention_mask B x S) -> representations B x S x d`` (no grad)."""
Privatize = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(representations, attention_mask) -> privatized representations`` (same shape)."""
PrivatizeIds = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(input_ids, attention_mask) -> privatized input ids`` (the text-level variant)."""

# Purpose tags mixed into the seeds so the attackers' init streams never collide with other seeded uses.
_MLP_INIT_TAG = 0x45494D4C  # "EIML"
_MLM_INIT_TAG = 0x45494D4D  # "EIMM"
_IGNORE = -100  # cross_entropy's ignore_index


def _generator(seed: int, tag: int) -> torch.Generator:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0; got {seed!r}")
    state = np.random.SeedSequence([seed, tag]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _check_steps(steps: int, lr: float) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1; got {steps!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0; got {lr!r}")


def _as_batches(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = list(batches)
    if not out:
        raise ValueError("No training batches: pass at least one (input_ids, attention_mask) pair")
    return out


def recovery_rate(predicted: torch.Tensor, original: torch.Tensor, mask: torch.Tensor) -> float:
    """Fraction of scored positions (``mask`` nonzero) where the attack got the token right.

    ``mask`` should exclude pads and special tokens (see :func:`scored_mask`): those are known to
    the attacker anyway and would inflate the rate.
    """
    if predicted.shape != original.shape or mask.shape != original.shape:
        raise ValueError(
            "predicted, original and mask must have the same shape; got "
            f"{tuple(predicted.shape)}, {tuple(original.shape)}, {tuple(mask.shape)}"
        )
    scored = mask.bool()
    total = int(scored.sum())
    if total == 0:
        raise ValueError("mask selects no positions; score at least one non-pad, non-special token")
    return int(((predicted == original) & scored).sum()) / total


def scored_mask(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, special_ids: Collection[int]
) -> torch.Tensor:
    """``attention_mask`` with special tokens ([CLS], [SEP], <s>, ...) zeroed: the positions worth scoring."""
    if input_ids.shape != attention_mask.shape:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
            "differ in shape; pass the mask the tokenizer returned with these ids"
        )
    keep = attention_mask.bool()
    if special_ids:
        specials = torch.tensor(sorted({int(i) for i in special_ids}), dtype=input_ids.dtype)
        keep &= ~torch.isin(input_ids, specials.to(input_ids.device))
    return keep.to(attention_mask.dtype)


@torch.no_grad()
def knn_inversion(privatized: torch.Tensor, embedding: torch.Tensor, *, chunk: int = 4096) -> torch.Tensor:
    """EIA-KNN: the id of the nearest (L2) vocabulary embedding at every position.

    ``privatized (..., d)`` -> ids ``(...)``; ties go to the lowest id. Positions and vocabulary are
    both taken in blocks of ``chunk`` rows, so memory stays at ``chunk**2`` distances whatever the
    input size. Valid for the embedding-layer split, where a privatized vector is a noised row of
    ``embedding``; distances use ``|e|^2 - 2<x, e>`` (one matmul per block, the ``|x|^2`` term is
    constant per position).
    """
    if embedding.dim() != 2 or privatized.dim() < 1 or privatized.shape[-1] != embedding.shape[1]:
        raise ValueError(
            f"Expected privatized (..., d) and embedding (vocab, d) with the same d; got "
            f"{tuple(privatized.shape)} and {tuple(embedding.shape)}"
        )
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1; got {chunk!r}")
    vocab = embedding.detach().float().to(privatized.device)
    sq_norms = (vocab * vocab).sum(dim=1)
    flat = privatized.detach().float().reshape(-1, vocab.shape[1])
    ids = torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
    for r in range(0, flat.shape[0], chunk):
        rows = flat[r : r + chunk]
        best = torch.full((rows.shape[0],), float("inf"), device=flat.device)
        arg = torch.zeros(rows.shape[0], dtype=torch.long, device=flat.device)
        for v in range(0, vocab.shape[0], chunk):
            block = torch.addmm(sq_norms[v : v + chunk], rows, vocab[v : v + chunk].T, alpha=-2.0)
            dist, idx = block.min(dim=1)
            better = dist < best  # strict: a tie keeps the earlier (lower) id
            best = torch.where(better, dist, best)
            arg = torch.where(better, idx + v, arg)
        ids[r : r + chunk] = arg
    return ids.reshape(privatized.shape[:-1])


def _targets(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, special_ids: Collection[int]
) -> torch.Tensor:
    return input_ids.masked_fill(scored_mask(input_ids, attention_mask, special_ids) == 0, _IGNORE)


class LearnedInversion:
    """An inverter trained by the attacker on public text passed through its own copy of the bottom model
    and the (public) privatization mechanism, predicting each position's token from its privatized
    representation (EIA-learned; Song & Raghunathan 2020). Needed for deeper splits, where
    representations are no longer near vocabulary embeddings and KNN fails.

    The model is a per-position MLP ``d -> hidden -> GELU -> LayerNorm -> vocab``.
    """

    def __init__(self, dim: int, vocab_size: int, *, hidden: int = 1024, seed: int = 0) -> None:
        for name, value in (("dim", dim), ("vocab_size", vocab_size), ("hidden", hidden)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1; got {value!r}")
        gen = _generator(seed, _MLP_INIT_TAG)
        self.dim = dim
        self.vocab_size = vocab_size
        # Module construction draws its default init from the global RNG; fork it, then re-init below.
        with torch.random.fork_rng(devices=[]):
            self.model = nn.Sequential(
                nn.Linear(dim, hidden), nn.GELU(), nn.LayerNorm(hidden), nn.Linear(hidden, vocab_size)
            )
        with torch.no_grad():
            for module in self.model:
                if isinstance(module, nn.Linear):
                    module.weight.normal_(0.0, module.in_features**-0.5, generator=gen)
                    if module.bias is not None:
                        module.bias.zero_()
        self.model.train(False)

    def fit(
        self,
        bottom: Bottom,
        privatize: Privatize,
        batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
        *,
        steps: int,
        lr: float = 1e-3,
        special_ids: Collection[int] = (),
    ) -> list[float]:
        """Train for ``steps`` AdamW steps, cycling over ``batches`` in order; return the losses.

        The loss is cross-entropy on non-pad, non-special positions (a batch with none is skipped).
        Fresh noise is drawn by ``privatize`` at every step: the attacker can resample the public
        mechanism at will.
        """
        _check_steps(steps, lr)
        data = _as_batches(batches)
        opt = torch.optim.AdamW(self.model.parameters(), lr=lr)
        losses: list[float] = []
        for step in range(steps):
            ids, mask = data[step % len(data)]
            target = _targets(ids, mask, special_ids).reshape(-1)
            keep = target != _IGNORE
            if not bool(keep.any()):
                continue
            with torch.no_grad():
                reps = privatize(bottom(ids, mask), mask)
            self._check_reps(reps)
            logits = self.model(reps.detach().float().reshape(-1, self.dim)[keep])
            loss = F.cross_entropy(logits, target[keep])
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            losses.append(float(loss.detach()))
        return losses

    @torch.no_grad()
    def predict(self, privatized: torch.Tensor, *, chunk: int = 1024) -> torch.Tensor:
        """Token ids ``(...)`` from privatized representations ``(..., d)``, ``chunk`` positions at a time."""
        self._check_reps(privatized)
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk must be an int >= 1; got {chunk!r}")
        flat = privatized.detach().float().reshape(-1, self.dim)
        out = [self.model(flat[i : i + chunk]).argmax(dim=-1) for i in range(0, flat.shape[0], chunk)]
        ids = torch.cat(out) if out else torch.empty(0, dtype=torch.long)
        return ids.reshape(privatized.shape[:-1])

    def _check_reps(self, reps: torch.Tensor) -> None:
        if reps.dim() < 1 or reps.shape[-1] != self.dim:
            raise ValueError(
                f"Representations must end in dim={self.dim}; got shape {tuple(reps.shape)}. Build the "
                "inverter with dim equal to the bottom model's hidden size."
            )
        if not bool(torch.isfinite(reps).all()):
            raise ValueError("Representations contain NaN/inf; check the bottom model and the privatizer")


class MaskedLMInversion:
    """Token inference against the text-level variant: the privatized text (each token replaced by the
    nearest vocabulary token to its noised embedding) is read by a masked-LM-style model that predicts
    the original token at each position from the privatized tokens and their context. The attacker
    trains it on public text privatized with the same public mechanism (SAP threat model; the
    substitution is SANTEXT/CUSTEXT-style text privatization).

    A ``BertForMaskedLM`` with the first ``num_layers`` pretrained encoder blocks; its MLM head is new,
    with the decoder tied to the word embeddings so tokens unseen in training stay predictable. Those
    embeddings stay frozen unless ``train_embeddings``: they are the attacker's knowledge of the public
    model, and freezing them skips the largest gradient and optimizer state (vocab x d). Dropout is
    off, so a fit is a deterministic function of the seed and the data (and draws no global RNG).
    """

    def __init__(
        self,
        encoder_name: str = "minilm-l6",
        *,
        num_layers: int = 2,
        seed: int = 0,
        train_embeddings: bool = False,
    ) -> None:
        gen = _generator(seed, _MLM_INIT_TAG)
        model_dir = resolve_model_dir(encoder_name)
        config = AutoConfig.from_pretrained(model_dir)
        if not isinstance(config, BertConfig):
            raise ValueError(
                f"MaskedLMInversion needs a BERT-family encoder; {encoder_name!r} is {config.model_type!r}. "
                "Use 'minilm-l6' or a local BERT folder."
            )
        total = int(config.num_hidden_layers)
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= total:
            raise ValueError(f"num_layers must be an int in [1, {total}]; got {num_layers!r}")
        config.num_hidden_layers = num_layers
        config.hidden_dropout_prob = 0.0
        config.attention_probs_dropout_prob = 0.0
        config.tie_word_embeddings = True
        with torch.random.fork_rng(devices=[]):
            self.model = BertForMaskedLM(config)
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if param.dim() >= 2:
                    param.normal_(0.0, float(config.initializer_range), generator=gen)
                elif "LayerNorm" in name:
                    param.fill_(1.0)
                else:
                    param.zero_()
        pretrained = load_encoder(encoder_name, num_layers=num_layers).state_dict()
        own = self.model.bert.state_dict()
        matched = {k: v for k, v in pretrained.items() if k in own and own[k].shape == v.shape}
        missing = sorted(set(own) - set(matched) - {"embeddings.position_ids", "embeddings.token_type_ids"})
        if missing:
            raise ValueError(f"Encoder {encoder_name!r} lacks weights for {missing[:5]}; is it a BertModel?")
        self.model.bert.load_state_dict(matched, strict=False)
        head = self.model.cls.predictions
        word = self.model.bert.embeddings.word_embeddings.weight
        head.decoder.weight = word
        head.decoder.bias = head.bias
        word.requires_grad_(train_embeddings)
        self.model.train(False)  # no dropout anyway; eval mode keeps it explicit

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    def _logits(self, ids: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        hidden = self.model.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        logits: torch.Tensor = self.model.cls(hidden[keep])  # only the positions that matter
        return logits

    def fit(
        self,
        privatize_ids: PrivatizeIds,
        batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
        *,
        steps: int,
        lr: float = 5e-5,
        special_ids: Collection[int] = (),
    ) -> list[float]:
        """Train for ``steps`` AdamW steps, cycling over ``batches`` in order; return the losses.

        Input: ``privatize_ids(input_ids, mask)``; target: the original ids at non-pad, non-special
        positions (a batch with none is skipped).
        """
        _check_steps(steps, lr)
        data = _as_batches(batches)
        opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=lr)
        losses: list[float] = []
        for step in range(steps):
            ids, mask = data[step % len(data)]
            target = _targets(ids, mask, special_ids)
            keep = target != _IGNORE
            if not bool(keep.any()):
                continue
            with torch.no_grad():
                priv = privatize_ids(ids, mask)
            self._check_ids(priv, mask)
            loss = F.cross_entropy(self._logits(priv, mask, keep), target[keep])
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            losses.append(float(loss.detach()))
        return losses

    @torch.no_grad()
    def predict(self, privatized_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The guessed original ids; pad positions keep their privatized id."""
        self._check_ids(privatized_ids, attention_mask)
        keep = attention_mask.bool()
        out = privatized_ids.clone()
        if bool(keep.any()):
            out[keep] = self._logits(privatized_ids, attention_mask, keep).argmax(dim=-1)
        return out

    def _check_ids(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        if ids.dim() != 2 or ids.shape != mask.shape:
            raise ValueError(
                f"privatized ids and attention_mask must both be B x S; got {tuple(ids.shape)}, "
                f"{tuple(mask.shape)}"
            )
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError(
                f"privatized ids must lie in [0, {self.vocab_size}); map them with the same tokenizer"
            )


def public_text_batches(
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    *,
    max_length: int = 64,
    batch_size: int = 16,
    max_batches: int | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Public (or held-out) text as ``(input_ids, attention_mask)`` batches, in text order.

    Non-empty lines are packed greedily, whole lines at a time, into sequences of at most
    ``max_length`` tokens including the tokenizer's special tokens (a line longer than that is
    truncated). Packing gives the attacker context and wastes few positions on padding; each batch is
    padded to its longest sequence.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int):
        raise ValueError(f"max_length must be an int; got {max_length!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1; got {batch_size!r}")
    if max_batches is not None and (isinstance(max_batches, bool) or max_batches < 1):
        raise ValueError(f"max_batches must be None or >= 1; got {max_batches!r}")
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        raise ValueError("The tokenizer has no pad token; set tokenizer.pad_token first")
    budget = max_length - tokenizer.num_special_tokens_to_add(pair=False)
    if budget < 1:
        raise ValueError(f"max_length={max_length} leaves no room for text after the special tokens")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    counts = [len(ids) for ids in tokenizer(lines, add_special_tokens=False)["input_ids"]] if lines else []
    packed: list[str] = []
    current: list[str] = []
    used = 0
    for line, n in zip(lines, counts, strict=True):
        if current and used + n > budget:
            packed.append(" ".join(current))
            current, used = [], 0
        current.append(line)
        used += n
    if current:
        packed.append(" ".join(current))
    if max_batches is not None:
        packed = packed[: max_batches * batch_size]
    batches: list[tuple[torch.Tensor, torch.Tensor]] = []
    for i in range(0, len(packed), batch_size):
        enc = tokenizer(
            packed[i : i + batch_size],
            truncation=True,
            max_length=max_length,
            padding=True,
            return_tensors="pt",
        )
        batches.append((enc["input_ids"].long(), enc["attention_mask"].long()))
    return batches


@dataclass(frozen=True)
class AttackResult:
    """One attack's score on held-out text: ``empirical_privacy = 1 - recovery_rate`` over ``tokens``."""

    attack: str
    recovery_rate: float
    empirical_privacy: float
    tokens: int


def evaluate_attack(
    name: str,
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    special_ids: Collection[int] = (),
) -> AttackResult:
    """Score an end-to-end attack ``predict(input_ids, attention_mask) -> guessed ids`` on held-out batches.

    ``predict`` wraps the whole pipeline the server sees (bottom, privatization, inversion), e.g.
    ``lambda ids, m: inv.predict(privatize(bottom(ids, m), m))``. Only non-pad, non-special
    positions count, pooled over all batches.
    """
    hits = 0
    total = 0
    for ids, mask in batches:
        with torch.no_grad():
            guess = predict(ids, mask)
        if guess.shape != ids.shape:
            raise ValueError(f"predict returned shape {tuple(guess.shape)} for input_ids {tuple(ids.shape)}")
        scored = scored_mask(ids, mask, special_ids).bool()
        hits += int(((guess.to(ids.device) == ids) & scored).sum())
        total += int(scored.sum())
    if total == 0:
        raise ValueError("No scored tokens in the held-out batches: pass non-empty text")
    rate = hits / total
    return AttackResult(attack=name, recovery_rate=rate, empirical_privacy=1.0 - rate, tokens=total)
