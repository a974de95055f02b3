"""Held-out answer loss and Rouge-L, the two quality figures FedKSeed reports (Qin et al. 2024)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from datasets import Dataset
from rouge_score import rouge_scorer
from transformers import PreTrainedTokenizerBase

from fedtune.config import RunConfig
from fedtune.data.batch import TokenBatch
from fedtune.data.collate import encode_examples, generate_answers
from fedtune.zo.loss import answer_loss_sums


@dataclass(frozen=True)
class EvalResult:
    """heldout_loss: token-weighted mean cross-entropy on answer tokens (long answers weigh more; the
    figure fedtune has always reported). heldout_loss_per_example: the mean over examples of each
    example's mean answer-token loss (every example weighs the same; the reference FedKSeed code's).
    rouge_l: mean Rouge-L F1 (0-100) of greedy generations against the reference answers.
    exact_match: fraction of generations whose first word equals the reference's first word
    (meaningful for label tasks). generations: the greedy answers, one per ``gen_prompts`` entry."""

    heldout_loss: float
    heldout_loss_per_example: float
    rouge_l: float
    exact_match: float
    num_loss_examples: int
    num_generations: int
    generations: tuple[str, ...] = ()


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean Rouge-L F1 in percent (the `rouge-score` package, with stemming)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return float("nan")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    total: float = sum(
        float(scorer.score(ref, pred)["rougeL"].fmeasure)
        for pred, ref in zip(predictions, references, strict=True)
    )
    return 100.0 * total / len(predictions)


def _first_word(text: str) -> str:
    words = text.strip().lower().split()
    return words[0].strip(".,!?;:") if words else ""


class HeldoutEvaluator:
    """Tokenizes the held-out split once; each call scores a model on it."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        heldout: Dataset,
        *,
        max_length: int,
        num_generations: int,
        max_new_tokens: int,
        batch_size: int = 16,
        prompt_template: str = "chat",
    ) -> None:
        if len(heldout) == 0:
            raise ValueError("the held-out split is empty; raise data.heldout_size")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_new_tokens = max_new_tokens
        prompts, answers = list(heldout["prompt"]), list(heldout["answer"])
        self.batches: list[TokenBatch] = [
            encode_examples(
                tokenizer,
                prompts[i : i + batch_size],
                answers[i : i + batch_size],
                max_length=max_length,
                template=prompt_template,
            )
            for i in range(0, len(prompts), batch_size)
        ]
        self.gen_prompts = prompts[:num_generations]
        self.gen_refs = answers[:num_generations]
        self.batch_size = batch_size
        self.prompt_template = prompt_template  # data.prompt-template: as the clients format prompts

    @classmethod
    def for_run(
        cls, tokenizer: PreTrainedTokenizerBase, heldout: Dataset, cfg: RunConfig, *, zeroshot: bool = False
    ) -> HeldoutEvaluator:
        """The evaluator every algorithm of a run uses, so their figures are comparable.

        ``zeroshot``: for the zero-shot split (open generation: ``data.zeroshot-max-new-tokens``).
        """
        return cls(
            tokenizer,
            heldout,
            max_length=cfg.model.max_length,
            num_generations=cfg.data.eval_generations,
            prompt_template=cfg.data.prompt_template,
            max_new_tokens=cfg.data.zeroshot_max_new_tokens if zeroshot else cfg.data.max_new_tokens,
        )

    def loss(self, model: torch.nn.Module) -> float:
        """The token-weighted mean answer loss."""
        return self.losses(model)[0]

    @torch.inference_mode()
    def losses(self, model: torch.nn.Module) -> tuple[float, float]:
        """(token-weighted, per-example) mean answer loss; examples with no answer token are left out."""
        model.train(False)
        device = next(model.parameters()).device
        total, tokens = 0.0, 0
        example_means: list[float] = []
        for batch in self.batches:
            sums, counts = answer_loss_sums(model, batch.to(device))
            total += float(sums.sum())
            tokens += int(counts.sum())
            example_means += [
                float(s) / int(c) for s, c in zip(sums.tolist(), counts.tolist(), strict=True) if c > 0
            ]
        return total / max(tokens, 1), sum(example_means) / max(len(example_means), 1)

    def __call__(self, model: torch.nn.Module) -> EvalResult:
        loss, loss_per_example = self.losses(model)
        preds: list[str] = []
        if self.gen_prompts:
            preds = generate_answers(
                model,  # type: ignore[arg-type]
                self.tokenizer,
                self.gen_prompts,
                max_new_tokens=self.max_new_tokens,
                max_length=self.max_length,
                batch_size=self.batch_size,
                template=self.prompt_template,
            )
            rl = rouge_l(preds, self.gen_refs)
            em = sum(
                _first_word(p) == _first_word(r) for p, r in zip(preds, self.gen_refs, strict=True)
            ) / len(preds)
        else:
            rl, em = float("nan"), float("nan")
        return EvalResult(
            heldout_loss=loss,
            heldout_loss_per_example=loss_per_example,
            rouge_l=rl,
            exact_match=em,
            num_loss_examples=sum(int(b.input_ids.shape[0]) for b in self.batches),
            num_generations=len(self.gen_prompts),
            generations=tuple(preds),
        )
