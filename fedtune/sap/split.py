"""A Hugging Face encoder or decoder cut at a block boundary into a client bottom and a server trunk.

SAP (Shen et al., "A Split-and-Privatize Framework for Large Language Model Fine-Tuning",
arXiv:2312.15603) keeps the bottom (token embeddings, or embeddings plus the first k blocks) with
the customer and the trunk (the remaining blocks) with the model owner. Where the cut is sets
what is privatized:

* depth 0, encoder (BERT-style): the bottom is the word-embedding lookup alone; position and
  token-type embeddings and the embedding LayerNorm run in the trunk. Noise is therefore added
  in the token-embedding space, where d_chi-privacy is defined.
* depth 0, decoder (Llama-style): the bottom is ``embed_tokens`` (rotary positions are applied
  inside attention, so nothing else precedes the first block).
* depth k: the bottom runs the embeddings and blocks 0..k-1 and returns their hidden states;
  the guarantee then holds with respect to distances between hidden states, not tokens.

Both halves are the library's own modules (no forked forward): the trunk reuses the model's
``forward`` with ``inputs_embeds`` and its block list sliced, which reproduces the unsplit
model's output exactly (tested). The head is kept apart from the trunk so that the U-shaped
variant can leave it, and the labels, on the client.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from fedtune.assets.models import load_causal_lm, load_encoder

# model_type -> family. Llama-like decoders feed ``inputs_embeds`` straight into their blocks;
# decoders that rescale embeddings inside ``forward`` (Gemma) would be scaled twice at depth > 0,
# so they are left out rather than silently wrong.
FAMILIES: Mapping[str, str] = {
    "bert": "encoder",
    "roberta": "encoder",
    "llama": "decoder",
    "mistral": "decoder",
    "qwen2": "decoder",
    "qwen3": "decoder",
}
DEFAULT_TARGETS: Mapping[str, tuple[str, ...]] = {
    "encoder": ("query", "value"),
    "decoder": ("q_proj", "v_proj"),
}
HEAD_INIT_TAG = 0x4EAD
IGNORE_INDEX = -100


def family_of(model: PreTrainedModel) -> str:
    """``encoder`` or ``decoder``; ValueError naming the supported model types otherwise."""
    kind = str(getattr(model.config, "model_type", ""))
    if kind not in FAMILIES:
        raise ValueError(
            f"split-and-privatize supports model types {', '.join(sorted(FAMILIES))}; "
            f"{kind!r} is not one of them"
        )
    return FAMILIES[kind]


def _blocks(base: nn.Module, family: str) -> nn.ModuleList:
    b = cast(Any, base)
    blocks = b.encoder.layer if family == "encoder" else b.layers
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"{type(base).__name__} has no block list where a {family} keeps it")
    return blocks


def _check_depth(base: nn.Module, family: str, depth: int) -> None:
    total = len(_blocks(base, family))
    if not 0 <= depth < total:
        raise ValueError(
            f"split depth {depth} must leave the trunk at least one block: use 0..{total - 1} "
            f"for this {total}-block model (algorithm.options.depth, model.num-layers)"
        )


class _PassThroughEmbeddings(nn.Module):
    """Stands in for an encoder's embedding module when the bottom already ran it."""

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values_length: int = 0,
    ) -> torch.Tensor:
        if inputs_embeds is None:
            raise ValueError("the trunk of a depth > 0 split takes hidden states, not token ids")
        return inputs_embeds


def load_base(
    model_name: str, family_hint: str, *, num_layers: int | None
) -> tuple[PreTrainedModel, nn.Module]:
    """(the HF base model, and for decoders the LM head module; for encoders an empty module)."""
    if family_hint == "classification":
        model = load_encoder(model_name, num_layers=num_layers)
        if family_of(model) != "encoder":
            raise ValueError("task = 'classification' needs an encoder (e.g. model.name = 'minilm-l6')")
        return model, nn.Identity()
    lm = cast(Any, load_causal_lm(model_name, num_layers=num_layers))
    if family_of(lm) != "decoder":
        raise ValueError("task = 'causal-lm' needs a decoder (e.g. model.name = 'smollm2-135m')")
    return lm.get_decoder(), lm.get_output_embeddings()


class _Half(nn.Module):
    """What both halves know of the cut: the model family, the depth, the hidden width."""

    def __init__(self, base: PreTrainedModel, depth: int) -> None:
        super().__init__()
        self.family = family_of(base)
        _check_depth(base, self.family, depth)
        self.depth = depth
        self.hidden_size = int(base.config.hidden_size)


class Bottom(_Half):
    """The client's frozen bottom: ``(input_ids, attention_mask) -> B x S x d`` representations."""

    def __init__(self, base: PreTrainedModel, depth: int) -> None:
        super().__init__(base, depth)
        family = self.family
        emb = base.get_input_embeddings()
        if not isinstance(emb, nn.Embedding):
            raise TypeError(f"{type(base).__name__}'s input embeddings are not an nn.Embedding")
        self.embed = emb
        self.base: nn.Module | None = None
        if depth > 0:
            b = cast(Any, copy.copy(base))  # shallow: the slice below must not cut the caller's model
            b._modules = dict(b._modules)
            if family == "encoder":
                b.encoder = copy.copy(b.encoder)
                b.encoder._modules = dict(b.encoder._modules)
                b.encoder.layer = nn.ModuleList(list(b.encoder.layer)[:depth])
                b.pooler = None
            else:
                b.layers = nn.ModuleList(list(b.layers)[:depth])
                b.norm = nn.Identity()
            self.base = b
        self.requires_grad_(False)
        self.eval()

    @property
    def embedding_matrix(self) -> torch.Tensor:
        """V x d token embeddings: what the text-level variant snaps to and KNN inversion searches."""
        return self.embed.weight.detach()

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.base is None:
            return cast(torch.Tensor, self.embed(input_ids).float())
        out = self.base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return cast(torch.Tensor, out.last_hidden_state.float())


