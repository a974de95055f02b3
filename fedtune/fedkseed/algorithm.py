"""FedKSeed and FedKSeed-Pro as registered algorithms (Qin et al., "Federated Full-Parameter
Tuning of Billion-Sized Language Models with Communication Cost under 18 Kilobytes", ICML 2024).

Options come from the typed ``[zo]`` and ``[fedkseed]`` sections; payloads are the
``KSeedSync`` / ``KSeedReply`` messages of ``proto/fedtune/v1/fedkseed.proto``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from fedtune.aggregators.base import Aggregator
from fedtune.algorithms.base import Algorithm, ClientAlgorithm, ClientError, EvalModel, NodeContext, Summand
from fedtune.algorithms.registry import register_algorithm
from fedtune.config import RunConfig
from fedtune.fedkseed.client import NodeView, StaleSyncError
from fedtune.fedkseed.dp import ServerPrivacy, plan_for
from fedtune.fedkseed.replica import build_replica, get_replica
from fedtune.fedkseed.server import FedKSeedServer, RoundSettings, coefficients_from_steps
from fedtune.fedkseed.state import WEIGHTS_FILE, load_weights, save_weights
from fedtune.wire.codec import ReplyPayload, SyncPayload, decode_sync, encode_reply
from fedtune.wire.errors import ErrorCode

VIEW_FILE = "fedkseed-view.npz"


def round_settings(cfg: RunConfig, server_round: int) -> RoundSettings:
    zo = cfg.zo
    return RoundSettings(
        server_round=server_round,
        lr=zo.lr_at(server_round, cfg.federation.num_rounds),
        eps=zo.eps,
        num_local_steps=zo.local_steps,
        batch_size=zo.batch_size,
    )


class FedKSeedNode(ClientAlgorithm):
    """One FedKSeed round on a node: sync by seed replay, tau MeZO steps, reply with scalars."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg

    def train(self, payload: bytes, node: NodeContext) -> bytes:
        reply = self._round(decode_sync(payload), node)
        return encode_reply(reply, scalar_dtype=self.cfg.fedkseed.reply_scalars)  # type: ignore[arg-type]

    def train_summand(self, payload: bytes, node: NodeContext) -> Summand:
        """The round's lr-folded K-vector goes into the secure sum; only the rest is sent in clear."""
        sync = decode_sync(payload)
        reply = self._round(sync, node)
        vector = coefficients_from_steps(
            reply.seed_indices, reply.projected_grads, lr=sync.lr, num_seeds=self.cfg.fedkseed.num_seeds
        )
        public = dataclasses.replace(
            reply,
            seed_indices=np.zeros(0, dtype=np.int64),
            projected_grads=np.zeros(0, dtype=np.float32),
        )
        return Summand(vector=vector, weight=float(reply.num_examples), public=encode_reply(public))

    def _round(self, sync: SyncPayload, node: NodeContext) -> ReplyPayload:
        cfg = self.cfg
        with node.timer.phase("model_load"):
            replica = get_replica(cfg)
        client = replica.client
        # A process that has not synced yet (deployment's process per message, a new Ray actor, a
        # resumed run) starts from this node's saved weights, if they verify, and keeps them after.
        keep_weights = client.pristine and not cfg.fedkseed.rebuild_each_round
        weights_path = node.state_dir / WEIGHTS_FILE
        if keep_weights:
            with node.timer.phase("state_load"):
                saved = load_weights(
                    weights_path,
                    client.stepper.tuned,
                    fingerprint=client.fingerprint,
                    num_seeds=cfg.fedkseed.num_seeds,
                )
                if saved is not None:
                    client.restore(saved.tensors, saved.coefficients)
            node.timer.count("state_restored", int(saved is not None))
        path = node.state_dir / VIEW_FILE
        view = NodeView.load(path, cfg.fedkseed.num_seeds)
        with node.timer.phase("data"):
            batches = node.data.batches(
                replica.tokenizer,
                batch_size=sync.batch_size,
                max_length=cfg.model.max_length,
                key=(cfg.run.seed, sync.server_round, node.partition_id),
                template=cfg.data.prompt_template,
            )
        dp = plan_for(cfg, num_examples=len(node.data))
        try:
            reply, new_view = client.train_round(
                sync,
                client_key=node.partition_id,
                view=view,
                batch_for_step=batches,
                num_examples=len(node.data),
                timer=node.timer,
                dp=dp,
            )
        except StaleSyncError as exc:
            raise ClientError(
                ErrorCode.STALE_SYNC, str(exc), held_version=None if view is None else view.version
            ) from exc
        with node.timer.phase("state_save"):
            if keep_weights:
                save_weights(
                    weights_path,
                    client.stepper.tuned,
                    client.coefficients,
                    fingerprint=client.fingerprint,
                    server_round=sync.server_round,
                )
            new_view.save(path)
        if dp is None:
            return reply
        return dataclasses.replace(reply, dp=dp.figures())


class _Server(FedKSeedServer):
    """The server half with its config: exports a fresh theta_0 + replay(A), not a cached replica."""

    def __init__(self, cfg: RunConfig, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.cfg = cfg

    def export(self, out_dir: Path) -> None:
        replica = build_replica(self.cfg)
        replica.client.sync_to(self.accumulator)
        replica.model.save_pretrained(out_dir, safe_serialization=True)
        replica.tokenizer.save_pretrained(out_dir)


@register_algorithm("fedkseed")
class FedKSeed(Algorithm):
    """FedKSeed: uniform sampling from a pool of K shared seeds."""

    pro: ClassVar[bool] = False
    supports_secure_aggregation: ClassVar[bool] = True
    privacy_mechanisms: ClassVar[tuple[str, ...]] = ("sample", "client")

    def server(self, aggregator: Aggregator) -> FedKSeedServer:
        cfg = self.cfg
        replica = get_replica(cfg)

        def eval_model(accumulator: npt.NDArray[np.float64]) -> EvalModel:
            replica.client.sync_to(accumulator, server_round=server.completed_round)
            return EvalModel(replica.model, replica.tokenizer)

        server = _Server(
            cfg,
            num_seeds=cfg.fedkseed.num_seeds,
            aggregator=aggregator,
            fingerprint=replica.fingerprint,
            settings=lambda r: round_settings(cfg, r),
            pro=self.pro,
            pro_clip=cfg.fedkseed.pro_clip,
            sparse_sync=cfg.fedkseed.sparse_sync,
            max_weight_ratio=cfg.aggregator.max_weight_ratio,
            eval_model=eval_model,
            privacy=ServerPrivacy(cfg, cfg.fedkseed.num_seeds) if cfg.privacy.enabled else None,
        )
        return server

    def client(self) -> FedKSeedNode:
        return FedKSeedNode(self.cfg)


@register_algorithm("fedkseed-pro")
class FedKSeedPro(FedKSeed):
    """FedKSeed-Pro: seeds sampled by importance (softmax of normalised mean |g| per seed)."""

    pro: ClassVar[bool] = True
    # Importance sampling learns from each client's own scalars: a secure sum hides them, and
    # client-level noise on every seed would drown the statistic.
    supports_secure_aggregation: ClassVar[bool] = False
    privacy_mechanisms: ClassVar[tuple[str, ...]] = ("sample",)
