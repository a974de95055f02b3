"""Typed run configuration.

The frozen dataclasses below are the source of truth. TOML files in ``simulations/`` and the
``[tool.flwr.app.config]`` table in ``pyproject.toml`` are only their serialized form: one table per
section, kebab-case keys. Flower flattens nested tables into dotted keys, so ``zo.lr`` is both the
TOML key ``lr`` under ``[zo]`` and the Flower override ``--run-config "zo.lr=1e-6"``.
Unknown keys are rejected, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

# The serialized forms live in config_toml; their helpers stay importable from here.
from fedtune.config_toml import Scalar as Scalar
from fedtune.config_toml import flatten as flatten
from fedtune.config_toml import parse_override as parse_override
from fedtune.config_toml import parse_overrides as parse_overrides
from fedtune.config_toml import section_from
from fedtune.config_toml import toml_value as toml_value

# An ``[x.options]`` table, frozen: (kebab-case key, value) pairs in key order.
Options = tuple[tuple[str, Scalar], ...]
PARTITIONS = ("iid", "dirichlet", "group")
PERTURBATIONS = ("gaussian", "rademacher")
TUNE_MODES = ("all", "no-embeddings")
CACHE_Z = ("auto", "always", "never")
LR_SCHEDULES = ("constant", "cosine")
SAMPLING = ("shuffle", "class-balanced")
PROMPT_TEMPLATES = ("chat", "alpaca")  # fedtune.data.prompts.PROMPT_TEMPLATES (config stays import-light)
SCALAR_DTYPES = ("float32", "float16")
DP_MECHANISMS = ("none", "sample", "client")
ACCOUNTANTS = ("rdp", "prv")
NOISE_AT = ("client", "server")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _choice(section: str, key: str, value: str, options: tuple[str, ...]) -> None:
    _require(
        value in options, f"{section}.{key} = {value!r} is not one of {', '.join(options)}; pick one of them"
    )


@dataclass(frozen=True)
class RunSection:
    """``[run]``: identity of the run.

    name: label used for the output folder. seed: the run seed from which every generator (seed
    pool, client sampling, data order) derives. algorithm: a registered algorithm (fedkseed,
    fedkseed-pro, lora-fedavg, sap) or ``"package.module:Class"``; its own options go in
    ``[algorithm.options]``. output_dir: where run folders (metrics.jsonl, plots, checkpoints) are
    written.
    """

    name: str = "fedkseed-demo"
    seed: int = 42
    algorithm: str = "fedkseed"
    output_dir: str = "runs"

    def __post_init__(self) -> None:
        _require(
            bool(self.name) and "/" not in self.name, "run.name must be a non-empty folder name without '/'"
        )
        _require(0 <= self.seed < 2**63, "run.seed must be a non-negative integer below 2**63")
        _require(
            bool(self.algorithm) and self.algorithm.strip() == self.algorithm,
            "run.algorithm must name a registered algorithm (fedkseed, fedkseed-pro, lora-fedavg, sap) "
            "or 'package.module:Class'",
        )


def is_device_spec(spec: str) -> bool:
    """Whether ``spec`` is a ``model.device`` value: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

    Only the form is checked here (config stays torch-free); :func:`fedtune.assets.device.resolve_device`
    checks that the device exists.
    """
    if spec in ("auto", "cpu", "cuda"):
        return True
    index = spec.removeprefix("cuda:")
    return index != spec and index.isascii() and index.isdigit()


@dataclass(frozen=True)
class ModelSection:
    """``[model]``: the model (a causal LM; split-and-privatize classification takes an encoder).

    name: a builtin asset (``smollm2-135m``, ``minilm-l6``) or a local Hugging Face model folder.
    num_layers: keep only the first N layers (0 keeps all; small values make fast tests). max_length: tokens
    per example, prompt truncated from the left. device: where FedKSeed and LoRA-FedAvg clients and the
    server's evaluator run forward passes, perturbations and replay: ``auto`` (the GPU when torch sees
    one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``. Perturbations are the same on every device, so
    CPU and GPU parties can share one run.
    """

    name: str = "smollm2-135m"
    num_layers: int = 0
    max_length: int = 96
    device: str = "auto"

    def __post_init__(self) -> None:
        _require(
            bool(self.name), "model.name must name a builtin model (smollm2-135m) or a local model folder"
        )
        _require(self.num_layers >= 0, "model.num_layers must be >= 0 (0 keeps every layer)")
        _require(8 <= self.max_length <= 8192, "model.max_length must be between 8 and 8192 tokens")
        _require(
            is_device_spec(self.device),
            f"model.device = {self.device!r} is not a device; use auto, cpu, cuda or cuda:N (N = GPU index)",
        )


@dataclass(frozen=True)
class DataSection:
    """``[data]``: task, split and partitioning.

    task: ``reviews`` (Rotten Tomatoes as review -> positive/negative), ``reviews-text`` (the same
    with the bare review as the prompt, for classifiers), ``qa`` (chatterbot Q/A),
    ``reviews+qa``, or a local json/jsonl/csv/parquet file. partition: iid, dirichlet (over labels,
    concentration ``alpha``) or group (by movie/category). max_train_examples caps the training pool
    (0 = no cap). heldout_size: server-side held-out examples for answer loss. eval_generations:
    how many held-out prompts are generated greedily for Rouge-L, with at most max_new_tokens.
    heldout_groups: comma-separated ``group`` values (QA/Dolly categories, tasks) held out for
    zero-shot evaluation ("" = none): their rows never reach a client, and up to heldout_size of
    them form the zero-shot split, scored like the held-out split but with up to
    zeroshot_max_new_tokens new tokens (128, the FedKSeed protocol for open generation).
    sampling: how a client draws its local batches: ``shuffle`` (plain shuffled passes over its
    own data, as the FedKSeed paper does) or ``class-balanced`` (round-robin over labels, which
    cancels the label skew of a Dirichlet split; an explicit choice, never the default).
    prompt_template: how prompts are formatted in training and evaluation: ``chat`` (the model's
    chat template) or ``alpaca`` (the Stanford Alpaca template the FedKSeed paper uses).
    """

    task: str = "reviews"
    partition: str = "dirichlet"
    alpha: float = 0.5
    max_train_examples: int = 2000
    heldout_size: int = 64
    eval_generations: int = 32
    max_new_tokens: int = 6
    sampling: str = "shuffle"
    prompt_template: str = "chat"
    heldout_groups: str = ""
    zeroshot_max_new_tokens: int = 128

    def __post_init__(self) -> None:
        _choice("data", "sampling", self.sampling, SAMPLING)
        _choice("data", "prompt_template", self.prompt_template, PROMPT_TEMPLATES)
        names = [g.strip() for g in self.heldout_groups.split(",")] if self.heldout_groups.strip() else []
        _require(
            all(names),
            f"data.heldout_groups = {self.heldout_groups!r} has an empty group name; "
            "write comma-separated names, e.g. 'history,science'",
        )
        _require(
            len(set(names)) == len(names),
            f"data.heldout_groups = {self.heldout_groups!r} names a group twice; list each once",
        )
        _require(
            1 <= self.zeroshot_max_new_tokens <= 2048,
            "data.zeroshot_max_new_tokens must be between 1 and 2048",
        )
        _require(
            bool(self.task), "data.task must be reviews, qa, reviews+qa or a path to a local dataset file"
        )
        _choice("data", "partition", self.partition, PARTITIONS)
        _require(self.alpha > 0, "data.alpha must be > 0 (smaller = more non-IID; 0.5 is common)")
        _require(self.max_train_examples >= 0, "data.max_train_examples must be >= 0 (0 = no cap)")
        _require(self.heldout_size >= 1, "data.heldout_size must be >= 1")
        _require(
            0 <= self.eval_generations <= self.heldout_size,
            "data.eval_generations must be between 0 and data.heldout_size",
        )
        _require(1 <= self.max_new_tokens <= 512, "data.max_new_tokens must be between 1 and 512")

    @property
    def heldout_group_names(self) -> tuple[str, ...]:
        """The groups of :attr:`heldout_groups`, stripped, in the order given."""
        if not self.heldout_groups.strip():
            return ()
        return tuple(g.strip() for g in self.heldout_groups.split(","))


@dataclass(frozen=True)
class FederationSection:
    """``[federation]``: clients and rounds.

    num_clients: simulated SuperNodes (one data partition each). clients_per_round: sampled per
    round. num_rounds: server rounds. min_replies: a round with fewer valid replies is skipped
    (state untouched). max_failed_rounds: that many skipped rounds in a row end the run cleanly.
    round_timeout_s: how long the server waits for replies. node_wait_s: how long a round waits
    for at least min_replies live nodes before the run ends cleanly (with fewer live nodes than
    clients_per_round but at least min_replies, the round samples those present).
    client_cpus/client_gpus: Ray resources per simulated client (2 CPUs = one client at a time on
    a 2-core machine, one model in memory).
    """

    num_clients: int = 10
    clients_per_round: int = 3
    num_rounds: int = 10
    min_replies: int = 1
    round_timeout_s: float = 3600.0
    node_wait_s: float = 300.0
    max_failed_rounds: int = 3
    client_cpus: int = 2
    client_gpus: float = 0.0

    def __post_init__(self) -> None:
        _require(self.num_clients >= 1, "federation.num_clients must be >= 1")
        _require(
            1 <= self.clients_per_round <= self.num_clients,
            "federation.clients_per_round must be between 1 and federation.num_clients",
        )
        _require(self.num_rounds >= 1, "federation.num_rounds must be >= 1")
        _require(
            1 <= self.min_replies <= self.clients_per_round,
            "federation.min_replies must be between 1 and federation.clients_per_round",
        )
        _require(self.round_timeout_s > 0, "federation.round_timeout_s must be > 0 seconds")
        _require(self.node_wait_s >= 0, "federation.node_wait_s must be >= 0 seconds")
        _require(self.max_failed_rounds >= 1, "federation.max_failed_rounds must be >= 1")
        _require(self.client_cpus >= 1, "federation.client_cpus must be >= 1")
        _require(self.client_gpus >= 0, "federation.client_gpus must be >= 0")


@dataclass(frozen=True)
class ZOSection:
    """``[zo]``: the zeroth-order (MeZO) local optimizer.

    lr: learning rate of the first round; lr_schedule: constant or cosine (decays to lr_min over the
    rounds; exact, because the server folds each round's lr into the accumulated coefficients).
    eps: perturbation scale. perturbation: gaussian or rademacher. tune: all or no-embeddings.
    local_steps: two-point steps per client per round (tau). batch_size: examples per step.
    cache_z: keep the step's z in memory (auto = only within the 1.2x inference-memory budget).
    """

    lr: float = 3e-6
    lr_schedule: str = "constant"
    lr_min: float = 0.0
    eps: float = 1e-3
    perturbation: str = "rademacher"
    tune: str = "all"
    local_steps: int = 6
    batch_size: int = 8
    cache_z: str = "auto"

    def __post_init__(self) -> None:
        _require(0 < self.lr < 1, "zo.lr must be in (0, 1); full-parameter ZO uses ~1e-7..1e-5")
        _choice("zo", "lr-schedule", self.lr_schedule, LR_SCHEDULES)
        _require(0 <= self.lr_min <= self.lr, "zo.lr_min must be between 0 and zo.lr")
        _require(
            self.lr_schedule != "cosine" or self.lr_min > 0,
            "zo.lr-schedule = 'cosine' decays to zo.lr-min in the last round, and a round with lr = 0 "
            "trains nothing; set zo.lr-min > 0 (e.g. zo.lr / 10)",
        )
        _require(0 < self.eps < 1, "zo.eps must be in (0, 1); 1e-3 is the MeZO default")
        _choice("zo", "perturbation", self.perturbation, PERTURBATIONS)
        _choice("zo", "tune", self.tune, TUNE_MODES)
        _require(self.local_steps >= 1, "zo.local_steps must be >= 1")
        _require(self.batch_size >= 1, "zo.batch_size must be >= 1")
        _choice("zo", "cache-z", self.cache_z, CACHE_Z)

    def lr_at(self, server_round: int, num_rounds: int) -> float:
        """Learning rate for a (1-based) round under the schedule."""
        if self.lr_schedule == "constant" or num_rounds <= 1:
            return self.lr
        progress = (server_round - 1) / (num_rounds - 1)
        return self.lr_min + 0.5 * (self.lr - self.lr_min) * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class FedKSeedSection:
    """``[fedkseed]``: FedKSeed / FedKSeed-Pro (Qin et al., ICML 2024).

    num_seeds: K, the shared candidate seed pool. pro_clip: FedKSeed-Pro clips per-step scalars to
    +-pro_clip before computing seed importance. reply_scalars: float32 or float16 scalars on the
    wire. sparse_sync: send a client only the accumulator entries that changed since its last sync.
    rebuild_each_round: every process rebuilds its model from theta_0 + replay(A) at its first sync
    of a round instead of replaying only what changed; slower (all non-zero seeds once per round),
    but each round then depends on A alone, so a resumed run is bit-identical to an unstopped one.
    """

    num_seeds: int = 4096
    pro_clip: float = 1000.0
    reply_scalars: str = "float32"
    sparse_sync: bool = False
    rebuild_each_round: bool = False

    def __post_init__(self) -> None:
        _require(
            1 <= self.num_seeds <= 2**20, "fedkseed.num_seeds must be between 1 and 1048576 (paper: 4096)"
        )
        _require(self.pro_clip > 0, "fedkseed.pro_clip must be > 0 (paper: 1000)")
        _choice("fedkseed", "reply-scalars", self.reply_scalars, SCALAR_DTYPES)


def _check_options(section: str, options: Options) -> None:
    keys = [k for k, _ in options]
    _require(keys == sorted(set(keys)), f"[{section}.options] keys must be unique (stored sorted)")
    for key, value in options:
        _require(
            bool(key) and key == key.lower() and "_" not in key and "." not in key,
            f"{section}.options key {key!r} must be kebab-case, e.g. max-iter",
        )
        _require(
            isinstance(value, bool | int | float | str),
            f"{section}.options.{key} must be a bool, int, float or string, got {type(value).__name__}",
        )


def options_dict(options: Options) -> dict[str, Scalar]:
    """An options table as a plain dict (kebab-case keys)."""
    return dict(options)


@dataclass(frozen=True)
class AlgorithmSection:
    """``[algorithm.options]``: options for the constructor of the algorithm ``run.algorithm`` names.

    Checked against that constructor when the run starts: a key it does not take is an error
    listing the ones it does. The built-in algorithms take theirs from ``[zo]``, ``[fedkseed]`` and
    ``[lora]`` instead.
    """

    options: Options = ()

    def __post_init__(self) -> None:
        _check_options("algorithm", self.options)


@dataclass(frozen=True)
class AggregatorSection:
    """``[aggregator]``: how the server combines client updates.

    name: a registered aggregator (weighted-mean, median, trimmed-mean, clipped-mean, krum,
    multi-krum) or ``"package.module:Class"``. options (``[aggregator.options]``): passed to its
    constructor, each checked against it (e.g. ``num-byzantine = 1`` for krum).
    max_weight_ratio: no client's weight (its claimed example count) may exceed this multiple of
    the round's median claim, so one client claiming 10^9 examples cannot own a weighted mean.
    """

    name: str = "weighted-mean"
    options: Options = ()
    max_weight_ratio: float = 10.0

    def __post_init__(self) -> None:
        _require(bool(self.name), "aggregator.name must be a registered name or 'package.module:Class'")
        _check_options("aggregator", self.options)
        _require(
            self.max_weight_ratio >= 1,
            "aggregator.max_weight_ratio must be >= 1 (a client may weigh that many times the median)",
        )


@dataclass(frozen=True)
class LoRASection:
    """``[lora]``: the LoRA-FedAvg (FedIT) baseline: peft LoRA, local first-order AdamW steps.

    rank/alpha/dropout: LoRA hyper-parameters; lr: AdamW learning rate; local_steps and
    batch_size: per client per round.
    """

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    lr: float = 2e-4
    local_steps: int = 10
    batch_size: int = 8

    def __post_init__(self) -> None:
        _require(self.rank >= 1, "lora.rank must be >= 1")
        _require(self.alpha >= 1, "lora.alpha must be >= 1")
        _require(0 <= self.dropout < 1, "lora.dropout must be in [0, 1)")
        _require(0 < self.lr < 1, "lora.lr must be in (0, 1)")
        _require(self.local_steps >= 1, "lora.local_steps must be >= 1")
        _require(self.batch_size >= 1, "lora.batch_size must be >= 1")


@dataclass(frozen=True)
class PrivacySection:
    """``[privacy]``: differential privacy with an accountant (threat models: ``docs/privacy.md``).

    mechanism: ``none``; ``sample`` (sample-level DP: each example's contribution clipped to
    ``clip`` and Gaussian noise of std ``noise_multiplier * clip`` added by the client, so nothing
    unnoised leaves it; DP-FedKSeed clips per-example two-point scalars, LoRA-FedAvg runs Opacus
    DP-SGD); ``client`` (client-level DP: each client's whole round update clipped to L2 norm
    ``clip``, noise added where ``noise_at`` says).
    noise_multiplier: sigma; or ``target_epsilon`` > 0 to derive sigma for ``delta`` over the
    whole run (assuming every round participates: an upper bound). accountant: opacus' ``rdp``
    or ``prv``; both epsilons are reported.
    """

    mechanism: str = "none"
    clip: float = 1.0
    noise_multiplier: float = 0.0
    target_epsilon: float = 0.0
    delta: float = 1e-5
    accountant: str = "rdp"
    noise_at: str = "client"

    def __post_init__(self) -> None:
        _choice("privacy", "mechanism", self.mechanism, DP_MECHANISMS)
        _choice("privacy", "accountant", self.accountant, ACCOUNTANTS)
        _choice("privacy", "noise-at", self.noise_at, NOISE_AT)
        _require(
            math.isfinite(self.clip) and self.clip > 0,
            f"privacy.clip must be a positive finite bound, got {self.clip}",
        )
        _require(
            math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0,
            f"privacy.noise-multiplier must be >= 0 (sigma), got {self.noise_multiplier}",
        )
        _require(
            math.isfinite(self.target_epsilon) and self.target_epsilon >= 0,
            f"privacy.target-epsilon must be >= 0 (0: use noise-multiplier), got {self.target_epsilon}",
        )
        _require(0 < self.delta < 1, f"privacy.delta must be in (0, 1) (e.g. 1e-5), got {self.delta}")
        if self.mechanism != "none":
            _require(
                (self.noise_multiplier > 0) != (self.target_epsilon > 0),
                "privacy: set exactly one of noise-multiplier (sigma > 0) or target-epsilon (> 0)",
            )

    @property
    def enabled(self) -> bool:
        return self.mechanism != "none"


@dataclass(frozen=True)
class SecAggSection:
    """``[secagg]``: secure aggregation (Bonawitz et al. 2017): the server learns only the sum.

    threshold: the fraction of a round's sampled clients that must survive every stage
    (t = max(2, ceil(threshold * n))); fewer aborts the round cleanly. clip: each coordinate of a
    client's weighted vector is clipped to [-clip, clip] before fixed-point encoding with
    ``fraction_bits`` fractional bits modulo 2^64 (error at most n * 2^-(fraction_bits + 1) per
    coordinate of the sum). max_weight: a client's weight (its example count) is divided by it,
    so weighted vectors stay within ``clip``.
    """

    enabled: bool = False
    threshold: float = 0.66
    clip: float = 8.0
    fraction_bits: int = 40
    max_weight: float = 10000.0

    def __post_init__(self) -> None:
        _require(
            0 < self.threshold <= 1,
            f"secagg.threshold must be a fraction in (0, 1] of the sampled clients, got {self.threshold}",
        )
        _require(math.isfinite(self.clip) and self.clip > 0, "secagg.clip must be a positive finite bound")
        _require(
            8 <= self.fraction_bits <= 52,
            f"secagg.fraction-bits must be in [8, 52], got {self.fraction_bits}",
        )
        _require(
            math.isfinite(self.max_weight) and self.max_weight >= 1,
            "secagg.max-weight must be >= 1 (the largest example count a client may report)",
        )


@dataclass(frozen=True)
class RunConfig:
    """The whole run: one section per concern. Build it with :meth:`from_flat` or :meth:`load`."""

    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    federation: FederationSection = field(default_factory=FederationSection)
    zo: ZOSection = field(default_factory=ZOSection)
    fedkseed: FedKSeedSection = field(default_factory=FedKSeedSection)
    aggregator: AggregatorSection = field(default_factory=AggregatorSection)
    lora: LoRASection = field(default_factory=LoRASection)
    algorithm: AlgorithmSection = field(default_factory=AlgorithmSection)
    privacy: PrivacySection = field(default_factory=PrivacySection)
    secagg: SecAggSection = field(default_factory=SecAggSection)

    SECTIONS: ClassVar[tuple[str, ...]] = (
        "run",
        "model",
        "data",
        "federation",
        "zo",
        "fedkseed",
        "aggregator",
        "lora",
        "algorithm",
        "privacy",
        "secagg",
    )

    def __post_init__(self) -> None:
        # Cross-field checks that no single section can make.
        _require(
            self.federation.min_replies <= self.federation.clients_per_round,
            "federation.min_replies must be <= federation.clients_per_round",
        )
        if self.privacy.mechanism == "client":
            weighting = dict(self.aggregator.options).get("weighting", "examples")
            _require(
                self.aggregator.name == "weighted-mean" and weighting == "equal",
                "privacy.mechanism = 'client' bounds each client's share of the round's sum, which holds "
                "only for a plain mean: set aggregator.name = 'weighted-mean' and [aggregator.options] "
                "weighting = 'equal'",
            )
        if self.secagg.enabled:
            n = self.federation.clients_per_round
            _require(
                n >= 3,
                f"secagg.enabled needs federation.clients-per-round >= 3 (a sum of {n} reveals each "
                "input to anyone who knows the others); sample more clients",
            )
            _require(
                n * self.secagg.clip * 2.0**self.secagg.fraction_bits < 2.0**63,
                f"secagg: {n} clients x clip {self.secagg.clip} x 2^{self.secagg.fraction_bits} would "
                "overflow the 2^64 modulus; lower secagg.fraction-bits or secagg.clip",
            )

    # -- serialization -------------------------------------------------------------------------
    def to_flat(self) -> dict[str, Scalar]:
        """Dotted kebab-case keys, as Flower's run config holds them."""
        flat: dict[str, Scalar] = {}
        for section in self.SECTIONS:
            for f in dataclasses.fields(getattr(self, section)):
                value = getattr(getattr(self, section), f.name)
                if f.name == "options":
                    flat.update({f"{section}.options.{k}": v for k, v in value})
                else:
                    flat[f"{section}.{f.name.replace('_', '-')}"] = value
        return flat

    def to_toml(self) -> str:
        lines: list[str] = []
        for section in self.SECTIONS:
            lines.append(f"[{section}]")
            tables: list[str] = []
            for f in dataclasses.fields(getattr(self, section)):
                value = getattr(getattr(self, section), f.name)
                if f.name == "options":
                    tables += [f"[{section}.options]", *(f"{k} = {toml_value(v)}" for k, v in value), ""]
                else:
                    lines.append(f"{f.name.replace('_', '-')} = {toml_value(value)}")
            lines.append("")
            lines += tables
        return "\n".join(lines)

    @classmethod
    def from_flat(cls, values: Mapping[str, Any], base: RunConfig | None = None) -> RunConfig:
        """Overlay dotted keys (``"zo.lr"``) on ``base`` (defaults when None); unknown keys raise."""
        base = base or cls()
        by_section: dict[str, dict[str, Any]] = {s: {} for s in cls.SECTIONS}
        for key, value in values.items():
            section, _, name = str(key).partition(".")
            if section not in by_section or not name:
                raise ValueError(
                    f"unknown config key {key!r}: keys look like 'section.key' with section one of "
                    f"{', '.join(cls.SECTIONS)}"
                )
            by_section[section][name] = value
        sections = {s: section_from(getattr(base, s), s, by_section[s]) for s in cls.SECTIONS}
        return cls(**sections)

    @classmethod
    def load(cls, path: str | Path, overrides: Mapping[str, Any] | None = None) -> RunConfig:
        """Read a TOML file (tables per section), then apply dotted ``overrides``."""
        p = Path(path)
        if not p.is_file():
            raise ValueError(
                f"config file {p} does not exist; pass a TOML file such as simulations/default.toml"
            )
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{p} is not valid TOML: {exc}") from exc
        return cls.from_flat({**flatten(data), **dict(overrides or {})})
