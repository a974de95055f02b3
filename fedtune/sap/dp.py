"""Label differential privacy for the U-shaped split: DP-SGD on the client's head, with the cut.

In the U-shaped split (``u_shaped = true``, classification) the labels never leave the client,
but two things computed from them do: each step's gradient at the cut (one row per example,
dLoss_i/dh_i, sent up for the trunk's backward pass) and, at the end of the round, the trained
head. ``privacy.mechanism = "sample"`` makes both (epsilon, delta)-DP in every example's label
(label DP; Ghazi et al., "Deep Learning with Label Differential Privacy", NeurIPS 2021):

* per example i, the head gradient a_i and the cut row b_i are clipped together: both scaled by
  min(1, 1 / ||[a_i / C, b_i / C_cut]||), with C = ``privacy.clip`` and C_cut =
  ``algorithm.options.dp-cut-clip`` (default C). opacus computes the head's per-sample gradients;
  the cut row is example i's own, since the head mixes no examples. The two bounds let the cut
  rows, typically far smaller than the head's gradients, keep their signal instead of being
  scaled down with them;
* the head's clipped gradients are summed and get N(0, (sigma C)^2) per coordinate through
  opacus' ``DPOptimizer`` (:class:`~fedtune.privacy.dp_sgd.SecureDPOptimizer`, secure generator),
  then AdamW steps; each clipped cut row gets its own N(0, (sigma C_cut)^2) per coordinate before
  it is sent. In units of (C, C_cut) everything the server sees of the labels is one Gaussian
  mechanism per step on [sum of head gradients, row 1, ..., row B], each example's part of norm
  at most 1, with iid noise sigma everywhere. Changing one example's label moves its part by at
  most 2, so the accounted noise multiplier is sigma / 2 (replace-one adjacency, label DP);
* no amplification by subsampling is claimed: each cut row travels next to its example's
  privatized embedding, so the server may know which steps hold an example. Instead the batches
  walk shuffled passes over the client's data (``data.sampling = "shuffle"``), so an example is in
  at most ceil(steps * B / N) of a round's steps, and each of those is accounted at q = 1.
  Steps without the example release nothing about its label.

What this does not cover, and so refuses: the standard split (it sends the labels in the clear),
CTI (its per-token eta comes from the client's label statistics, so the privatized embeddings
would carry label information outside the accountant), client-level DP (the cut rows are
released every step, not once a round) and the causal-LM U-shaped split (nothing on the client
trains, and its targets are its inputs). The inputs themselves are protected by the d_chi
privatizer (metric DP per token embedding), a separate guarantee (docs/privacy.md, §SAP).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from fedtune.config import RunConfig
from fedtune.privacy.noise import SecureGaussian
from fedtune.privacy.plan import ServerLedger, noise_multiplier
from fedtune.sap.options import SAPOptions
from fedtune.sap.split import ClassifierHead
from fedtune.wire.dp_report import DPFigures

#: Replace-one adjacency: one label changed moves a clipped vector by at most twice the clip.
REPLACE_ONE_SENSITIVITY = 2.0


def check_sap_privacy(cfg: RunConfig, opts: SAPOptions) -> None:
    """ValueError, naming the fix, for a privacy config SAP cannot honour."""
    mechanism = cfg.privacy.mechanism
    if mechanism == "none":
        return
    prefix = f"privacy.mechanism = {mechanism!r} with run.algorithm = 'sap'"
    if mechanism != "sample":
        raise ValueError(
            f"{prefix}: client-level DP bounds one release per round, but a SAP client releases its "
            "cut gradients every step; use privacy.mechanism = 'sample' (label DP on the U-shaped split)"
        )
    if not opts.u_shaped or opts.task != "classification":
        raise ValueError(
            f"{prefix}: DP covers the labels of the U-shaped classification split, where they stay on "
            "the client; the standard split sends them in the clear and the causal-LM head trains "
            "nothing. Set algorithm.options.u_shaped = true and task = 'classification'"
        )
    if opts.cti:
        raise ValueError(
            f"{prefix}: CTI sets each token's noise from the client's label statistics, so the "
            "privatized embeddings would leak labels outside the accountant; "
            "set algorithm.options.cti = false"
        )
    if cfg.data.sampling != "shuffle":
        raise ValueError(
            f"{prefix}: the accountant bounds each example's steps per round by shuffled passes over "
            f"the client's data; data.sampling = {cfg.data.sampling!r} revisits small classes more "
            "often. Set data.sampling = 'shuffle'"
        )


def uses_per_round(steps: int, batch_size: int, num_examples: int) -> int:
    """At most how many of a round's ``steps`` batches hold one example (shuffled passes, each
    example once per pass, batches of min(batch_size, N))."""
    if num_examples < 1:
        raise ValueError("a client with no examples cannot train privately")
    drawn = steps * min(batch_size, num_examples)
    return min(steps, math.ceil(drawn / num_examples))


def label_dp_figures(cfg: RunConfig, opts: SAPOptions, *, num_examples: int) -> DPFigures | None:
    """What one client of ``num_examples`` releases per round (None: privacy off).

    ``noise_multiplier`` is the accounted one (sigma / 2, see the module docstring); the server
    recomputes these figures from the config and the reply's example count.
    """
    if not cfg.privacy.enabled:
        return None
    uses = uses_per_round(opts.local_steps, opts.batch_size, num_examples)
    privacy = cfg.privacy
    if privacy.noise_multiplier > 0:
        accounted = privacy.noise_multiplier / REPLACE_ONE_SENSITIVITY
    else:  # target-epsilon: the accounted sigma for q = 1 and every use of every round
        accounted = noise_multiplier(privacy, 1.0, uses * cfg.federation.num_rounds)
    return DPFigures(noise_multiplier=accounted, sample_rate=1.0, steps=uses, clip=privacy.clip)


def noise_std(figures: DPFigures) -> float:
    """The std added per coordinate of the head's gradient sum (the cut rows: times C_cut / C)."""
    return REPLACE_ONE_SENSITIVITY * figures.noise_multiplier * figures.clip


