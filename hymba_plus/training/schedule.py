"""Learning-rate schedules: a pure function of the step (and, after a re-plan, of one saved
anchor), so a checkpoint needs only the step and the anchor.

``lr_factor(step, ...)`` is the multiplier for optimizer step ``step`` (0-based):

* warmup: linear from ``1 / warmup`` to 1 over the first ``warmup`` steps;
* ``cosine``: then half a cosine from 1 down to ``min_frac`` at the last step;
* ``wsd`` (warmup-stable-decay; MiniCPM, Hu et al. 2024, named it and decays exponentially
  over ~10% of the tokens; the linear cooldown here is Hägele et al. 2024, arXiv 2405.18392):
  1 until the last ``decay_frac * steps`` steps, then linear down to ``min_frac``;
* ``constant``: 1 after warmup.

**Re-planning on resume.** A run resumed with another length (``--steps``) or other schedule
settings does not start its schedule again (no second warm-up, no jump back to the peak):
the new plan starts where the old one stood. ``Schedule.replan`` anchors the new schedule at
``(step s0, factor f0)``, f0 being the factor of the last step taken, and for steps >= s0:

* ``cosine``: half a cosine from f0 down to ``min_frac`` at the new last step;
* ``wsd``: the stable phase is extended: f0 holds (1 when the old run was still stable) until
  the new decay window (the last ``decay_frac * steps`` steps, or what is left of it), then
  linear down to ``min_frac``; a run resumed during its stable phase gets exactly the
  schedule it would have had with the new length from the start;
* ``constant``: f0 holds.

A run re-planned during its own warm-up (s0 < the old plan's warmup) follows the new plan from
s0 as if it had run from the start (the rest of the new warm-up, if any, then its decay from
the peak: nothing has decayed yet, so no anchor is needed). A run past its warm-up is
anchored, whatever the new ``warmup`` (a longer one no longer restarts the ramp).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

KINDS = ("cosine", "wsd", "constant")


def lr_factor(step: int, total: int, warmup: int = 0, kind: str = "cosine", min_frac: float = 0.0,
              decay_frac: float = 0.2, anchor: tuple[int, float] | None = None) -> float:
    if kind not in KINDS:
        raise ValueError(f"unknown schedule {kind!r}")
    if anchor is not None and step >= anchor[0] - 1:
        return _anchored(step, total, kind, min_frac, decay_frac, *anchor)
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    if kind == "cosine":
        span = total - warmup - 1  # 0 when one step follows the warm-up: that step is the last, at min_frac
        t = 1.0 if span <= 0 else min(max(step - warmup, 0) / span, 1.0)
        return min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * t))
    start = max(total - _decay_steps(total, decay_frac), warmup)  # the decay never overlaps the warm-up
    n_decay = total - start
    if n_decay <= 0 or step < start:
        return 1.0
    t = min((step - start + 1) / n_decay, 1.0)
    return 1.0 - (1 - min_frac) * t


def _decay_steps(total: int, decay_frac: float) -> int:
    """WSD's decay window: ``decay_frac`` of the steps, at least one when ``decay_frac`` > 0 (so
    the last step ends at ``min_frac``)."""
    return max(int(round(decay_frac * total)), 1 if decay_frac > 0 else 0)


def _anchored(step: int, total: int, kind: str, min_frac: float, decay_frac: float, s0: int, f0: float) -> float:
    """Factor of ``step`` >= s0 - 1 in a plan that continues from factor f0 at step s0 - 1
    (the last step the earlier plan took)."""
    if kind == "constant":
        return f0
    if kind == "cosine":
        t = min(max(step - s0 + 1, 0) / max(total - s0, 1), 1.0)
        return min_frac + (f0 - min_frac) * 0.5 * (1 + math.cos(math.pi * t))
    start = max(total - _decay_steps(total, decay_frac), s0)  # wsd: the decay window, or what is left of it
    n_decay = total - start
    if n_decay <= 0 or step < start:
        return f0
    t = min((step - start + 1) / n_decay, 1.0)
    return f0 - (f0 - min_frac) * t


@dataclass(frozen=True)
class Schedule:
    """One run's learning-rate plan: the config's settings plus the re-plan anchor, if any."""

    kind: str
    steps: int
    warmup: int = 0
    min_frac: float = 0.0
    decay_frac: float = 0.2
    anchor: tuple[int, float] | None = None  # (s0, f0): continue from factor f0 of step s0 - 1

    @classmethod
    def of(cls, cfg, anchor: tuple[int, float] | None = None) -> Schedule:  # noqa: ANN001 - TrainConfig
        return cls(cfg.schedule, cfg.steps, cfg.warmup_steps, cfg.min_lr_frac, cfg.decay_frac, anchor)

    def factor(self, step: int) -> float:
        return lr_factor(step, self.steps, self.warmup, self.kind, self.min_frac, self.decay_frac, self.anchor)

    def same_plan(self, other: Schedule) -> bool:
        return replace(self, anchor=None) == replace(other, anchor=None)

    def replan(self, new: Schedule, step: int) -> Schedule:
        """The plan that continues this one at ``step`` (steps taken so far) with ``new``'s
        settings: ``new`` anchored at this plan's last factor (see the module docstring)."""
        if self.same_plan(new) or step <= 0:
            return replace(new, anchor=self.anchor)
        if step < self.warmup and self.anchor is None:  # still warming up: nothing decayed, the new plan from the start
            return replace(new, anchor=None)
        return replace(new, anchor=(step, self.factor(step - 1)))

    def to_dict(self) -> dict:
        return {"kind": self.kind, "steps": self.steps, "warmup": self.warmup, "min_frac": self.min_frac,
                "decay_frac": self.decay_frac, "anchor": list(self.anchor) if self.anchor else None}

    @classmethod
    def from_dict(cls, d: dict) -> Schedule:
        """The plan ``to_dict`` wrote; ValueError (one line) for a mapping that is not one."""
        try:
            a = d.get("anchor")
            plan = cls(str(d["kind"]), int(d["steps"]), int(d["warmup"]), float(d["min_frac"]),
                       float(d["decay_frac"]), (int(a[0]), float(a[1])) if a else None)
            plan.factor(plan.steps - 1)  # an unknown kind
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise ValueError(f"not a learning-rate plan ({type(e).__name__}: {e})") from None
        return plan

    def describe_change(self, new: Schedule, step: int, peak_lr: float) -> str:
        """One line saying how the plan changes at ``step`` (for the resume log)."""
        what = []
        if self.steps != new.steps:
            what.append(f"steps {self.steps} -> {new.steps}")
        if self.kind != new.kind:
            what.append(f"schedule {self.kind} -> {new.kind}")
        for name, a, b in (("warmup", self.warmup, new.warmup), ("min_lr_frac", self.min_frac, new.min_frac),
                           ("decay_frac", self.decay_frac, new.decay_frac)):
            if a != b:
                what.append(f"{name} {a:g} -> {b:g}")
        lr_now = peak_lr * self.factor(step - 1) if step > 0 else 0.0
        end = peak_lr * new.min_frac
        if new.anchor is None:
            how = (f"warm-up continues to step {new.warmup}, then {new.kind} from the peak lr {peak_lr:.3g}"
                   if step < new.warmup else f"the warm-up is over: {new.kind} from the peak lr {peak_lr:.3g}")
        elif new.kind == "cosine" and math.isclose(lr_now, end, rel_tol=1e-6, abs_tol=1e-12):
            how = f"cosine had decayed to its floor: lr stays {lr_now:.3g} to step {new.steps}"
        elif new.kind == "cosine":
            how = f"cosine continues from lr {lr_now:.3g} down to {end:.3g} at step {new.steps}"
        elif new.kind == "wsd":
            start = max(new.steps - _decay_steps(new.steps, new.decay_frac), step)
            how = (f"wsd holds lr {lr_now:.3g} until step {start}, then decays to {end:.3g} at step {new.steps}"
                   if start < new.steps else f"wsd holds lr {lr_now:.3g} to step {new.steps}")
        else:
            how = f"constant lr {lr_now:.3g}"
        return f"schedule re-planned at step {step} ({', '.join(what)}): {how}; no new warm-up"


def from_config(cfg, step: int) -> float:  # noqa: ANN001 - TrainConfig
    return Schedule.of(cfg).factor(step)
