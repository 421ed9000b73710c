"""The paper's beta warmup for MoFaSGD, usable in any training loop.

The paper's NanoGPT runs move MoFaSGD's momentum decay beta linearly from 0.65 to 0.85 over the
first 300 optimizer steps, then keep it at 0.85. `BetaWarmup` holds that rule:

    opt = MoFaSGD(matrices)              # the paper's defaults
    beta = BetaWarmup(opt)               # sets beta for step 0 now
    for batch in data:
        loss(batch).backward()
        opt.step()
        opt.zero_grad()
        beta.step()                      # beta for the next step

Called with a step number it only computes the value (`BetaWarmup()(10)`), which is how the mofa
harness uses it. It saves and restores its position with state_dict() / load_state_dict(), like
torch's learning-rate schedulers.
"""

from __future__ import annotations

from typing import Callable

from mofasgd import hyperparameters

__all__ = ["BetaWarmup", "linear_warmup"]


def linear_warmup(start: float, end: float, steps: int) -> Callable[[int], float]:
    """The warmup rule: step -> start + (end - start) * step / steps for step < steps, then end
    (end from step 0 when steps is 0)."""
    hyperparameters.check("warmup_steps", steps, "warmup steps")

    def value(step: int) -> float:
        return end if steps == 0 or step >= steps else start + (end - start) * step / steps

    return value


class BetaWarmup:
    """Linear warmup of a param-group hyperparameter (MoFaSGD's `beta` by default).

    Args:
        optimizer: the optimizer whose param groups get the value; None for the value alone
            (call the object with a step number).
        start, end, steps: the value goes linearly from `start` (step 0) to `end` (step `steps`)
            and stays at `end`; defaults are the paper's NanoGPT values 0.65, 0.85, 300.
        key: the param-group key written (default "beta").

    Step 0's value is written at construction; step() advances to the next optimizer step, so
    call it once after each optimizer.step().
    """

    def __init__(self, optimizer=None, start: float = 0.65, end: float = 0.85, steps: int = 300,
                 key: str = "beta"):
        for name, v in (("start", start), ("end", end)):
            hyperparameters.check("beta", v, f"BetaWarmup {name}")
        self.optimizer, self.start, self.end, self.steps, self.key = optimizer, start, end, steps, key
        self._rule = linear_warmup(start, end, steps)
        self.last_step = 0
        self._apply()

    def __call__(self, step: int) -> float:
        """The value at (0-based) optimizer step `step`."""
        return self._rule(step)

    def _apply(self) -> None:
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group[self.key] = self(self.last_step)

    def step(self) -> None:
        """Advance one optimizer step and write its value into the param groups."""
        self.last_step += 1
        self._apply()

    def get_last_value(self) -> float:
        """The value of the current step (the one written into the groups)."""
        return self(self.last_step)

    def state_dict(self) -> dict:
        return {"last_step": self.last_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.last_step = int(state_dict["last_step"])
        self._apply()
