"""The speedrun schedule at each boundary: batch, windows, MTP weights, lr, tie/untie and Adam steps."""

import pytest

from modded_nanogpt.schedule import ScheduleError
from modded_nanogpt.train_gpt import Hyperparameters, schedule_of


def speedrun_schedule(**changes):
    return schedule_of(Hyperparameters(**changes))


def test_stage_boundaries_of_the_published_schedule():
    s = speedrun_schedule()
    assert s.total_steps == 1555
    assert s.stage_starts == [0, 505, 1010, 1515]
    expected = {  # step: (stage, batch tokens, windows, lr stage multiplier)
        0: (0, 8 * 2048 * 8, (1, 3)), 504: (0, 8 * 2048 * 8, (1, 3)),
        505: (1, 16 * 2048 * 8, (3, 7)), 1009: (1, 16 * 2048 * 8, (3, 7)),
        1010: (2, 24 * 2048 * 8, (5, 11)), 1514: (2, 24 * 2048 * 8, (5, 11)),
        1515: (3, 24 * 2048 * 8, (6, 13)), 1554: (3, 24 * 2048 * 8, (6, 13)),
    }
    for step, (stage, batch, windows) in expected.items():
        plan = s.at(step)
        assert (plan.stage, plan.batch_tokens, (plan.short_window, plan.long_window)) == (stage, batch, windows), step
    assert s.at(1010).batch_tokens == 393_216
    assert s.final_long_window == 20


def test_mtp_weights_move_linearly_within_their_stage():
    s = speedrun_schedule()
    assert s.at(0).mtp_weights == (1.0, 0.5, 0.25)
    assert s.at(504).mtp_weights == pytest.approx((1.0, 0.5, 0.0))
    assert s.at(252).mtp_weights == pytest.approx((1.0, 0.5, 0.125))
    assert s.at(505).mtp_weights == (1.0, 0.5)
    assert s.at(1009).mtp_weights == pytest.approx((1.0, 0.0))
    assert s.at(1010).mtp_weights == (1.0,)
    assert s.at(1554).mtp_weights == (1.0,)
    assert speedrun_schedule(mtp=False).at(0).mtp_weights == (1.0,)


def test_learning_rate_stage_multipliers_and_cooldown():
    s = speedrun_schedule()
    cooldown_start = 1515 * (1 - 0.55)  # 681.75
    assert s.at(0).lr_multiplier == 1.0
    assert s.at(504).lr_multiplier == 1.0
    assert s.at(505).lr_multiplier == pytest.approx(1.52)
    assert s.at(681).lr_multiplier == pytest.approx(1.52)
    step = 900
    expected = 1.52 * (1 + (0.1 - 1) * (step / 1515 - 0.45) / 0.55)
    assert s.at(step).lr_multiplier == pytest.approx(expected)
    assert step > cooldown_start
    last = s.at(1514).lr_multiplier
    assert last == pytest.approx(1.73 * (1 + (0.1 - 1) * (1514 / 1515 - 0.45) / 0.55))
    assert s.at(1515).lr_multiplier == pytest.approx(1.73 * 0.1)
    assert s.at(1554).lr_multiplier == pytest.approx(1.73 * 0.1)


def test_untie_on_an_odd_step_and_adam_on_odd_steps():
    s = speedrun_schedule()
    assert s.untie_step == 505  # stage 2 starts at 505, already odd
    assert [s.at(i).untie_after for i in (504, 505, 506)] == [False, True, False]
    even_start = speedrun_schedule(num_iterations=1512)  # stage 2 starts at 504 (even) -> 505
    assert even_start.stage_starts[1] == 504 and even_start.untie_step == 505
    assert [s.at(i).adam_step for i in range(4)] == [False, True, False, True]
    assert s.at(1554).adam_step  # the last step always applies the accumulated Adam gradients
    assert speedrun_schedule(tie_embeddings=False).untie_step is None


def test_distinct_shapes_cover_every_step_once():
    s = speedrun_schedule()
    shapes = s.distinct_shapes()
    keys = [(p.batch_tokens, p.short_window, p.long_window, len(p.mtp_weights), p.step <= s.untie_step) for p in shapes]
    assert len(keys) == len(set(keys))
    # stage 1 (tied), stage 2's first step (tied, untie after it), stage 2 untied, stage 3, extension
    assert [p.step for p in shapes] == [0, 505, 506, 1010, 1515]


@pytest.mark.parametrize("changes, message", [
    ({"window_schedule": "1,3;3,7"}, "window_schedule has 2 stages but batch_schedule has 4"),
    ({"window_schedule": "3,1;3,7;5,11;6,13"}, "1 <= short <= long"),
    ({"final_long_window": 5}, "final_long_window (5) is shorter"),
    ({"mtp_schedule": "1,x;1;1;1"}, "mtp_schedule: cannot parse"),
    ({"num_iterations": 2}, "3 stages do not fit"),
    ({"cooldown_frac": 1.5}, "cooldown_frac"),
])
def test_bad_schedules_are_named(changes, message):
    with pytest.raises(ScheduleError, match=message.replace("(", r"\(").replace(")", r"\)")):
        speedrun_schedule(**changes)


def test_step_outside_the_schedule():
    with pytest.raises(ScheduleError, match="outside"):
        speedrun_schedule().at(1555)
