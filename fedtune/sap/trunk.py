"""The split server's trainable state: the trunk's LoRA (and, in the standard split, the head),
in one slot per adapter, with round-level commit and rollback.

A slot is one adapter's weights and its own AdamW (``shared``: one slot every client trains;
``per-client``: one per client, all starting from the same keyed initial adapter). Every step
runs under one lock and either completes (forward, backward, optimizer step, slot saved) or
leaves no trace, so a client that vanishes mid-step never leaves the trunk half-updated. The run
loop's contract, "a round that cannot be aggregated leaves the state as it was", is kept by a
snapshot taken when a round opens and restored if it is skipped.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from fedtune.aggregators.base import StateValue
from fedtune.lora.fedit import init_lora_weights
from fedtune.sap.split import DEFAULT_TARGETS, Head, Trunk

SHARED = "shared"
_ADAM_KEYS = ("step", "exp_avg", "exp_avg_sq")


def add_trunk_lora(trunk: Trunk, *, rank: int, alpha: int, targets: tuple[str, ...], seed: int) -> Trunk:
    """peft LoRA on the trunk's attention projections (the SAP recommendation: q/v), keyed init."""
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=list(targets or DEFAULT_TARGETS[trunk.family]),
    )
    with torch.random.fork_rng(devices=[]):  # peft's own init reads the global RNG
        trunk.base = get_peft_model(trunk.base, config)  # type: ignore[arg-type]
    init_lora_weights(trunk, seed=seed)
    return trunk


@dataclass
class _Slot:
    weights: dict[str, torch.Tensor]
    optimizer: torch.optim.AdamW
    steps: int = 0


