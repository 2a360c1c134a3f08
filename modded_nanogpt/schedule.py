"""The speedrun's training schedule: stages of batch size, attention windows, multi-token-prediction
weights and learning rate, NorMuon's momentum, the untie step, and which steps the Adam parameters update.

Steps are numbered 0 .. total_steps - 1. The scheduled iterations split into equal stages (three by
default); extension iterations follow with their own settings. Defaults (the published record #68):

  stage        steps        batch (tokens)    windows (blocks)  MTP weights          lr multiplier
  1            0 - 504      8 * 2048 * 8      (1, 3)            1, 0.5, 0.25 -> 0    1.0
  2            505 - 1009   16 * 2048 * 8     (3, 7)            1, 0.5 -> 0          1.52
  3            1010 - 1514  24 * 2048 * 8     (5, 11)           1                    1.73
  extension    1515 - 1554  24 * 2048 * 8     (6, 13)           1                    0.1 (the cooldown's end)
  final validation: long window 20 blocks.

Learning rate: the stage's multiplier m until the cooldown starts at step int(N * (1 - cooldown_frac))
(N = scheduled steps; 681 of 1515), then m * (1 - t) + final_lr_frac * t with t going linearly from 0 there
to 1 at step N: toward final_lr_frac itself (0.1), not a fraction of m. Extension steps run at final_lr_frac.
"a -> b" MTP weights move linearly across their stage: a + (b - a) * (step - start) / (end - start).

NorMuon's momentum rises linearly from momentum_min to momentum_max over the first momentum_warmup steps
(0.85 -> 0.95 over 300) and falls back linearly over the last momentum_cooldown steps of the whole run
(extension included: 50).

Adam parameters (embeddings, head, gates, scalars) accumulate gradients over two steps and update on
odd steps only (what the last step accumulates when it is even is never applied); NorMuon updates every
step. The embedding is untied from the head after the optimizer update of untie_step: by default the
first odd step at or after 2/3 of the scheduled steps (1011 of 1515), an Adam step, so nothing tied is
left pending.
"""

from __future__ import annotations

from dataclasses import dataclass


class ScheduleError(ValueError):
    pass


def parse_stage_list(text: str, name: str, cast=float) -> list[list]:
    """"1,3;3,7" -> [[1, 3], [3, 7]]: stages separated by ';', values by ','."""
    try:
        return [[cast(v) for v in stage.split(",") if v.strip()] for stage in text.split(";")]
    except ValueError as e:
        raise ScheduleError(f"{name}: cannot parse {text!r} ({e})") from None


def parse_mtp(text: str) -> list[list[tuple[float, float]]]:
    """"1,0.5,0.25>0;1,0.5>0;1" -> per stage a list of (start, end) weights."""
    stages = []
    for stage in text.split(";"):
        weights = []
        for item in stage.split(","):
            start, _, end = item.partition(">")
            try:
                weights.append((float(start), float(end) if end else float(start)))
            except ValueError:
                raise ScheduleError(f"mtp_schedule: cannot parse {item!r} in {text!r}") from None
        stages.append(weights)
    return stages


@dataclass(frozen=True)
class StepPlan:
    step: int
    stage: int  # 0-based; len(stages) - 1 is the extension when there is one
    batch_tokens: int  # tokens in the whole step, all ranks and micro-steps together
    short_window: int  # blocks of 128 tokens
    long_window: int
    mtp_weights: tuple[float, ...]
    lr_multiplier: float
    muon_momentum: float
    adam_step: bool
    untie_after: bool  # untie the embedding after this step's optimizer update


@dataclass(frozen=True)
class Momentum:
    """NorMuon's momentum: linear warmup from low to high, high, then linear cooldown back to low."""
    low: float = 0.85
    high: float = 0.95
    warmup_steps: int = 300
    cooldown_steps: int = 50

    def at(self, step: int, total_steps: int) -> float:
        cooldown_start = total_steps - self.cooldown_steps
        if step < self.warmup_steps:
            return self.low + step / self.warmup_steps * (self.high - self.low)
        if self.cooldown_steps and step > cooldown_start:
            return self.high - (step - cooldown_start) / self.cooldown_steps * (self.high - self.low)
        return self.high


