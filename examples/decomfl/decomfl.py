"""DeComFL on fedtune's algorithm API, kept outside the fedtune package.

Li et al., "Achieving Dimension-Free Communication in Federated Learning via Zeroth-Order
Optimization" (2024), https://arxiv.org/abs/2405.15861; reference code ZidongLiu/DeComFL.

Each round the server draws the round's seeds (``tau`` local steps x ``P`` perturbations) from a
generator keyed by (DeComFL tag, run seed, round) and sends the same seeds to every sampled
client. A client first moves to the current global model (undoing its own local steps of the
round it last trained, and replaying the rounds it missed with their aggregated scalars), runs
its ``tau`` zeroth-order steps on exactly those seeds and uploads only the ``tau * P`` projected
gradients. The server aggregates them per seed with the configured aggregator and appends
``(round, seeds, aggregated scalars, lr)`` to the history; the global model is
``theta_0 - sum over the history of (lr / P) * scalar * z(seed)``. Both directions carry seeds
and scalars only: nothing scales with the model.

Select it with::

    [run]
    algorithm = "examples.decomfl.decomfl:DeComFL"

    [algorithm.options]
    num-perturbations = 1
"""

from __future__ import annotations

from pathlib import Path

from fedtune.aggregators.base import Aggregator
from fedtune.algorithms import Algorithm, ClientAlgorithm, ClientError, EvalModel, NodeContext
from fedtune.algorithms.rounds import peak_rss_mb
from fedtune.config import RunConfig
from fedtune.wire.errors import ErrorCode

from .payload import MAX_SCALARS_PER_ROUND, PayloadError, ReplyPayload, SyncPayload, decode_sync, encode_reply
from .replica import VIEW_FILE, NodeView, Replica, SeedCoefficients, build_replica, get_replica
from .server import DeComFLServer, round_seeds

__all__ = ["DeComFL", "DeComFLClient", "DeComFLServer", "round_seeds"]

MAX_PERTURBATIONS = 1024


class DeComFLClient(ClientAlgorithm):
    """The client half: catch up to the global model, run the local steps, reply with scalars."""

    def __init__(self, cfg: RunConfig, num_perturbations: int, *, rebuild_each_round: bool = False) -> None:
        self.cfg = cfg
        self.num_perturbations = num_perturbations
        self.rebuild_each_round = rebuild_each_round

    def replica(self) -> Replica:
        return get_replica(self.cfg, keep_theta0=self.rebuild_each_round)

    def check(self, sync: SyncPayload) -> None:
        """Refuse a sync this node cannot follow (another model, perturbation or option)."""
        replica = self.replica()
        if sync.fingerprint != replica.fingerprint:
            raise ClientError(
                ErrorCode.BAD_PAYLOAD,
                "the server's model/perturbation fingerprint differs from this node's; "
                "run `fedtune zo-check` on both sides and use the same model, tuned parameters, "
                "perturbation kind and run seed",
            )
        if sync.eps != replica.stepper.config.eps or sync.num_perturbations != self.num_perturbations:
            raise ClientError(
                ErrorCode.BAD_PAYLOAD,
                f"server runs eps={sync.eps}, P={sync.num_perturbations}; this node is configured with "
                f"eps={replica.stepper.config.eps}, P={self.num_perturbations}",
            )

    def catch_up(self, sync: SyncPayload, node: NodeContext) -> NodeView:
        """Move the replica to the global model of version ``round - 1`` and return that view.

        The node's view says which version it holds; the payload carries the history after
        ``base_round``. A view of another version (lost or rolled-back state) cannot be caught up:
        STALE_SYNC with the version held, and the server resends from there.
        """
        view = NodeView.load(node.state_dir / VIEW_FILE)
        if sync.base_round == 0:  # from theta_0: any node can apply it
            view = NodeView(0)
        elif view is None or view.version != sync.base_round:
            have = "nothing" if view is None else f"version {view.version}"
            raise ClientError(
                ErrorCode.STALE_SYNC,
                f"sync continues from version {sync.base_round}, but this node holds {have}",
                held_version=None if view is None else view.version,
            )
        target = view.coefficients.copy()
        for entry in sync.entries:
            target.add_entry(entry, sync.num_perturbations)
        # One replay of target - (what the replica holds): undoes the last local steps run on it
        # (this node's or another virtual client's) and applies the missed rounds together.
        self.replica().sync_to(target, rebuild=self.rebuild_each_round)
        return NodeView(sync.server_round - 1, target)

    def train(self, payload: bytes, node: NodeContext) -> bytes:
        try:
            sync = decode_sync(payload)
        except PayloadError as exc:
            raise ClientError(ErrorCode.BAD_PAYLOAD, f"DeComFL sync: {exc}") from exc
        self.check(sync)
        view = self.catch_up(sync, node)
        replica = self.replica()
        batches = node.data.batches(
            replica.tokenizer,
            batch_size=sync.batch_size,
            max_length=self.cfg.model.max_length,
            key=(self.cfg.run.seed, sync.server_round, node.partition_id),
        )
        local = replica.local_round(
            sync.seeds, lr=sync.lr, num_perturbations=sync.num_perturbations, batch_for_step=batches
        )
        view.save(node.state_dir / VIEW_FILE)
        reply = ReplyPayload(
            server_round=sync.server_round,
            synced_round=view.version,
            num_examples=len(node.data),
            num_skipped=local.num_skipped,
            train_loss=local.train_loss,
            peak_memory_mb=peak_rss_mb(),
            scalars=local.scalars,
        )
        return encode_reply(reply)


