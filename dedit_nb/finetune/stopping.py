"""When a stage is done: a validation loss on fixed noise at fixed timesteps (the same at every evaluation, so
it moves only with the weights) and the plateau rule that ends a stage once it stops falling."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

VALIDATION_TIMESTEPS = 4   # evenly spaced over the schedule: each validation costs this many forward passes per image


def validation_timesteps(num_train_timesteps: int) -> torch.Tensor:
    """The fixed timesteps of the validation loss: the middles of ``VALIDATION_TIMESTEPS`` equal spans."""
    edges = torch.arange(VALIDATION_TIMESTEPS, dtype=torch.float64) + 0.5
    return (edges * num_train_timesteps / VALIDATION_TIMESTEPS).long()


def validation_noise(seed: int, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    """One fixed noise batch per image (its latents' shape), drawn from the finetune's seed alone, so both
    stages and a resumed run validate on the same noise."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 999_983)
    return [torch.randn((VALIDATION_TIMESTEPS, *shape), generator=gen) for shape in shapes]


@dataclass
class Plateau:
    """A stage has plateaued when ``patience`` validations in a row failed to fall below its best by
    ``min_delta`` of the best."""

    patience: int
    min_delta: float
    best: float = math.inf
    waited: int = 0

    def update(self, value: float) -> bool:
        """Take a validation loss; True once the stage has plateaued."""
        if value < self.best * (1 - self.min_delta) or math.isinf(self.best):
            self.best, self.waited = value, 0
        else:
            self.waited += 1
        return self.waited >= self.patience


def finished_at(state: dict, stop_when: str) -> int:
    """The stage-2 step count at which a done finetune counts as finished: the step limit it had when it
    stopped on a plateau (a rerun with that limit or a lower one finds it finished; a higher one extends it),
    else the steps it took. Under ``stop_when="steps"`` a plateau counts for nothing."""
    stop = state.get("stopped", {}).get("stage2", {})
    if stop.get("reason") == "plateau" and stop_when == "plateau":
        return stop["limit"]
    return state["step"]
