"""The client half of split-and-privatize LoRA: one round of lock-step steps over the split channel.

The client keeps its data, its labels (U-shaped split), its CTI statistics and the frozen bottom;
per step it sends only the privatized representations of one batch (plus the labels in the
standard split, where the server computes the loss). The Flower message of the round carries
only where to connect and the stream's token; the steps never touch Flower.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import time

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from fedtune._proto.v1 import split_pb2 as pb
from fedtune.algorithms.base import ClientAlgorithm, ClientError, NodeContext
from fedtune.algorithms.rounds import peak_rss_mb
from fedtune.assets.models import load_tokenizer
from fedtune.config import RunConfig
from fedtune.sap.batches import SplitExamples
from fedtune.sap.channel_client import SplitChannelClient
from fedtune.sap.codec import SplitReplyPayload, SplitRoundPayload, decode_split_round, encode_split_reply
from fedtune.sap.cti import ContributingTokens
from fedtune.sap.dp import LabelDPHead, label_dp_figures
from fedtune.sap.encode import ClientEncoder
from fedtune.sap.options import SAPOptions
from fedtune.sap.privatizer import DChiPrivatizer
from fedtune.sap.split import Bottom, ClassifierHead, LMHead, build_bottom
from fedtune.sap.tensors import from_tensor, to_tensor
from fedtune.wire.codec import PayloadError
from fedtune.wire.dp_report import DPFigures
from fedtune.wire.errors import ErrorCode


@functools.lru_cache(maxsize=4)
def client_parts(model: str, task: str, depth: int, num_layers: int) -> tuple[Bottom, LMHead | None]:
    """The process's bottom (and LM head), loaded once: a client trains many rounds."""
    return build_bottom(model, task, depth, num_layers=num_layers or None)


@functools.lru_cache(maxsize=4)
def _tokenizer(model: str) -> PreTrainedTokenizerBase:
    return load_tokenizer(model)


def special_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    return {int(i) for i in tokenizer.all_special_ids}


def fit_cti(
    examples: SplitExamples, tokenizer: PreTrainedTokenizerBase, vocab_size: int, opts: SAPOptions
) -> ContributingTokens:
    """CTI from this node's own examples and labels only; the table never leaves the node."""
    return ContributingTokens.fit(
        examples.token_ids(),
        examples.groups,
        num_classes=examples.num_groups,
        vocab_size=vocab_size,
        eta_base=opts.eta,
        floor=opts.cti_floor,
        ignore_ids=special_ids(tokenizer),
    )


def _mask(batch_mask: torch.Tensor) -> pb.Tensor:
    return to_tensor(batch_mask.numpy().astype("|u1"))