class TrunkTrainer:
    """Trainable parameters of the trunk (+ head), one slot per adapter, every step under a lock."""

    def __init__(self, trunk: Trunk, head: Head | None, *, lr: float) -> None:
        self.trunk, self.head, self.lr = trunk, head, lr
        modules: dict[str, nn.Module] = {"trunk": trunk}
        if head is not None:
            modules["head"] = head
        self.module = nn.ModuleDict(modules)
        self.module.eval()  # dropout off: deterministic steps that never read the global RNG
        self.params = {n: p for n, p in self.module.named_parameters() if p.requires_grad}
        if not self.params:
            raise ValueError("the trunk has no trainable parameters; add LoRA before training it")
        self.initial = {n: p.detach().clone() for n, p in self.params.items()}
        self.slots: dict[str, _Slot] = {}
        self._active: str | None = None
        self._snapshot: dict[str, tuple[dict[str, torch.Tensor], dict[str, Any], int]] | None = None
        self.lock = threading.RLock()

    # -- slots ---------------------------------------------------------------------------------
    def _new_slot(self) -> _Slot:
        weights = {n: w.clone() for n, w in self.initial.items()}
        return _Slot(weights, torch.optim.AdamW(list(self.params.values()), lr=self.lr, weight_decay=0.0))

    def slot(self, name: str) -> _Slot:
        with self.lock:
            if name not in self.slots:
                self.slots[name] = self._new_slot()
            return self.slots[name]

    def _activate(self, name: str) -> _Slot:
        slot = self.slot(name)
        if self._active != name:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(slot.weights[n])
            self._active = name
        return slot

    def use(self, name: str) -> None:
        """Load slot ``name``'s weights into the modules (for export); hold :attr:`lock` around use."""
        with self.lock:
            self._activate(name)

    def _save_active(self, slot: _Slot) -> None:
        with torch.no_grad():
            for n, p in self.params.items():
                slot.weights[n].copy_(p)
        slot.steps += 1

    # -- steps ---------------------------------------------------------------------------------
    def train_step(self, name: str, x: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> float:
        """Standard split: forward, loss on the server's head, backward, AdamW step."""
        if self.head is None:
            raise ValueError("this trunk has no head (U-shaped split): the client computes the loss")
        with self.lock:
            slot = self._activate(name)
            return self._step(slot, lambda: self.head.loss(self.trunk(x, mask), labels))  # type: ignore[union-attr]

    def backward_step(self, name: str, x: torch.Tensor, mask: torch.Tensor, upstream: torch.Tensor) -> None:
        """U-shaped split: re-run the forward and back-propagate the client's dLoss/d(trunk output).

        The forward is recomputed rather than kept from the client's TRAIN request, so no
        autograd graph outlives a request and a dropped client leaves nothing behind.
        """
        with self.lock:
            slot = self._activate(name)
            self._step(slot, lambda: (self.trunk(x, mask).float() * upstream).sum())

    def _step(self, slot: _Slot, objective: Callable[[], torch.Tensor]) -> float:
        slot.optimizer.zero_grad(set_to_none=True)
        try:
            value = objective()
            if not torch.isfinite(value):
                raise ValueError(
                    f"the step's objective is {float(value.detach())}; the inputs are not usable"
                )
            value.backward()  # type: ignore[no-untyped-call]
        except Exception:
            slot.optimizer.zero_grad(set_to_none=True)
            raise
        slot.optimizer.step()
        self._save_active(slot)
        return float(value.detach())

    @torch.no_grad()
    def features(self, name: str, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Trunk output with slot ``name``'s weights; no state change."""
        with self.lock:
            self._activate(name)
            out: torch.Tensor = self.trunk(x, mask)
            return out.float()

    @torch.no_grad()
    def predict(self, name: str, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            raise ValueError("this trunk has no head (U-shaped split): predictions are made on the client")
        with self.lock:
            self._activate(name)
            return self.head.predict(self.trunk(x, mask))

    @torch.no_grad()
    def evaluate(
        self, name: str, x: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
    ) -> tuple[float, torch.Tensor]:
        """(loss, predictions) of the standard split on one batch; no state change."""
        if self.head is None:
            raise ValueError("this trunk has no head")
        with self.lock:
            self._activate(name)
            feats = self.trunk(x, mask)
            return float(self.head.loss(feats, labels)), self.head.predict(feats)

    # -- rounds --------------------------------------------------------------------------------
    def open_round(self) -> None:
        """Snapshot every slot, so a skipped round can be undone."""
        with self.lock:
            self._snapshot = {
                name: (
                    {n: w.clone() for n, w in s.weights.items()},
                    copy.deepcopy(s.optimizer.state_dict()),
                    s.steps,
                )
                for name, s in self.slots.items()
            }

    def commit_round(self) -> None:
        with self.lock:
            self._snapshot = None

    def rollback_round(self) -> None:
        """Back to the last :meth:`open_round` (slots created since then are dropped)."""
        with self.lock:
            if self._snapshot is None:
                return
            for name in list(self.slots):
                if name not in self._snapshot:
                    del self.slots[name]
            for name, (weights, opt_state, steps) in self._snapshot.items():
                slot = self.slot(name)
                for n, w in weights.items():
                    slot.weights[n].copy_(w)
                slot.optimizer.load_state_dict(opt_state)
                slot.steps = steps
            self._active = None
            self._snapshot = None

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, StateValue]:
        """Arrays and scalars only: weights, AdamW moments and step counts of every slot."""
        with self.lock:
            state: dict[str, StateValue] = {"slots": "\n".join(self.slots), "params": "\n".join(self.params)}
            for name, slot in self.slots.items():
                state[f"{name}.steps"] = slot.steps
                for n, w in slot.weights.items():
                    state[f"{name}.w.{n}"] = w.numpy().copy()
                for i, entry in slot.optimizer.state_dict()["state"].items():
                    for key in _ADAM_KEYS:
                        if key in entry:
                            state[f"{name}.opt.{i}.{key}"] = torch.as_tensor(entry[key]).numpy().copy()
            return state

    def load_state_dict(self, state: Mapping[str, StateValue]) -> None:
        """Restore :meth:`state_dict`; everything is checked before anything changes."""
        if str(state.get("params", "")) != "\n".join(self.params):
            raise ValueError(
                "the checkpoint's trunk parameters differ from this run's; "
                "resume with the same model and options"
            )
        names = [s for s in str(state.get("slots", "")).split("\n") if s]
        built: dict[str, _Slot] = {}
        for name in names:
            slot = self._new_slot()
            for n, ref in self.initial.items():
                arr = np.asarray(state[f"{name}.w.{n}"], dtype=np.float32)
                if arr.shape != tuple(ref.shape) or not np.isfinite(arr).all():
                    raise ValueError(
                        f"checkpoint weight {name}.{n} has shape {arr.shape} or non-finite values"
                    )
                slot.weights[n] = torch.from_numpy(arr.copy())
            opt_state = slot.optimizer.state_dict()
            entries: dict[int, dict[str, torch.Tensor]] = {}
            for i, ref in enumerate(self.initial.values()):
                if f"{name}.opt.{i}.step" not in state:
                    continue
                entry = {
                    key: torch.from_numpy(np.array(state[f"{name}.opt.{i}.{key}"], dtype=np.float32))
                    for key in _ADAM_KEYS
                }
                if entry["exp_avg"].shape != ref.shape or entry["exp_avg_sq"].shape != ref.shape:
                    raise ValueError(f"checkpoint optimizer state {name}.{i} does not match parameter shapes")
                entries[i] = entry
            opt_state["state"] = entries
            slot.optimizer.load_state_dict(opt_state)
            slot.steps = int(state[f"{name}.steps"])  # type: ignore[arg-type]
            built[name] = slot
        with self.lock:
            self.slots = built
            self._active = None
            self._snapshot = None
