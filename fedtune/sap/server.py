"""The server half of split-and-privatize LoRA: the trunk, the split channel, round bookkeeping.

Per round :meth:`SAPServer.configure` opens one stream per sampled client (a fresh id and a
32-byte random token, valid for that round only) and returns the payload telling the client
where to connect. While the run loop waits for the round's Flower replies, the clients train the
trunk over the channel. :meth:`SAPServer.aggregate` then revokes every token, checks each reply
against what the server itself saw on that stream, averages the clients' heads (U-shaped
classification) through the configured aggregator, and commits the round, or rolls the trunk
back if the round cannot be aggregated.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import datasets
import numpy as np
import numpy.typing as npt
import torch

from fedtune.aggregators.base import Aggregator, ClientUpdate, StateValue
from fedtune.algorithms.base import NodeReply, RoundOutcome, ServerAlgorithm
from fedtune.algorithms.rounds import RoundBook, under_prefix, with_prefix
from fedtune.assets.models import load_tokenizer
from fedtune.config import RunConfig
from fedtune.data.tasks import build_task
from fedtune.runlog import MetricValue
from fedtune.sap.batches import SplitExamples
from fedtune.sap.channel import ServerTLS, SplitChannelServer
from fedtune.sap.codec import SplitReplyPayload, SplitRoundPayload, decode_split_reply, encode_split_round
from fedtune.sap.denoise import PosteriorMeanDenoiser
from fedtune.sap.dp import SAPServerPrivacy
from fedtune.sap.encode import ClientEncoder
from fedtune.sap.options import SAPOptions
from fedtune.sap.privatizer import DChiPrivatizer
from fedtune.sap.service import ModelShape, SplitService, StreamSession
from fedtune.sap.split import ClassifierHead, build_split
from fedtune.sap.trunk import SHARED, TrunkTrainer, add_trunk_lora
from fedtune.wire.codec import PayloadError
from fedtune.wire.dp_report import DPFigures

log = logging.getLogger(__name__)
STATE_VERSION = 1
MAX_CLASSES = 100
EVAL_BATCH = 64
HeadArrays = dict[str, npt.NDArray[np.float32]]


def class_names_for(cfg: RunConfig, opts: SAPOptions) -> tuple[str, ...]:
    """The classes, in id order: the option, or the task's distinct answers (sorted)."""
    if opts.task != "classification":
        return ()
    if opts.class_names:
        return opts.class_names
    try:
        answers = sorted({str(a) for a in build_task(cfg.data.task, seed=cfg.run.seed)["answer"]})
    except (ValueError, OSError) as exc:
        raise ValueError(
            f"cannot read the classes from data.task = {cfg.data.task!r} ({exc}); "
            "list them in algorithm.options.classes"
        ) from exc
    if not 2 <= len(answers) <= MAX_CLASSES:
        raise ValueError(
            f"data.task = {cfg.data.task!r} has {len(answers)} distinct answers; a classification task "
            f"needs 2..{MAX_CLASSES} (use task = 'causal-lm' for open answers)"
        )
    return tuple(answers)