class SAPNode(ClientAlgorithm):
    """One round: privatize each batch locally, exchange it with the split server, report."""

    def __init__(self, cfg: RunConfig, opts: SAPOptions) -> None:
        self.cfg, self.opts = cfg, opts

    def train(self, payload: bytes, node: NodeContext) -> bytes:
        cfg, opts = self.cfg, self.opts
        try:
            rnd = decode_split_round(payload)
        except PayloadError as exc:
            raise ClientError(ErrorCode.BAD_PAYLOAD, f"split round payload: {exc}") from exc
        bottom, lm_head = client_parts(cfg.model.name, opts.task, opts.depth, cfg.model.num_layers)
        tokenizer = _tokenizer(cfg.model.name)
        try:
            examples = SplitExamples(
                node.data.examples,
                tokenizer,
                task=opts.task,
                class_names=rnd.class_names,
                max_length=cfg.model.max_length,
                template=cfg.data.prompt_template,
            )
        except ValueError as exc:
            raise ClientError(ErrorCode.BAD_NODE_CONFIG, str(exc)) from exc
        figures = self._dp_figures(rnd, len(examples), node)
        privatizer = DChiPrivatizer(opts.eta) if opts.privatize else None
        cti = fit_cti(examples, tokenizer, bottom.embedding_matrix.shape[0], opts) if opts.cti else None
        encoder = ClientEncoder(bottom, privatizer, cti, text=opts.variant == "text")
        head, head_opt = self._head(rnd, lm_head)
        private = None
        if figures is not None:
            if not isinstance(head, ClassifierHead) or head_opt is None:  # the config check refuses it
                raise ClientError(ErrorCode.BAD_NODE_CONFIG, "label DP needs the U-shaped classifier head")
            private = LabelDPHead(
                head,
                head_opt,
                figures,
                batch_size=min(rnd.batch_size, len(examples)),
                cut_clip=opts.dp_cut_clip,
            )
        next_batch = examples.stream(
            rnd.batch_size,
            key=(cfg.run.seed, rnd.server_round, node.partition_id),
            balanced=node.data.sampling == "class-balanced",
        )
        losses: list[float] = []
        times: list[float] = []
        noised: list[tuple[int, float, float]] = []
        root = rnd.root_certificates or None
        # closing(private) removes opacus' hooks from the head however the round ends.
        with (
            contextlib.closing(private) if private is not None else contextlib.nullcontext(),
            SplitChannelClient(
                rnd.address,
                stream_id=rnd.stream_id,
                token=rnd.token,
                root_certificates=root,
                timeout_s=opts.step_timeout_s,
            ) as channel,
        ):
            for step in range(rnd.steps):
                batch = next_batch()
                # U-shaped: the labels stay here, so CTI takes the label-free etas (max over classes);
                # per-example class etas would tell the server each label through the noise levels.
                enc = encoder(batch, labelled=not opts.u_shaped)
                noised.append((enc.stats.tokens, enc.stats.noised_norm, enc.stats.noise_norm))
                t0 = time.perf_counter()
                request = pb.StepRequest(
                    stream_id=rnd.stream_id,
                    step=step,
                    kind=pb.STEP_KIND_TRAIN,
                    activations=to_tensor(enc.wire(opts.wire_dtype)),
                    attention_mask=_mask(batch.attention_mask),
                )
                if head is None:  # standard split: the server computes the loss, so it gets the labels
                    request.labels.CopyFrom(to_tensor(batch.targets.numpy().astype("<i8")))
                    losses.append(float(channel.step(request).loss))
                else:
                    losses.append(self._u_step(channel, request, head, head_opt, batch.targets, private))
                times.append((time.perf_counter() - t0) * 1000.0)
            up, down = channel.bytes_sent, channel.bytes_received
        tokens = sum(n for n, _, _ in noised)
        return encode_split_reply(
            SplitReplyPayload(
                server_round=rnd.server_round,
                steps_done=rnd.steps,
                num_examples=len(examples),
                train_loss=float(np.mean(losses)),
                bytes_up_per_step=up / rnd.steps,
                bytes_down_per_step=down / rnd.steps,
                step_ms=statistics.median(times),
                noised_norm=sum(n * a for n, a, _ in noised) / max(1, tokens),
                noise_norm=sum(n * b for n, _, b in noised) / max(1, tokens),
                peak_memory_mb=peak_rss_mb(),
                head=head.arrays() if isinstance(head, ClassifierHead) else {},
                dp=figures,
            )
        )

    def _dp_figures(self, rnd: SplitRoundPayload, num_examples: int, node: NodeContext) -> DPFigures | None:
        """This round's label-DP figures; the round must be the one the config accounts for."""
        figures = label_dp_figures(self.cfg, self.opts, num_examples=num_examples)
        if figures is None:
            return None
        if (rnd.steps, rnd.batch_size) != (self.opts.local_steps, self.opts.batch_size):
            # A server asking for more or larger steps would spend privacy the accountant never saw.
            raise ClientError(
                ErrorCode.BAD_PAYLOAD,
                f"the round asks for {rnd.steps} steps of {rnd.batch_size}, but this node's privacy "
                f"is accounted for {self.opts.local_steps} of {self.opts.batch_size}",
            )
        if node.data.sampling != "shuffle":
            raise ClientError(
                ErrorCode.BAD_NODE_CONFIG,
                f"label DP needs data.sampling = 'shuffle' on the node, not {node.data.sampling!r}",
            )
        return figures

    def _head(
        self, rnd: SplitRoundPayload, lm_head: LMHead | None
    ) -> tuple[ClassifierHead | LMHead | None, torch.optim.Optimizer | None]:
        if not self.opts.u_shaped:
            return None, None
        if self.opts.task == "causal-lm":
            return lm_head, None  # frozen: nothing on the client trains
        if not rnd.head:
            raise ClientError(
                ErrorCode.BAD_PAYLOAD, "a U-shaped classification round must carry the global head"
            )
        weight = np.asarray(rnd.head["linear.weight"], dtype=np.float32)
        head = ClassifierHead(weight.shape[1], weight.shape[0], seed=0)
        try:
            head.load_arrays(rnd.head)
        except ValueError as exc:
            raise ClientError(ErrorCode.BAD_PAYLOAD, str(exc)) from exc
        return head, torch.optim.AdamW(head.parameters(), lr=self.opts.lr, weight_decay=0.0)

    def _u_step(
        self,
        channel: SplitChannelClient,
        request: pb.StepRequest,
        head: ClassifierHead | LMHead,
        head_opt: torch.optim.Optimizer | None,
        targets: torch.Tensor,
        private: LabelDPHead | None,
    ) -> float:
        """U-shaped: trunk output down, loss and head step here, dLoss/d(output) up; labels stay.
        Under label DP the rows sent up are clipped and noised (:mod:`fedtune.sap.dp`)."""
        reply = channel.step(request)
        out = from_tensor(reply.trunk_output, name="trunk_output", dtypes=("<f4",), ndim=None)
        feats = torch.from_numpy(out.astype(np.float32)).requires_grad_(True)
        if private is not None:
            loss_value, rows = private.step(feats, targets)
            self._send_up(channel, request, rows)
            return loss_value
        if head_opt is not None:
            head_opt.zero_grad(set_to_none=True)
        loss = head.loss(feats, targets)
        loss.backward()  # type: ignore[no-untyped-call]
        if head_opt is not None:
            head_opt.step()
        if feats.grad is None:
            raise RuntimeError("no gradient reached the trunk output")
        self._send_up(channel, request, feats.grad)
        return float(loss.detach())

    @staticmethod
    def _send_up(channel: SplitChannelClient, request: pb.StepRequest, grad: torch.Tensor) -> None:
        back = pb.StepRequest(
            stream_id=request.stream_id,
            step=request.step,
            kind=pb.STEP_KIND_BACKWARD,
            upstream_grad=to_tensor(grad.detach().numpy().astype("<f4")),
        )
        channel.step(back)