class Schedule:
    def __init__(self, num_iterations: int, extension_iterations: int, seq_len: int, accumulation: int,
                 batch_schedule: str, window_schedule: str, mtp_schedule: str, lr_schedule: str,
                 final_long_window: int, cooldown_frac: float, final_lr_frac: float, mtp: bool = True,
                 tie_embeddings: bool = True, untie_step: int = -1, momentum: Momentum = Momentum()):
        if num_iterations < 1 or extension_iterations < 0:
            raise ScheduleError(f"num_iterations ({num_iterations}) must be >= 1, extension_iterations ({extension_iterations}) >= 0")
        self.num_iterations = num_iterations
        self.extension_iterations = extension_iterations
        self.total_steps = num_iterations + extension_iterations
        batches = [b[0] for b in parse_stage_list(batch_schedule, "batch_schedule", int)]
        windows = parse_stage_list(window_schedule, "window_schedule", int)
        lrs = [v[0] for v in parse_stage_list(lr_schedule, "lr_schedule")]
        mtps = parse_mtp(mtp_schedule)
        n = len(batches)
        for name, values in (("window_schedule", windows), ("lr_schedule", lrs), ("mtp_schedule", mtps)):
            if len(values) != n:
                raise ScheduleError(f"{name} has {len(values)} stages but batch_schedule has {n}; give one per stage")
        for w in windows:
            if len(w) != 2 or not 1 <= w[0] <= w[1]:
                raise ScheduleError(f"window_schedule: each stage needs 'short,long' blocks with 1 <= short <= long, got {w}")
        if any(b < 1 for b in batches):
            raise ScheduleError(f"batch_schedule: batch sizes are in sequences of {seq_len} per micro-step and must be >= 1")
        # With extension steps the last entry of each list is the extension's; the others split the
        # scheduled steps evenly.
        self.num_stages = n - 1 if extension_iterations else n
        if self.num_stages < 1:
            raise ScheduleError("the schedules need at least one stage besides the extension")
        if self.num_stages > num_iterations:
            raise ScheduleError(f"{self.num_stages} stages do not fit in num_iterations={num_iterations}")
        self.batch_tokens = [b * seq_len * accumulation for b in batches]
        self.windows, self.lrs, self.mtps = windows, lrs, mtps
        self.mtp = mtp
        self.final_long_window = final_long_window
        if final_long_window < windows[-1][1]:
            raise ScheduleError(f"final_long_window ({final_long_window}) is shorter than the last stage's long window ({windows[-1][1]})")
        if not 0 <= cooldown_frac <= 1:
            raise ScheduleError(f"cooldown_frac must be in [0, 1], got {cooldown_frac}")
        self.cooldown_frac, self.final_lr_frac = cooldown_frac, final_lr_frac
        self.cooldown_start = int(num_iterations * (1 - cooldown_frac))
        if not (0 <= momentum.low <= momentum.high < 1 and momentum.warmup_steps >= 0 and momentum.cooldown_steps >= 0):
            raise ScheduleError(f"momentum: need 0 <= muon_momentum_min <= muon_momentum < 1 and warmup/cooldown steps "
                                f">= 0, got {momentum}")
        self.momentum = momentum
        self.stage_starts = [round(i * num_iterations / self.num_stages) for i in range(self.num_stages)]
        if extension_iterations:
            self.stage_starts.append(num_iterations)
        self.untie_step = None
        if tie_embeddings:
            if untie_step == -1:
                untie_step = round(2 * num_iterations / 3) | 1
            elif untie_step < 0 or untie_step % 2 == 0:
                raise ScheduleError(f"untie_step must be an odd step (an Adam step) or -1 (the first odd step at 2/3 "
                                    f"of num_iterations), got {untie_step}")
            # At or after the last step there is nothing left to train untied: stay tied.
            self.untie_step = untie_step if untie_step < self.total_steps - 1 else None

    def stage_of(self, step: int) -> int:
        stage = 0
        for i, start in enumerate(self.stage_starts):
            if step >= start:
                stage = i
        return stage

    def stage_progress(self, step: int, stage: int) -> float:
        start = self.stage_starts[stage]
        end = self.stage_starts[stage + 1] if stage + 1 < len(self.stage_starts) else self.total_steps
        return (step - start) / (end - start)

    def lr_multiplier(self, step: int, stage: int) -> float:
        span = self.num_iterations - self.cooldown_start
        if step < self.cooldown_start:
            return self.lrs[stage]
        t = 1.0 if span == 0 else min(1.0, (step - self.cooldown_start) / span)
        return self.lrs[stage] * (1 - t) + self.final_lr_frac * t

    def mtp_weights(self, step: int, stage: int) -> tuple[float, ...]:
        if not self.mtp:
            return (1.0,)
        p = self.stage_progress(step, stage)
        # A stage keeps its number of terms to its end (a weight that reaches zero still counts), so
        # the compiled loss has one shape per stage.
        return tuple(a + (b - a) * p for a, b in self.mtps[stage])

    def at(self, step: int) -> StepPlan:
        if not 0 <= step < self.total_steps:
            raise ScheduleError(f"step {step} is outside 0..{self.total_steps - 1}")
        stage = self.stage_of(step)
        short, long = self.windows[stage]
        return StepPlan(
            step=step, stage=stage, batch_tokens=self.batch_tokens[stage], short_window=short, long_window=long,
            mtp_weights=self.mtp_weights(step, stage), lr_multiplier=self.lr_multiplier(step, stage),
            muon_momentum=self.momentum.at(step, self.total_steps), adam_step=step % 2 == 1,
            untie_after=step == self.untie_step,
        )

    def windows_at(self, steps_done: int) -> tuple[int, int]:
        """The (short, long) windows a validation after `steps_done` steps uses: those of the next step, as the
        published loop sets its windows (and YaRN) for step s before validating at s; after the last step the
        last stage's short window and final_long_window."""
        if steps_done >= self.total_steps:
            return self.windows[self.stage_of(self.total_steps - 1)][0], self.final_long_window
        plan = self.at(steps_done)
        return plan.short_window, plan.long_window

    def distinct_shapes(self) -> list[StepPlan]:
        """One plan per distinct (batch, windows, number of MTP terms, tied or not): the shapes the
        compile warmup must meet, in schedule order."""
        seen, plans = set(), []
        for step in range(self.total_steps):
            plan = self.at(step)
            tied = self.untie_step is None or step <= self.untie_step
            key = (plan.batch_tokens, plan.short_window, plan.long_window, len(plan.mtp_weights), tied)
            if key not in seen:
                seen.add(key)
                plans.append(plan)
        return plans