class SAPServer(ServerAlgorithm):
    """Trunk with LoRA (shared or per-client adapters), the split channel, and the global head."""

    def __init__(self, cfg: RunConfig, opts: SAPOptions, aggregator: Aggregator) -> None:
        self.cfg, self.opts, self.aggregator = cfg, opts, aggregator
        self.class_names = class_names_for(cfg, opts)
        parts = build_split(
            cfg.model.name,
            opts.task,
            opts.depth,
            num_layers=cfg.model.num_layers or None,
            num_classes=len(self.class_names),
            seed=cfg.run.seed,
        )
        trunk = add_trunk_lora(
            parts.trunk, rank=opts.lora_rank, alpha=opts.lora_alpha, targets=opts.targets, seed=cfg.run.seed
        )
        self.bottom, self.head = parts.bottom, parts.head
        if opts.denoise == "posterior-mean":
            trunk.denoise_inputs(PosteriorMeanDenoiser(self.bottom.embedding_matrix, opts.denoise_eta))
        # Standard split: the head trains with the trunk. U-shaped: the clients hold it; the
        # server keeps the aggregated copy for its own evaluation.
        self.trainer = TrunkTrainer(trunk, None if opts.u_shaped else parts.head, lr=opts.lr)
        self.client_head: HeadArrays = (
            parts.head.arrays() if opts.u_shaped and isinstance(parts.head, ClassifierHead) else {}
        )
        self.service = SplitService(
            self.trainer,
            ModelShape(
                hidden_size=trunk.hidden_size,
                vocab_size=int(self.bottom.embedding_matrix.shape[0]),
                num_classes=len(self.class_names),
                max_length=cfg.model.max_length,
                u_shaped=opts.u_shaped,
                token_ids=opts.variant == "text",
            ),
        )
        self.channel: SplitChannelServer | None = None
        self.address = ""
        self.completed_round = 0
        self._sent: tuple[int, set[int]] = (0, set())
        self.privacy = SAPServerPrivacy(cfg, opts) if cfg.privacy.enabled else None
        self._tokenizer = load_tokenizer(cfg.model.name)

    deterministic_payloads = False  # every round issues fresh stream ids and tokens

    @property
    def min_updates(self) -> int:
        return self.aggregator.min_clients if self.client_head else 1

    def describe(self) -> str:
        o = self.opts
        noise = f"eta {o.eta:g}{' with CTI' if o.cti else ''}" if o.privatize else "no privatization"
        if o.denoise != "none":
            noise += f", {o.denoise} denoising"
        shape = "U-shaped" if o.u_shaped else "standard"
        if self.privacy is not None:
            noise += f", label DP at clip {self.cfg.privacy.clip:g}"
        return (
            f"split-and-privatize LoRA: {o.task} split at depth {o.depth} ({shape}, {o.variant} variant, "
            f"{noise}), {o.adapters} trunk adapter(s), {len(self.trainer.params)} trainable tensors"
        )

    # -- channel -------------------------------------------------------------------------------
    def _start_channel(self) -> None:
        o = self.opts
        tls = ServerTLS(Path(o.tls_cert).read_bytes(), Path(o.tls_key).read_bytes()) if o.tls else None
        self.channel = SplitChannelServer(
            self.service,
            host=o.split_host,
            port=o.split_port,
            tls=tls,
            workers=max(8, self.cfg.federation.clients_per_round + 4),  # one per open stream, plus spare
            on_stream_end=self.service.on_stream_end,
        )
        bound = self.channel.start()
        port = bound.rsplit(":", 1)[1]
        self.address = f"{o.advertise_host or o.split_host}:{port}"
        log.info("split channel listening on %s (%s)", bound, "TLS" if tls else "plaintext")

    def close(self) -> None:
        if self.channel is not None:
            self.channel.stop()
            self.channel = None

    def _slot(self, node_id: int) -> str:
        return f"client-{node_id}" if self.opts.adapters == "per-client" else SHARED

    # -- rounds --------------------------------------------------------------------------------
    def configure(self, server_round: int, node_ids: Sequence[int]) -> dict[int, bytes]:
        if self.channel is None:
            self._start_channel()
        assert self.channel is not None  # for mypy: started just above
        self.channel.revoke_all()
        self.service.close_all()
        self.trainer.open_round()
        root = Path(self.opts.tls_ca).read_bytes() if self.opts.tls else b""
        payloads: dict[int, bytes] = {}
        for node in node_ids:
            stream_id = f"r{server_round}-c{node}-{secrets.token_hex(4)}"
            token = secrets.token_hex(32)
            self.service.open(StreamSession(stream_id, server_round, node, self._slot(node)))
            self.channel.authorize(stream_id, token)
            payloads[node] = encode_split_round(
                SplitRoundPayload(
                    server_round=server_round,
                    address=self.address,
                    stream_id=stream_id,
                    token=token,
                    steps=self.opts.local_steps,
                    batch_size=self.opts.batch_size,
                    class_names=self.class_names,
                    root_certificates=root,
                    head=self.client_head,
                )
            )
        self._sent = (server_round, set(node_ids))
        return payloads

    def _validate(self, reply: SplitReplyPayload, server_round: int, session: StreamSession | None) -> str:
        if reply.server_round != server_round:
            return f"reply is for round {reply.server_round}, expected {server_round}"
        if session is None:
            return "no stream was opened for this node this round"
        if reply.steps_done != session.steps_done:
            return f"reply claims {reply.steps_done} steps, the server ran {session.steps_done} on its stream"
        if self.privacy is not None:
            problem = self.privacy.check(reply.dp, reply.num_examples)
            if problem:
                return problem
        elif reply.dp is not None:
            return "the reply carries DP figures, but this run has privacy off"
        if set(reply.head) != set(self.client_head):
            return (
                f"head arrays {sorted(reply.head)} differ from the global head's {sorted(self.client_head)}"
            )
        for name, ref in self.client_head.items():
            if reply.head[name].shape != ref.shape:
                return f"head array {name} has shape {reply.head[name].shape}, expected {ref.shape}"
        return ""

    def aggregate(self, server_round: int, replies: Sequence[NodeReply], *, min_replies: int) -> RoundOutcome:
        if self.channel is not None:
            self.channel.revoke_all()  # the round is over: no straggler may train the trunk now
        sessions = {
            s.client_id: s for s in self.service.close_all().values() if s.server_round == server_round
        }
        sent_round, sent = self._sent
        book = RoundBook(server_round, expected=sent if sent_round == server_round else set())
        accepted: list[SplitReplyPayload] = []
        released: dict[int, DPFigures] = {}
        for r in replies:
            payload = book.admit(r)
            if payload is None:
                continue
            try:
                res = decode_split_reply(payload)
            except PayloadError as exc:
                book.reject(r.node_id, f"malformed payload: {exc}")
                continue
            problem = self._validate(res, server_round, sessions.get(r.node_id))
            if problem:
                book.reject(r.node_id, problem)
                continue
            if res.dp is not None:
                released[r.node_id] = res.dp
            deltas = {k: (res.head[k] - ref).astype(np.float32) for k, ref in self.client_head.items()}
            if not deltas:  # nothing to aggregate: the book keeps the step count (never averaged)
                deltas = {"steps_done": np.array([res.steps_done], np.float32)}
            book.accept(
                ClientUpdate(r.node_id, res.num_examples, deltas),
                train_loss=res.train_loss,
                peak_memory_mb=res.peak_memory_mb,
            )
            accepted.append(res)
        metrics = dict(book.metrics())
        metrics.update(self._channel_metrics(accepted))
        metrics["trunk_steps"] = sum(s.steps_done for s in sessions.values())
        if self.privacy is not None:  # released is released, whether or not the round applies
            self.privacy.record(released)
            metrics.update(self.privacy.metrics())
        note = self._apply(book, min_replies)
        if note:
            self.trainer.rollback_round()
            return book.outcome(metrics, note=note)
        self.trainer.commit_round()
        self.completed_round = server_round
        return book.outcome(metrics)

    def _apply(self, book: RoundBook, min_replies: int) -> str:
        if not self.client_head:
            need = max(1, min_replies)
            return (
                ""
                if len(book.accepted) >= need
                else f"{len(book.accepted)} valid replies, fewer than the {need} needed"
            )
        glob = book.aggregate(
            self.aggregator,
            min_replies=min_replies,
            shapes={k: v.shape for k, v in self.client_head.items()},
            max_weight_ratio=self.cfg.aggregator.max_weight_ratio,
        )
        if isinstance(glob, str):
            return glob
        self.client_head = {
            k: (ref + np.asarray(glob.arrays[k], np.float32)).astype(np.float32)
            for k, ref in self.client_head.items()
        }
        return ""

    @staticmethod
    def _channel_metrics(accepted: list[SplitReplyPayload]) -> dict[str, float]:
        def mean(key: str) -> float:
            return float(np.mean([getattr(r, key) for r in accepted])) if accepted else float("nan")

        return {
            "split_bytes_up_per_step": mean("bytes_up_per_step"),
            "split_bytes_down_per_step": mean("bytes_down_per_step"),
            "split_step_ms": mean("step_ms"),
            "noised_norm": mean("noised_norm"),
            "noise_norm": mean("noise_norm"),
        }

    # -- evaluation ----------------------------------------------------------------------------
    def evaluate(self, heldout: datasets.Dataset) -> Mapping[str, MetricValue]:
        """Held-out loss (and accuracy) on inputs privatized as an inference client without CTI sends them."""
        t0 = time.perf_counter()
        examples = SplitExamples(
            heldout,
            self._tokenizer,
            task=self.opts.task,
            class_names=self.class_names,
            max_length=self.cfg.model.max_length,
            template=self.cfg.data.prompt_template,
        )
        privatizer = DChiPrivatizer(self.opts.eta) if self.opts.privatize else None
        encoder = ClientEncoder(self.bottom, privatizer, text=self.opts.variant == "text")
        slots = [s for s in self.trainer.slots if s != SHARED] if self.opts.adapters == "per-client" else []
        losses, accs = [], []
        for slot in slots or [SHARED]:
            loss, acc = self._score(slot, examples, encoder)
            losses.append(loss)
            accs.append(acc)
        out: dict[str, MetricValue] = {"heldout_loss": float(np.mean(losses))}
        if self.opts.task == "classification":
            out["heldout_accuracy"] = float(np.mean(accs))
        out["eval_s"] = round(time.perf_counter() - t0, 3)
        return out

    def _score(self, slot: str, examples: SplitExamples, encoder: ClientEncoder) -> tuple[float, float]:
        total_loss, correct, count = 0.0, 0, 0
        head = self.head
        if isinstance(head, ClassifierHead) and self.client_head:
            head = ClassifierHead(head.linear.in_features, head.linear.out_features, seed=0)
            head.load_arrays(self.client_head)
        for batch in examples.chunks(EVAL_BATCH):
            x = encoder(batch, labelled=False).inputs
            with torch.no_grad():
                feats = self.trainer.features(slot, x, batch.attention_mask)
                loss = float(head.loss(feats, batch.targets))
                n = int(batch.input_ids.shape[0])
                total_loss += loss * n
                count += n
                if isinstance(head, ClassifierHead):
                    correct += int((head.predict(feats) == batch.targets).sum())
        return total_loss / count, correct / count

    # -- export --------------------------------------------------------------------------------
    def export(self, out_dir: Path) -> None:
        """Per adapter: a peft adapter folder for the trunk and the head as safetensors; plus
        ``split.json`` (where the model is cut and what the head predicts)."""
        from safetensors.numpy import save_file

        slots = sorted(self.trainer.slots) or [SHARED]
        for slot in slots:
            folder = out_dir / slot
            folder.mkdir(parents=True, exist_ok=True)
            with self.trainer.lock:
                self.trainer.use(slot)  # the slot's weights into the trunk (and the server's head)
                self.trainer.trunk.base.save_pretrained(str(folder))  # type: ignore[operator]
                head = self.client_head or (
                    self.head.arrays() if isinstance(self.head, ClassifierHead) else {}
                )
                if head:
                    save_file(
                        {k: np.ascontiguousarray(v) for k, v in head.items()},
                        str(folder / "head.safetensors"),
                    )
        info = {
            "model": self.cfg.model.name,
            "num_layers": self.cfg.model.num_layers,
            "task": self.opts.task,
            "depth": self.opts.depth,
            "u_shaped": self.opts.u_shaped,
            "classes": list(self.class_names),
            "adapters": slots,
        }
        (out_dir / "split.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        self._tokenizer.save_pretrained(out_dir)

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, StateValue]:
        state: dict[str, StateValue] = {"version": STATE_VERSION, "completed_round": self.completed_round}
        state.update(with_prefix("trunk", self.trainer.state_dict()))
        state.update(with_prefix("head", {k: v.copy() for k, v in self.client_head.items()}))
        state.update(with_prefix("agg", self.aggregator.state_dict()))
        if self.privacy is not None:
            state.update(self.privacy.state_dict())
        return state

    def load_state_dict(self, state: Mapping[str, StateValue]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"split-and-privatize state version {state.get('version')!r} is not {STATE_VERSION}"
            )
        head: HeadArrays = {}
        for name, ref in self.client_head.items():
            arr = np.asarray(state.get(f"head.{name}"), dtype=np.float32)
            if arr.shape != ref.shape or not np.isfinite(arr).all():
                raise ValueError(f"checkpoint head {name} has shape {arr.shape} or non-finite values")
            head[name] = arr.copy()
        ledger = None if self.privacy is None else self.privacy.ledger_from_state(state)
        self.trainer.load_state_dict(under_prefix("trunk", state))
        self.aggregator.load_state_dict(under_prefix("agg", state))
        self.client_head = head
        if self.privacy is not None and ledger is not None:
            self.privacy.ledger = ledger
        self.completed_round = int(state["completed_round"])  # type: ignore[arg-type]