def joint_clip_factors(
    grad_samples: list[torch.Tensor], rows: torch.Tensor, clip: float, cut_clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example factors min(1, C / ||[head gradients_i, (C / C_cut) row_i]||) and those norms
    before clipping (opacus' flat-clipping formula, the weighted cut row one more tensor)."""
    n = rows.shape[0]
    weighted = rows.reshape(n, -1).float() * (clip / cut_clip)
    norms = torch.cat([*(g.reshape(n, -1).float() for g in grad_samples), weighted], dim=1).norm(2, dim=1)
    return (clip / (norms + 1e-6)).clamp(max=1.0), norms


class LabelDPHead:
    """The client's head under label DP: each step trains it privately and returns the noised,
    clipped cut rows to send up. Built per round; :meth:`close` removes opacus' hooks."""

    def __init__(
        self,
        head: ClassifierHead,
        optimizer: torch.optim.Optimizer,
        figures: DPFigures,
        *,
        batch_size: int,
        cut_clip: float = 0.0,
        noise: SecureGaussian | None = None,
    ) -> None:
        if not (math.isfinite(cut_clip) and cut_clip >= 0):
            raise ValueError(f"cut_clip must be a finite bound >= 0 (0 = the head's clip), got {cut_clip}")
        self.head, self.clip, self.batch_size = head, figures.clip, batch_size
        self.cut_clip = cut_clip or figures.clip
        self.std = noise_std(figures)
        self.cut_std = self.std * self.cut_clip / self.clip
        self.noise = noise if noise is not None else SecureGaussian()
        # opacus is imported here: a SAP client without privacy never pays for it (a deployed
        # node imports its modules afresh every round).
        from opacus.grad_sample import GradSampleHooks

        from fedtune.privacy.dp_sgd import SecureDPOptimizer

        self.params = [p for p in head.parameters() if p.requires_grad]
        self._hooks = GradSampleHooks(head, batch_first=True, loss_reduction="sum", strict=True)
        self._opt = SecureDPOptimizer(
            optimizer,
            noise_multiplier=self.std / self.clip,
            max_grad_norm=self.clip,
            expected_batch_size=batch_size,
            noise=self.noise,
        )
        self.last_norms = torch.zeros(0)  # per-example weighted joint norms of the last step (tests)

    def step(self, features: torch.Tensor, labels: torch.Tensor) -> tuple[float, torch.Tensor]:
        """One private step on trunk outputs ``features`` (B, H): mean loss, and the rows to send
        (clipped, noised, divided by B like the mean loss's gradient)."""
        feats = features.detach().float().requires_grad_(True)
        self._opt.zero_grad(set_to_none=True)
        per_example = F.cross_entropy(self.head(feats).float(), labels, reduction="none")
        with warnings.catch_warnings():
            # The head's input is a leaf, so torch warns the full backward hook sees outputs only,
            # which is what opacus needs.
            warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
            per_example.sum().backward()  # type: ignore[no-untyped-call]
        if feats.grad is None:  # pragma: no cover - the head always reads its input
            raise RuntimeError("no gradient reached the trunk output")
        samples = [p.grad_sample for p in self.params]  # type: ignore[attr-defined]
        factors, self.last_norms = joint_clip_factors(samples, feats.grad, self.clip, self.cut_clip)
        for p, g in zip(self.params, samples, strict=True):
            # Clipped here on the joint norm; opacus re-clips the head part alone, which now only
            # ever scales by (1 - O(1e-6)), and then adds the noise and steps.
            p.grad_sample = g * factors.view(-1, *([1] * (g.dim() - 1))).to(g.dtype)  # type: ignore[attr-defined]
        rows = feats.grad * factors.view(-1, *([1] * (feats.grad.dim() - 1)))
        self._opt.step()
        noised = (rows + self.noise.normal_like(rows, self.cut_std)) / self.batch_size
        return float(per_example.detach().mean()), noised

    def close(self) -> None:
        self._opt.zero_grad(set_to_none=True)
        self._hooks.cleanup()
        for p in self.params:
            if hasattr(p, "summed_grad"):
                delattr(p, "summed_grad")


class SAPServerPrivacy(ServerLedger):
    """The split server's ledger: each reply's figures checked against the config, then accounted
    per client (its node id)."""

    def __init__(self, cfg: RunConfig, opts: SAPOptions) -> None:
        check_sap_privacy(cfg, opts)
        super().__init__(cfg)
        self.opts = opts

    def check(self, dp: DPFigures | None, num_examples: int) -> str | None:
        want = label_dp_figures(self.cfg, self.opts, num_examples=num_examples)
        if want is None:  # pragma: no cover - this object exists only with privacy on
            return None
        return self.check_figures(dp, want)
