"""What a ladder's wsd branches save: the training of its trunk segments and branches against one cosine
run from scratch per branch budget (the dry run's "branches:" line; studies/ladder.py)."""

from __future__ import annotations

from dataclasses import dataclass

from studies.costs import Cost, trained_config, trained_tokens
from studies.messages import Point


@dataclass(frozen=True)
class Savings:
    """The training of a grid's trunks and branches against one cosine run per branch budget."""

    trunks: int
    branches: int
    ladder: Cost
    """What the segments and the branches train."""
    cosine: Cost
    """What one run from scratch per branch budget would train."""

    @property
    def ratio(self) -> float:
        """How many times the FLOPs of the ladder the cosine runs would take."""
        return self.cosine.flops / self.ladder.flops


def branch_savings(points: list[Point], costs: list[Cost]) -> Savings | None:
    """The trunks' and branches' training against one cosine run per branch; None for a grid without branches."""
    from ltm.flops import run_flops_per_token

    branches = [(p, c) for p, c in zip(points, costs) if p.resumes and p.stop is None]
    if not branches:
        return None
    alone = [Cost(t, t * run_flops_per_token(cfg, cfg.model), t * run_flops_per_token(cfg, cfg.model, "paper"))
             for p, _ in branches for cfg in [trained_config(p)] for t in [trained_tokens(cfg)]]
    ladder = [c for p, c in zip(points, costs) if p.stop is not None] + [c for _, c in branches]
    return Savings(sum(1 for p in points if p.stop is not None and not p.after), len(branches), _total(ladder),
                   _total(alone))


def _total(costs: list[Cost]) -> Cost:
    return Cost(sum(c.tokens for c in costs), sum(c.flops for c in costs), sum(c.flops_paper for c in costs))


def savings_lines(savings: Savings | None) -> list[str]:
    """The line after the grid that says what the branches save (none for a grid without branches)."""
    if savings is None:
        return []
    ladder, cosine = savings.ladder, savings.cosine
    return [f"branches: {savings.branches} budgets as wsd branches of {savings.trunks} trunk(s) train "
            f"{ladder.tokens:,} tokens, {ladder.flops:.2e} FLOPs exact; one cosine run per budget would train "
            f"{cosine.tokens:,} tokens, {cosine.flops:.2e} FLOPs: {savings.ratio:.2f}x the branches' training"]
