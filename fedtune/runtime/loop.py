"""The one run loop: every algorithm, every runtime (in-process grid, Ray simulation, deployment).

Per round: sample clients, let the algorithm build their payloads, exchange them through the
transport, let the algorithm validate and aggregate, evaluate the new global model, append a
``metrics.jsonl`` row, and checkpoint atomically. A round that cannot be aggregated is skipped
with the state untouched; ``federation.max-failed-rounds`` skipped rounds in a row, or too few
live clients for ``federation.node-wait-s``, end the run cleanly with a summary. A run folder
holding a checkpoint can be resumed and ends exactly where an unstopped run would.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedtune.aggregators import Aggregator, WeightedMean, create_aggregator
from fedtune.algorithms.base import Algorithm, NodeReply, RoundOutcome, ServerAlgorithm
from fedtune.algorithms.registry import create_algorithm
from fedtune.config import RunConfig
from fedtune.experiment import build_federated_data
from fedtune.recorder import RunRecorder, new_run_dir
from fedtune.runlog import MetricValue
from fedtune.runtime.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedtune.runtime.sampling import ClientSampler
from fedtune.runtime.transport import RoundRequest, Transport

if TYPE_CHECKING:
    from fedtune.eval import HeldoutEvaluator

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSetup:
    """The server side of a run, built and checked before any client is contacted."""

    cfg: RunConfig
    server: ServerAlgorithm
    min_replies: int


def check_config(cfg: RunConfig) -> None:
    """The checks :func:`build_run` makes, without loading a model: the CLI runs them before Ray starts."""
    aggregator = create_aggregator(cfg.aggregator.name, dict(cfg.aggregator.options))
    _check_sampling(cfg, aggregator.min_clients)
    _check_privacy(cfg, create_algorithm(cfg), aggregator)


def _check_privacy(cfg: RunConfig, algorithm: Algorithm, aggregator: Aggregator) -> None:
    name = cfg.run.algorithm
    if cfg.privacy.enabled and cfg.privacy.mechanism not in algorithm.privacy_mechanisms:
        offered = ", ".join(algorithm.privacy_mechanisms) or "none"
        raise ValueError(
            f"privacy.mechanism = {cfg.privacy.mechanism!r} is not implemented by algorithm {name!r} "
            f"(it offers: {offered}); pick one of those or set privacy.mechanism = 'none'"
        )
    if cfg.secagg.enabled:
        if not algorithm.supports_secure_aggregation:
            raise ValueError(
                f"secagg.enabled: algorithm {name!r} does not implement secure aggregation "
                "(Summand / aggregate_sum); turn secagg off or pick fedkseed or lora-fedavg"
            )
        if not isinstance(aggregator, WeightedMean):
            raise ValueError(
                f"secagg.enabled with aggregator {cfg.aggregator.name!r}: under secure aggregation the "
                "server sees only the sum, but this rule needs each client's update (robust rules compare "
                "updates); use aggregator.name = 'weighted-mean' or turn secagg off"
            )


def _check_sampling(cfg: RunConfig, min_clients: int) -> None:
    if cfg.federation.clients_per_round < min_clients:
        raise ValueError(
            f"aggregator {cfg.aggregator.name!r} needs at least {min_clients} updates per round, "
            f"but federation.clients-per-round = {cfg.federation.clients_per_round}; sample more clients "
            "or change the aggregator's options"
        )


def build_run(cfg: RunConfig) -> RunSetup:
    """Algorithm, aggregator and the cross-checks between them and the config (ValueError = config error)."""
    aggregator = create_aggregator(cfg.aggregator.name, dict(cfg.aggregator.options))
    _check_sampling(cfg, aggregator.min_clients)
    algorithm = create_algorithm(cfg)
    _check_privacy(cfg, algorithm, aggregator)
    server = algorithm.server(aggregator)
    return RunSetup(cfg, server, max(cfg.federation.min_replies, server.min_updates))


class RunLoop:
    """Drives one run over a :class:`Transport`; :meth:`run` returns the summary."""

    def __init__(
        self,
        cfg: RunConfig,
        transport: Transport,
        *,
        run_dir: Path | None = None,
        resume: bool = False,
        quiet: bool = False,
        settle_s: float = 5.0,
        stop_after: int | None = None,
    ) -> None:
        self.cfg = cfg
        if resume:  # checked before any model loads
            if run_dir is None:
                raise ValueError("resume needs the run folder to continue")
            self._check_same_config(run_dir)
        self.setup = build_run(cfg)
        self.transport = transport
        self.resume = resume
        self.run_dir = run_dir if resume and run_dir is not None else new_run_dir(cfg, run_dir)
        self.recorder = RunRecorder(self.run_dir, cfg, quiet=quiet, resume=resume)
        self.sampler = ClientSampler(
            run_seed=cfg.run.seed,
            wanted=cfg.federation.clients_per_round,
            minimum=self.setup.min_replies,
            wait_s=cfg.federation.node_wait_s,
            settle_s=settle_s,
        )
        self.stop_after = stop_after  # tests: stop (as if killed) after this round's checkpoint
        self._evaluator: HeldoutEvaluator | None = None
        self._zeroshot: HeldoutEvaluator | None = None
        self.run_key = ""
        self.failed_streak = 0
        self.stop_reason = ""
        self._first_round = 1

    def _check_same_config(self, run_dir: Path) -> None:
        saved_path = run_dir / "config.toml"
        if not saved_path.is_file():
            raise ValueError(f"{run_dir} has no config.toml; pass a run folder written by fedtune")
        saved = RunConfig.load(saved_path)
        if saved != self.cfg:
            diff = sorted(k for k, v in self.cfg.to_flat().items() if saved.to_flat().get(k) != v)
            raise ValueError(
                f"{run_dir} was run with another config (differs in {', '.join(diff)}); "
                "resume with the run's own config.toml"
            )

    # -- evaluation ----------------------------------------------------------------------------
    def _evaluate(self, server_round: int) -> dict[str, MetricValue]:
        em = self.setup.server.eval_model()
        if em is None:  # the algorithm evaluates itself (e.g. SAP), on the in-distribution split only
            heldout = build_federated_data(self.cfg).heldout
            self.recorder.note("evaluating on the held-out split")
            return dict(self.setup.server.evaluate(heldout))
        if self._evaluator is None:
            self.recorder.note("building the held-out split and evaluator")
            from fedtune.eval import HeldoutEvaluator

            data = build_federated_data(self.cfg)
            self._evaluator = HeldoutEvaluator.for_run(em.tokenizer, data.heldout, self.cfg)
            if data.zeroshot is not None:
                self._zeroshot = HeldoutEvaluator.for_run(
                    em.tokenizer, data.zeroshot, self.cfg, zeroshot=True
                )
        self.recorder.note("evaluating on the held-out split")
        t0 = time.perf_counter()
        res = self._evaluator(em.model)
        row: dict[str, MetricValue] = {
            "heldout_loss": res.heldout_loss,
            "heldout_loss_per_example": res.heldout_loss_per_example,
            "rouge_l": res.rouge_l,
            "exact_match": res.exact_match,
        }
        self.recorder.record_generations(
            server_round, "heldout", self._evaluator.gen_prompts, self._evaluator.gen_refs, res.generations
        )
        if self._zeroshot is not None:
            self.recorder.note("evaluating on the zero-shot split (data.heldout-groups)")
            zs = self._zeroshot(em.model)
            row.update(
                {
                    "zeroshot_loss": zs.heldout_loss,
                    "zeroshot_loss_per_example": zs.heldout_loss_per_example,
                    "zeroshot_rouge_l": zs.rouge_l,
                    "zeroshot_exact_match": zs.exact_match,
                }
            )
            self.recorder.record_generations(
                server_round, "zeroshot", self._zeroshot.gen_prompts, self._zeroshot.gen_refs, zs.generations
            )
        row["eval_s"] = round(time.perf_counter() - t0, 3)
        return row

    # -- checkpoint ----------------------------------------------------------------------------
    def _save(self, server_round: int) -> None:
        loop: dict[str, int | float | str | bool] = {
            "run_key": self.run_key,
            "failed_streak": self.failed_streak,
            "stop_reason": self.stop_reason,
        }
        save_checkpoint(self.run_dir, Checkpoint(server_round, self.setup.server.state_dict(), loop))

    def _restore(self) -> int:
        ckpt = load_checkpoint(self.run_dir)
        self.setup.server.load_state_dict(ckpt.server_state)
        self.run_key = str(ckpt.loop_state.get("run_key", ""))
        self.failed_streak = int(ckpt.loop_state.get("failed_streak", 0))
        # A resume asks to go on: a run that had ended early (no live nodes, failed rounds) tries again.
        self.stop_reason = ""
        self.recorder.restore(up_to_round=ckpt.server_round)
        return ckpt.server_round

    # -- one round -----------------------------------------------------------------------------
    def _round(self, server_round: int) -> dict[str, MetricValue] | None:
        t0 = time.perf_counter()
        if server_round == self._first_round:
            self.recorder.note("waiting for clients to connect and report their ids")
        clients = self.sampler.sample(self.transport, server_round)
        if clients is None:
            self.stop_reason = (
                f"round {server_round}: fewer than {self.setup.min_replies} live clients after "
                f"{self.cfg.federation.node_wait_s:.0f} s (federation.node-wait-s)"
            )
            return None

        def on_reply(reply: NodeReply, done: int, total: int) -> None:
            status = "error" if reply.error is not None else "reply"
            self.recorder.note(
                f"round {server_round}: {status} from client {reply.node_id} ({done}/{total}, "
                f"{time.perf_counter() - t0:.1f} s)"
            )

        if self.cfg.secagg.enabled:
            from fedtune.runtime.secure import SecureRound

            secure = SecureRound(self.cfg, self.setup.server, self.transport, note=self.recorder.note)
            ex = secure.run(
                server_round, clients, self.run_key, min_replies=self.setup.min_replies, on_reply=on_reply
            )
            outcome, payloads = ex.outcome, ex.payloads
            row = self._row(outcome, payloads, ex.replies, [], [])
            # every stage's payloads per client, next to payload_bytes_* (the algorithm's own)
            for key, counts in (("secagg_bytes_down", ex.bytes_down), ("secagg_bytes_up", ex.bytes_up)):
                row[key] = float(np.mean(list(counts.values()))) if counts else float("nan")
            row.update({f"secagg_{k}_s": v for k, v in ex.stage_s.items()})
        else:
            payloads = self.setup.server.configure(server_round, clients)
            self.recorder.note(f"round {server_round}: training on clients {sorted(payloads)}")
            request = RoundRequest(server_round, payloads, self.run_key, self.cfg.federation.round_timeout_s)
            exchange = self.transport.exchange(request, on_reply)
            outcome = self.setup.server.aggregate(
                server_round, exchange.replies, min_replies=self.setup.min_replies
            )
            row = self._row(
                outcome, payloads, exchange.replies, exchange.message_bytes_down, exchange.message_bytes_up
            )
        row["round_s"] = round(time.perf_counter() - t0, 3)
        if outcome.applied:
            self.failed_streak = 0
            row.update(self._evaluate(server_round))
        else:
            self.failed_streak += 1
            log.error("round %d skipped: %s", server_round, outcome.note)
            if self.failed_streak >= self.cfg.federation.max_failed_rounds:
                self.stop_reason = (
                    f"{self.failed_streak} rounds in a row could not be aggregated "
                    f"(federation.max-failed-rounds); last: {outcome.note}"
                )
        return row

    @staticmethod
    def _row(
        outcome: RoundOutcome,
        payloads: dict[int, bytes],
        replies: list[NodeReply],
        down: list[int],
        up: list[int],
    ) -> dict[str, MetricValue]:
        ups = [len(r.payload) for r in replies if r.payload is not None]

        def mean(values: list[int]) -> float:
            return float(np.mean(values)) if values else float("nan")

        row: dict[str, MetricValue] = {
            "round": outcome.server_round,
            "applied": outcome.applied,
            "accepted": len(outcome.accepted),
            "rejected": len(outcome.rejected),
            "payload_bytes_down": mean([len(p) for p in payloads.values()]),
            "payload_bytes_up": mean(ups),
            "message_bytes_down": mean(down),
            "message_bytes_up": mean(up),
        }
        row.update(outcome.metrics)
        if outcome.rejected:
            row["rejections"] = "; ".join(f"{r.node_id}: {r.reason}" for r in outcome.rejected)[:2000]
        if outcome.note:
            row["note"] = outcome.note
        return row

    # -- the run -------------------------------------------------------------------------------
    def run(self) -> dict[str, MetricValue]:
        server = self.setup.server
        fed = self.cfg.federation
        if self.resume:
            start = self._restore() + 1
            self._first_round = start
            self.recorder.note(f"resuming {self.run_dir} at round {start}")
        else:
            self.run_key = uuid.uuid4().hex  # fixed length: message sizes do not depend on it
            self.recorder.note(f"{server.describe()}; run folder {self.run_dir}")
            self.recorder.record({"round": 0, **self._evaluate(0)})
            self._save(0)
            start = 1
        stopped = False
        try:
            for server_round in range(start, fed.num_rounds + 1):
                if self.stop_reason:
                    break
                row = self._round(server_round)
                if row is None:
                    break
                self.recorder.record(row)
                self._save(server_round)
                if self.stop_after is not None and server_round >= self.stop_after:
                    stopped = True
                    break
        finally:
            server.close()
        if self.stop_reason:
            log.error("ending the run cleanly: %s", self.stop_reason)
        extra: dict[str, MetricValue] = {
            "completed_rounds": sum(1 for r in self.recorder.records if r.get("applied") is True),
            "stopped_early": bool(self.stop_reason),
        }
        if self.stop_reason:
            extra["stop_reason"] = self.stop_reason
        if stopped:
            extra["interrupted"] = True
        return self.recorder.finish(extra)
