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
    # Published: weight a + (b - a) * (step - start) / (end - start), so a stage's last step is one step short of b.
    s = speedrun_schedule()
    assert s.at(0).mtp_weights == (1.0, 0.5, 0.25)
    assert s.at(504).mtp_weights == pytest.approx((1.0, 0.5, 0.25 / 505))
    assert s.at(252).mtp_weights == pytest.approx((1.0, 0.5, 0.25 * 253 / 505))
    assert s.at(505).mtp_weights == (1.0, 0.5)
    assert s.at(1009).mtp_weights == pytest.approx((1.0, 0.5 / 505))
    assert s.at(1010).mtp_weights == (1.0,)
    assert s.at(1554).mtp_weights == (1.0,)
    assert speedrun_schedule(mtp=False).at(0).mtp_weights == (1.0,)


def test_learning_rate_stage_multipliers_and_cooldown():
    # Published: cooldown from step int(1515 * 0.45) = 681 to 1515, m * (1 - t) + 0.1 * t toward 0.1 itself;
    # the extension at 0.1.
    s = speedrun_schedule()
    assert s.cooldown_start == 681
    assert s.at(0).lr_multiplier == 1.0
    assert s.at(504).lr_multiplier == 1.0
    assert s.at(505).lr_multiplier == pytest.approx(1.52)
    assert s.at(680).lr_multiplier == pytest.approx(1.52)
    assert s.at(681).lr_multiplier == pytest.approx(1.52)
    t = (900 - 681) / 834
    assert s.at(900).lr_multiplier == pytest.approx(1.52 * (1 - t) + 0.1 * t)
    t = (1300 - 681) / 834
    assert s.at(1300).lr_multiplier == pytest.approx(1.73 * (1 - t) + 0.1 * t)
    assert s.at(1514).lr_multiplier == pytest.approx(1.73 / 834 + 0.1 * 833 / 834)
    for step in range(1515, 1555):
        assert s.at(step).lr_multiplier == pytest.approx(0.1)


def test_muon_momentum_warmup_and_cooldown():
    # Published: 0.85 -> 0.95 linearly over steps 0..300, 0.95, then down over the last 50 steps of the 1555.
    s = speedrun_schedule()
    expected = {0: 0.85, 150: 0.90, 299: 0.85 + 0.1 * 299 / 300, 300: 0.95, 1504: 0.95, 1505: 0.95,
                1530: 0.90, 1554: 0.95 - 0.1 * 49 / 50}
    for step, momentum in expected.items():
        assert s.at(step).muon_momentum == pytest.approx(momentum), step
    flat = speedrun_schedule(momentum_warmup_steps=0, momentum_cooldown_steps=0)
    assert {flat.at(i).muon_momentum for i in (0, 700, 1554)} == {0.95}
    with pytest.raises(ScheduleError, match="muon_momentum_min"):
        speedrun_schedule(muon_momentum_min=0.99)


def test_untie_at_two_thirds_on_an_odd_step_and_adam_on_odd_steps_only():
    s = speedrun_schedule()
    assert s.untie_step == 1011  # the first odd step of the third stage (1010)
    assert [s.at(i).untie_after for i in (1010, 1011, 1012)] == [False, True, False]
    assert speedrun_schedule(num_iterations=450, extension_iterations=12).untie_step == 301
    assert speedrun_schedule(untie_step=505).untie_step == 505
    assert speedrun_schedule(untie_step=1555).untie_step is None  # past the run: tied throughout
    with pytest.raises(ScheduleError, match="odd"):
        speedrun_schedule(untie_step=1010)
    assert [s.at(i).adam_step for i in range(4)] == [False, True, False, True]
    assert not s.at(1554).adam_step  # the last step (even) does not apply what it accumulated
    assert speedrun_schedule(tie_embeddings=False).untie_step is None


def test_validation_windows_are_the_next_steps_and_the_final_one():
    s = speedrun_schedule()
    assert s.windows_at(250) == (1, 3)
    assert s.windows_at(505) == (3, 7)  # a validation after 505 steps uses stage 2's windows, as step 505 does
    assert s.windows_at(1500) == (5, 11)
    assert s.windows_at(1555) == (6, 20)  # the final validation: the extension's short window, long 20


def test_distinct_shapes_cover_every_step_once():
    s = speedrun_schedule()
    shapes = s.distinct_shapes()
    keys = [(p.batch_tokens, p.short_window, p.long_window, len(p.mtp_weights), p.step <= s.untie_step) for p in shapes]
    assert len(keys) == len(set(keys))
    # stage 1, stage 2, stage 3 tied (untie after 1011), stage 3 untied, extension
    assert [p.step for p in shapes] == [0, 505, 1010, 1012, 1515]


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