class DeComFL(Algorithm):
    """DeComFL (Li et al., 2024): server-chosen seeds, scalar-only uploads, history replay.

    Options (``[algorithm.options]``):

    * ``num-perturbations`` (P): perturbations per local step, all measured at the same point
      and applied together as ``-(lr / P) sum_p g_p z_p`` (the paper's LLM runs use 1-5).
    * ``rebuild-each-round``: every sync (a client's catch-up, the server's evaluation) restores
      theta_0 and replays the whole history instead of moving the model by the difference, so
      each round starts from weights that depend on the history alone (bit-identical across
      processes and resumes). Costs a second copy of the tuned weights and one replay of every
      distinct seed in the history per sync.

    Everything else comes from ``[zo]`` (lr and schedule, eps, local steps, batch size,
    perturbation kind, tuned parameters) and ``[aggregator]``.
    """

    def __init__(
        self, cfg: RunConfig, *, num_perturbations: int = 1, rebuild_each_round: bool = False
    ) -> None:
        super().__init__(cfg)
        if not 1 <= num_perturbations <= MAX_PERTURBATIONS:
            raise ValueError(
                f"num-perturbations must be in [1, {MAX_PERTURBATIONS}], got {num_perturbations}"
            )
        if cfg.zo.local_steps * num_perturbations > MAX_SCALARS_PER_ROUND:
            raise ValueError(
                f"zo.local-steps x num-perturbations = {cfg.zo.local_steps * num_perturbations} "
                f"exceeds {MAX_SCALARS_PER_ROUND} scalars per round"
            )
        self.num_perturbations = num_perturbations
        self.rebuild_each_round = rebuild_each_round

    def server(self, aggregator: Aggregator) -> DeComFLServer:
        cfg = self.cfg
        rebuild = self.rebuild_each_round
        replica = get_replica(cfg, keep_theta0=rebuild)

        def eval_model(coefficients: SeedCoefficients) -> EvalModel:
            replica.sync_to(coefficients, rebuild=rebuild)
            return EvalModel(replica.model, replica.tokenizer)

        def export(coefficients: SeedCoefficients, out_dir: Path) -> None:
            fresh = build_replica(cfg)  # theta_0 + one replay of the history, not a drifted cache
            fresh.sync_to(coefficients)
            fresh.model.save_pretrained(out_dir, safe_serialization=True)
            fresh.tokenizer.save_pretrained(out_dir)

        return DeComFLServer(
            aggregator=aggregator,
            fingerprint=replica.fingerprint,
            run_seed=cfg.run.seed,
            num_local_steps=cfg.zo.local_steps,
            num_perturbations=self.num_perturbations,
            batch_size=cfg.zo.batch_size,
            eps=cfg.zo.eps,
            lr_at=lambda r: cfg.zo.lr_at(r, cfg.federation.num_rounds),
            max_weight_ratio=cfg.aggregator.max_weight_ratio,
            eval_model=eval_model,
            export=export,
        )

    def client(self) -> DeComFLClient:
        return DeComFLClient(self.cfg, self.num_perturbations, rebuild_each_round=self.rebuild_each_round)