class Trunk(_Half):
    """The server's trunk: the blocks after the cut; encoders return mean-pooled B x d features,
    decoders the final-norm B x S x d hidden states. Takes representations, or token ids for the
    text-level variant."""

    def __init__(self, base: PreTrainedModel, depth: int) -> None:
        super().__init__(base, depth)
        family = self.family
        if depth > 0:
            blocks = _blocks(base, family)
            b = cast(Any, base)
            if family == "encoder":
                b.embeddings = _PassThroughEmbeddings()
                b.encoder.layer = nn.ModuleList(list(blocks)[depth:])
            else:
                b.embed_tokens = None
                b.layers = nn.ModuleList(list(blocks)[depth:])
        self.base: nn.Module = base
        self.denoiser: nn.Module | None = None  # set by ``denoise_inputs``

    def denoise_inputs(self, denoiser: nn.Module) -> None:
        """Run ``denoiser(x, mask)`` on every float input before the blocks (post-processing of what
        the client released, e.g. :class:`fedtune.sap.denoise.PosteriorMeanDenoiser`)."""
        if self.depth != 0:
            raise ValueError("input denoising applies to the embedding split (depth 0) only")
        self.denoiser = denoiser

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        kwargs: dict[str, torch.Tensor] = {"attention_mask": attention_mask}
        if x.dtype == torch.long:
            kwargs["input_ids"] = x
        else:
            kwargs["inputs_embeds"] = x if self.denoiser is None else self.denoiser(x, attention_mask)
        if self.family == "encoder":
            hidden: torch.Tensor = self.base(**kwargs).last_hidden_state
            # Masked mean of the final hidden states: the pooling sentence encoders such as
            # all-MiniLM are trained with (their BERT pooler is an untrained leftover).
            m = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
        out = self.base(**kwargs, use_cache=False)
        return out.last_hidden_state  # type: ignore[no-any-return]


class ClassifierHead(nn.Module):
    """A linear classifier on the pooled features, initialised from a keyed generator."""

    def __init__(self, hidden_size: int, num_classes: int, *, seed: int) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a classifier needs >= 2 classes, got {num_classes}")
        with torch.random.fork_rng(devices=[]):  # nn.Linear's own init reads the global RNG
            self.linear = nn.Linear(hidden_size, num_classes)
        gen = torch.Generator().manual_seed(
            int(np.random.SeedSequence([HEAD_INIT_TAG, seed]).generate_state(1)[0])
        )
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(self.linear.weight.shape, generator=gen) * 0.02)
            self.linear.bias.zero_()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features)  # type: ignore[no-any-return]

    def loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self(features).float(), labels)

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self(features)
        return logits.argmax(dim=-1)

    def arrays(self) -> dict[str, npt.NDArray[np.float32]]:
        """The head's weights by name (what the U-shaped split sends and averages)."""
        return {n: p.detach().numpy().astype(np.float32).copy() for n, p in self.named_parameters()}

    def load_arrays(self, arrays: Mapping[str, npt.NDArray[np.float32]]) -> None:
        """Copy ``arrays`` in; names and shapes are checked before anything changes (ValueError)."""
        params = dict(self.named_parameters())
        same = set(arrays) == set(params)
        if not same or any(np.shape(arrays[n]) != tuple(p.shape) for n, p in params.items()):
            raise ValueError(f"the head arrays must be {sorted(params)} with the head's shapes")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(torch.from_numpy(np.array(arrays[n], dtype=np.float32)))


class LMHead(nn.Module):
    """A decoder's (frozen) output projection with the answer-only next-token loss."""

    def __init__(self, output_embeddings: nn.Module) -> None:
        super().__init__()
        weight = getattr(output_embeddings, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise TypeError("the decoder has no output embedding weight to use as its LM head")
        self.weight = nn.Parameter(weight.detach().clone().float(), requires_grad=False)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight)

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over answer positions (labels != -100), projected only there."""
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        if not bool(keep.any()):
            raise ValueError("the batch has no answer tokens (every label after position 0 is -100)")
        return F.cross_entropy(self.logits(hidden[:, :-1][keep]).float(), targets[keep])

    def predict(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.logits(hidden).argmax(dim=-1)


Head = ClassifierHead | LMHead


@dataclass(frozen=True)
class SplitParts:
    """Everything one side may build: the bottom, the trunk and the head of one split."""

    bottom: Bottom
    trunk: Trunk
    head: Head


def build_split(
    model_name: str, task: str, depth: int, *, num_layers: int | None, num_classes: int, seed: int
) -> SplitParts:
    """Load the model twice (bottom and trunk own their weights, as on two machines) and cut it."""
    bottom_base, _ = load_base(model_name, task, num_layers=num_layers)
    trunk_base, out_emb = load_base(model_name, task, num_layers=num_layers)
    bottom = Bottom(bottom_base, depth)
    trunk = Trunk(trunk_base, depth)
    head: Head
    if task == "classification":
        head = ClassifierHead(trunk.hidden_size, num_classes, seed=seed)
    else:
        head = LMHead(out_emb)
    return SplitParts(bottom, trunk, head)


def build_bottom(
    model_name: str, task: str, depth: int, *, num_layers: int | None
) -> tuple[Bottom, LMHead | None]:
    """The client's side: its bottom, and for a U-shaped decoder its (frozen) LM head."""
    base, out_emb = load_base(model_name, task, num_layers=num_layers)
    return Bottom(base, depth), (LMHead(out_emb) if task == "causal-lm" else None)
