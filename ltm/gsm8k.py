"""GSM8K in-context learning (docs/METHOD.md section 8): few-shot prompts, posterior on the prompt, greedy answers.

A k-shot prompt is `[BOS]Question: q Answer: a[EOS]` for each shot (the training documents'
packing) then `[BOS]Question: q* Answer:`. The prompt ends at the colon: with byte-level BPE the
answer's first word carries its leading space, so a trailing space token would be one the model
never saw there. Shots that do not fit the model's context are left out, those nearest the
question kept first (the number used is reported as `shots_used`). For an LTM, `pass_k`
independent posterior inferences (different noise seeds) each give z = the inner loop's last
sample, and each is decoded greedily with the KV cache; an AR model decodes once, so its pass@k equals its pass@1.

Two scores per answer: the paper's substring match (the gold number appears in the decoded text)
and an exact match of the final number (after `####` if the model wrote one, else the last number).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from ltm.config import InferenceConfig
from ltm.data import DataError, DataNotFoundError, TextTokenizer
from ltm.data.paths import expand
from ltm.data.sources import HUB_DATASETS, qa_text
from ltm.generate import generate
from ltm.model import LatentThoughtModel
from ltm.posterior import infer_posterior

GSM8K_HUB = HUB_DATASETS["gsm8k"]
"""Where the hub name gsm8k loads from (`ltm.data.sources.HUB_DATASETS`)."""

SPLITS = ("train", "test")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str
    """The worked solution, ending in `#### <number>`."""

    @property
    def final(self) -> str:
        """The gold final number, normalised."""
        return normalise_number(self.answer.rsplit("####", 1)[-1])


def load_problems(source: str, split: str) -> list[Problem]:
    """GSM8K problems from a folder holding `<split>.jsonl` (`data:gsm8k`: $LTM_DATA_DIR's) or the hub name `gsm8k`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = Path(expand(source)).expanduser()
    if path.is_dir():
        file = path / f"{split}.jsonl"
        if not file.is_file():
            raise DataNotFoundError(f"{path} has no {split}.jsonl; a GSM8K folder holds train.jsonl and test.jsonl "
                                    "with fields question and answer")
        records = [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif source == "gsm8k":
        records = list(_hub_records(split))
    elif path.exists() or "/" in source:
        raise DataNotFoundError(f"{path.absolute()} is not a folder with train.jsonl and test.jsonl; pass such a "
                                "folder or the hub name gsm8k")
    else:
        raise DataError(f"unknown GSM8K source {source!r}; pass the hub name gsm8k or a folder with "
                        "train.jsonl and test.jsonl")
    problems = []
    for i, r in enumerate(records):
        if "question" not in r or "answer" not in r or "####" not in r["answer"]:
            raise DataError(f"{source} {split} record {i}: need fields question and answer (ending in '#### N'), "
                            f"got fields {sorted(r)}")
        problems.append(Problem(r["question"], r["answer"]))
    return problems


def _hub_records(split: str) -> Iterator[dict]:
    import datasets

    try:
        yield from datasets.load_dataset(GSM8K_HUB.repo, GSM8K_HUB.config, split=split)
    except Exception as e:  # offline or no cache: the user needs a local copy
        raise DataError(f"could not load {GSM8K_HUB.repo} ({split}) from the Hugging Face hub or its cache: "
                        f"{type(e).__name__}: {e}. Pass a local folder with train.jsonl and test.jsonl instead") from e


def normalise_number(text: str) -> str:
    """'1,234.50' -> '1234.5', '18' -> '18', '$7.00' -> '7'; '' when there is no number."""
    found = _NUMBER.findall(text.replace("$", ""))
    if not found:
        return ""
    number = found[0].replace(",", "")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    return number


def answer_text(tok: TextTokenizer, ids: list[int]) -> str:
    """The model's answer: the decoded continuation up to the end of its document or the next question."""
    ends = [i for i, t in enumerate(ids) if t in (tok.bos_id, tok.eos_id)]
    return tok.decode(ids[:ends[0]] if ends else ids).split("Question:", 1)[0].strip()


def final_number(answer: str) -> str:
    """The number after the last `####`, else the last number in the answer ('' if none)."""
    if "####" in answer:
        return normalise_number(answer.rsplit("####", 1)[-1])
    numbers = _NUMBER.findall(answer.replace("$", ""))
    return normalise_number(numbers[-1]) if numbers else ""


def is_correct(answer: str, gold: str) -> tuple[bool, bool]:
    """(substring match, exact final-number match) of an answer against the gold number."""
    numbers = {normalise_number(n) for n in _NUMBER.findall(answer.replace("$", ""))}
    return gold in numbers, final_number(answer) == gold


def build_prompt(tok: TextTokenizer, shots: list[Problem], question: str, max_tokens: int) -> tuple[list[int], int]:
    """Token ids of the few-shot prompt and the number of shots kept within max_tokens.

    Shots are kept in their order, nearest the question first, skipping any that no longer fit.
    """
    query = [tok.bos_id, *tok.encode(qa_text(question))]
    if len(query) > max_tokens:
        raise ValueError(f"the question alone takes {len(query)} tokens, more than the model's context "
                         f"({max_tokens}); evaluate a model with a longer model.ctx")
    kept, budget = [], max_tokens - len(query)
    for shot in reversed(shots):  # nearest the question first; a shot too long for what is left is skipped
        block = [tok.bos_id, *tok.encode(qa_text(shot.question, shot.answer)), tok.eos_id]
        if len(block) <= budget:
            kept.insert(0, block)
            budget -= len(block)
    return [t for b in kept for t in b] + query, len(kept)


def draw_shots(pool: list[Problem], k: int, index: int, seed: int, exclude: Problem | None = None) -> list[Problem]:
    """k shots for problem `index`, a seeded draw from the pool (never the problem itself)."""
    rng = random.Random(seed * 1_000_003 + index)
    candidates = [p for p in rng.sample(pool, min(len(pool), k + 1)) if p != exclude]
    return candidates[:k]


@torch.no_grad()
def greedy_answers(model: LatentThoughtModel, prompt: torch.Tensor, z: torch.Tensor | None,
                   max_new: int) -> list[list[int]]:
    """Greedy continuations of each prompt row (given z, for an LTM), without the prompt: the answers scored."""
    return generate(model, prompt, max_new, z=z, temperature=0)[:, prompt.shape[1]:].tolist()


def evaluate_gsm8k(model: LatentThoughtModel, tok: TextTokenizer, cfg: InferenceConfig, problems: list[Problem],
                   pool: list[Problem], *, shots: int, pass_k: int = 5, max_new_tokens: int = 50,
                   seed: int = 0, progress: Callable[[int, int], None] | None = None
                   ) -> tuple[dict[str, float], list[dict]]:
    """Accuracy of k-shot greedy answers; returns (metrics, one record per problem).

    Metrics (fractions of problems): `pass{n}_substring`, `pass{n}_exact` (any of n inferences
    right), `pass1_substring`, `pass1_exact` (mean over inferences), `shots_used` (mean),
    `format_rate` (answers that give a `#### N` final answer, the trained format) and `problems`.
    Problem i's inference j uses noise seed `seed + i * pass_k + j`. `progress(done, total)` is
    called after each problem.
    """
    if shots < 0 or pass_k < 1 or max_new_tokens < 1:
        raise ValueError(f"need shots >= 0, pass_k >= 1 and max_new_tokens >= 1, got {shots}, {pass_k}, "
                         f"{max_new_tokens}")
    if not problems:
        raise ValueError("no problems to evaluate")
    model.eval()
    device = next(model.parameters()).device
    ltm = model.cfg.kind == "ltm"
    records = []
    for i, problem in enumerate(problems):
        ids, used = build_prompt(tok, draw_shots(pool, shots, i, seed, exclude=problem), problem.question,
                                 model.cfg.ctx)
        if ltm:
            prompt = torch.tensor([ids] * pass_k, device=device)
            post = infer_posterior(model, prompt, cfg, seeds=[seed + i * pass_k + j for j in range(pass_k)])
            outputs = greedy_answers(model, prompt, post.z.detach(), max_new_tokens)
        else:  # greedy AR decoding is deterministic: one decode stands for every inference
            outputs = greedy_answers(model, torch.tensor([ids], device=device), None, max_new_tokens) * pass_k
        answers = [answer_text(tok, o) for o in outputs]
        scores = [is_correct(a, problem.final) for a in answers]
        records.append({"index": i, "prompt_tokens": len(ids), "shots_used": used, "gold": problem.final,
                        "answers": answers, "substring": [s for s, _ in scores], "exact": [e for _, e in scores]})
        if progress is not None:
            progress(i + 1, len(problems))
    n = len(records)

    def frac(values) -> float:
        return sum(values) / n

    metrics = {
        f"pass{pass_k}_substring": frac(any(r["substring"]) for r in records),
        f"pass{pass_k}_exact": frac(any(r["exact"]) for r in records),
        "pass1_substring": frac(sum(r["substring"]) / pass_k for r in records),
        "pass1_exact": frac(sum(r["exact"]) / pass_k for r in records),
        "shots_used": frac(r["shots_used"] for r in records),
        "format_rate": frac(sum("####" in a for a in r["answers"]) / pass_k for r in records),
        "problems": float(n),
    }
    return metrics, records
