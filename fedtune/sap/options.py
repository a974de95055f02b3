"""The options of split-and-privatize LoRA (``[algorithm.options]`` with ``run.algorithm = "sap"``).

A frozen dataclass checked in ``__post_init__``: every bad value is a ``ValueError`` naming the
option and the fix, raised before any model loads or any port opens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

TASKS = ("classification", "causal-lm")
VARIANTS = ("embedding", "text")
ADAPTERS = ("shared", "per-client")
WIRE_DTYPES = ("float32", "float16")
DENOISERS = ("none", "posterior-mean")  # fedtune.sap.denoise


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _one_of(key: str, value: str, options: tuple[str, ...]) -> None:
    _require(value in options, f"algorithm.options.{key} = {value!r} is not one of {', '.join(options)}")


@dataclass(frozen=True)
class SAPOptions:
    """What the split, the privatizer, the trunk's training and the channel do.

    task: ``classification`` (an encoder such as MiniLM; classes from the task's answers) or
    ``causal-lm`` (a decoder such as SmolLM2; loss on the answer tokens). depth: blocks the client
    runs (0 = the token embedding layer only). variant: ``embedding`` (noised representations
    cross the wire) or ``text`` (each noised embedding is snapped to its nearest vocabulary token
    and only token ids cross; depth 0 only). u_shaped: the task head and the labels stay on the
    client; the server returns trunk outputs and receives their gradients. privatize/eta:
    d_chi-privacy noise with density ~ exp(-eta * ||n||) per non-pad token (larger eta, less noise;
    E||n|| = d / eta). cti: per-token eta from the client's own label statistics (contributing-token
    identification), ``cti_floor`` the least multiple of eta a token gets. denoise: what the server
    does to noised token embeddings before its trunk (``posterior-mean``: their expected vocabulary
    embedding under the mechanism, post-processing that keeps the guarantee; embedding split only).
    adapters: one trunk adapter for every client (``shared``) or one per client (``per-client``).
    local_steps/batch_size/lr: per client per round (AdamW on the trunk's LoRA and the head). classes:
    comma-separated class names (empty: the held-out split's answers, sorted). wire_dtype: the
    dtype activations travel in. split_host/split_port: where the split server listens (port 0 =
    any free port); advertise_host: the host clients dial (empty = split_host). tls_cert/tls_key/
    tls_ca: PEM files; all three turn on TLS for the split channel. step_timeout_s: the longest a
    client waits for one step's reply.
    """

    task: str = "classification"
    depth: int = 0
    variant: str = "embedding"
    u_shaped: bool = False
    privatize: bool = True
    eta: float = 100.0
    cti: bool = False
    cti_floor: float = 0.6
    denoise: str = "none"
    adapters: str = "shared"
    local_steps: int = 10
    batch_size: int = 16
    lr: float = 5e-4
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_targets: str = ""
    classes: str = ""
    wire_dtype: str = "float32"
    split_host: str = "127.0.0.1"
    split_port: int = 0
    advertise_host: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    step_timeout_s: float = 300.0
    dp_cut_clip: float = 0.0

    def __post_init__(self) -> None:
        _one_of("task", self.task, TASKS)
        _one_of("variant", self.variant, VARIANTS)
        _one_of("adapters", self.adapters, ADAPTERS)
        _one_of("wire-dtype", self.wire_dtype, WIRE_DTYPES)
        _one_of("denoise", self.denoise, DENOISERS)
        _require(
            self.denoise == "none" or (self.privatize and self.variant == "embedding" and self.depth == 0),
            "algorithm.options.denoise = 'posterior-mean' denoises d_chi-noised token embeddings, so it "
            "needs privatize = true, variant = 'embedding' and depth = 0",
        )
        _require(self.depth >= 0, "algorithm.options.depth must be >= 0 (0 = the embedding layer only)")
        _require(
            self.variant != "text" or self.depth == 0,
            "algorithm.options.variant = 'text' snaps noised token embeddings to vocabulary tokens, "
            "so it needs depth = 0",
        )
        _require(
            math.isfinite(self.eta) and self.eta > 0,
            "algorithm.options.eta must be a finite number > 0 (larger = less noise); "
            "set privatize = false to send unprivatized representations",
        )
        _require(not (self.cti and not self.privatize), "algorithm.options.cti needs privatize = true")
        _require(self.cti_floor > 0, "algorithm.options.cti-floor must be > 0 (the SAP SDK uses 0.6)")
        _require(self.local_steps >= 1, "algorithm.options.local-steps must be >= 1")
        _require(1 <= self.batch_size <= 4096, "algorithm.options.batch-size must be in [1, 4096]")
        _require(0 < self.lr < 1, "algorithm.options.lr must be in (0, 1)")
        _require(self.lora_rank >= 1, "algorithm.options.lora-rank must be >= 1")
        _require(self.lora_alpha >= 1, "algorithm.options.lora-alpha must be >= 1")
        _require(0 <= self.split_port <= 65535, "algorithm.options.split-port must be in [0, 65535]")
        _require(bool(self.split_host), "algorithm.options.split-host must name an interface, e.g. 127.0.0.1")
        _require(self.step_timeout_s > 0, "algorithm.options.step-timeout-s must be > 0 seconds")
        _require(
            math.isfinite(self.dp_cut_clip) and self.dp_cut_clip >= 0,
            "algorithm.options.dp-cut-clip must be a finite bound >= 0 (0 = privacy.clip)",
        )
        tls = (self.tls_cert, self.tls_key, self.tls_ca)
        _require(
            all(tls) or not any(tls),
            "algorithm.options tls-cert, tls-key and tls-ca go together: set all three or none",
        )
        for key, path in (("tls-cert", self.tls_cert), ("tls-key", self.tls_key), ("tls-ca", self.tls_ca)):
            _require(
                not path or Path(path).is_file(),
                f"algorithm.options.{key} = {path!r} is not a file; "
                "create test certificates with `python scripts/make_test_certs.py`",
            )
        if self.classes:
            names = self.class_names
            _require(
                len(names) >= 2 and len(set(names)) == len(names) and all(names),
                f"algorithm.options.classes = {self.classes!r} must list >= 2 distinct names, "
                "comma-separated",
            )
        _require(
            not (self.classes and self.task != "classification"),
            "algorithm.options.classes applies to task = 'classification' only",
        )

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(c.strip() for c in self.classes.split(",")) if self.classes else ()

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    @property
    def denoise_eta(self) -> float:
        """The eta the server's posterior assumes: the client's per-token etas are private under CTI, so
        it takes the floor's, ``eta * cti_floor``, the level most tokens get (with the SDK's formula,
        97% of the held-out review tokens of a 1,000-review client sit at the floor; docs/sap.md)."""
        return self.eta * self.cti_floor if self.cti else self.eta
