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
from fedtune.zo.loss import answer_loss


@dataclass(frozen=True)
class EvalResult:
    """heldout_loss: token-weighted mean cross-entropy on answer tokens. rouge_l: mean Rouge-L F1
    (0-100) of greedy generations against the reference answers. exact_match: fraction of
    generations whose first word equals the reference's first word (meaningful for label tasks)."""

    heldout_loss: float
    rouge_l: float
    exact_match: float
    num_loss_examples: int
    num_generations: int


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
        cls, tokenizer: PreTrainedTokenizerBase, heldout: Dataset, cfg: RunConfig
    ) -> HeldoutEvaluator:
        """The evaluator every algorithm of a run uses, so their figures are comparable."""
        return cls(
            tokenizer,
            heldout,
            max_length=cfg.model.max_length,
            num_generations=cfg.data.eval_generations,
            prompt_template=cfg.data.prompt_template,
            max_new_tokens=cfg.data.max_new_tokens,
        )

    @torch.inference_mode()
    def loss(self, model: torch.nn.Module) -> float:
        model.train(False)
        device = next(model.parameters()).device
        total, tokens = 0.0, 0
        for batch in self.batches:
            n = batch.num_answer_tokens
            total += float(answer_loss(model, batch.to(device))) * n
            tokens += n
        return total / max(tokens, 1)

    def __call__(self, model: torch.nn.Module) -> EvalResult:
        loss = self.loss(model)
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
            rouge_l=rl,
            exact_match=em,
            num_loss_examples=sum(int(b.input_ids.shape[0]) for b in self.batches),
            num_generations=len(self.gen_prompts),
        )
