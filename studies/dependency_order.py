"""Ray Tune's order for points that wait for others (`studies.order`): a searcher that hands Tune the next
point whose waits are over, in the grid's order, and nothing while none is ready."""

from __future__ import annotations

import pickle
from pathlib import Path

from ray.tune.search import Searcher

from studies.messages import Point


class DependencyOrder(Searcher):
    """Suggests {"key": point id} for each point once every point it waits for has ended. A point ended in an
    error releases its dependents too (a branch trains its trunk's missing part itself), so none waits forever."""

    def __init__(self, points: list[Point]) -> None:
        super().__init__()
        self.waiting = {p.id: set(p.after) for p in points}
        self.trials: dict[str, str] = {}

    def suggest(self, trial_id: str) -> dict | None:
        ready = next((pid for pid, waits in self.waiting.items() if not waits), None)
        if ready is None:
            return Searcher.FINISHED if not self.waiting else None
        del self.waiting[ready]
        self.trials[trial_id] = ready
        return {"key": ready}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        ended = self.trials.pop(trial_id, None)
        for waits in self.waiting.values():
            waits.discard(ended)

    def save(self, checkpoint_path: str) -> None:
        """Tune keeps its searcher's state with the experiment's (a ladder's restart starts afresh, `studies.order`)."""
        Path(checkpoint_path).write_bytes(pickle.dumps((self.waiting, self.trials)))

    def restore(self, checkpoint_path: str) -> None:
        self.waiting, self.trials = pickle.loads(Path(checkpoint_path).read_bytes())
