"""Validation of trajectories: every malformed field is refused with a message naming it."""

from __future__ import annotations

import numpy as np
import pytest

from sona_shm import InvalidInputError, Step, Trajectory
from sona_shm.trajectory import as_finite_float, as_vector, check_trajectory

H = 8


def traj(**changes):
    base = dict(query=np.ones(H, np.float32), steps=[Step(np.ones(H, np.float32), [0.5, 0.5], 1.0)], quality=0.5)
    base.update(changes)
    return Trajectory(**base)


def test_checked_form_is_float32_and_keeps_values():
    checked = check_trajectory(
        Trajectory([1, 2, 3, 4, 5, 6, 7, 8], [Step([0.5, 1.5], None, 2), Step((1.0,) * H, (), -1)], 3, latency_us=7, route="a"), H
    )
    assert checked.query.dtype == np.float32 and checked.query.tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [a.tolist() for a in checked.activations] == [[0.5, 1.5], [1.0] * H]
    assert [a.shape for a in checked.attention] == [(0,), (0,)]
    assert checked.rewards == (2.0, -1.0) and checked.quality == 3.0
    assert checked.latency_us == 7 and checked.route == b"a" and checked.id is None


def test_float32_input_is_not_copied():
    q = np.ones(H, np.float32)
    assert check_trajectory(traj(query=q), H).query is q


@pytest.mark.parametrize(
    "changes, fragment",
    [
        (dict(query=np.ones(H + 1)), "query: expected 8 values"),
        (dict(query=np.ones((2, 4))), "query: expected a 1-D"),
        (dict(query=["a"] * H), "query: expected real numbers"),
        (dict(query="abcdefgh"), "query: expected a sequence of numbers"),
        (dict(query=np.ones(H, complex)), "query: expected real numbers"),
        (dict(query=[1.0] * 7 + [float("nan")]), "query: expected finite values"),
        (dict(query=[1.0] * 7 + [1e39]), "query: expected finite values"),
        (dict(steps=[Step(np.ones(H + 1), None, 1.0)]), "steps[0].activations: expected at most 8"),
        (dict(steps=[Step(np.ones(H), None, float("inf"))]), "steps[0].reward: expected a finite number"),
        (dict(steps=[Step(np.ones(H), None, "1")]), "steps[0].reward: expected a finite number"),
        (dict(steps=[Step(np.ones(H), [np.nan], 1.0)]), "steps[0].attention: expected finite"),
        (dict(steps=[(1, 2, 3)]), "steps[0]: expected a sona_shm.Step"),
        (dict(steps="abc"), "steps: expected a sequence"),
        (dict(quality=float("nan")), "quality: expected a finite number"),
        (dict(quality=10**400), "quality: expected a finite number"),  # OverflowError, once
        (dict(steps=[Step(np.ones(H), None, -(10**400))]), "steps[0].reward: expected a finite number"),
        (dict(quality=None), "quality: expected a finite number"),
        (dict(quality=True), "quality: expected a finite number"),
        (dict(latency_us=-1), "latency_us: expected an integer"),
        (dict(latency_us=1.5), "latency_us: expected an integer"),
        (dict(route=b"x"), "route: expected a str"),
        (dict(route="x" * 65), "route: expected at most 64"),
        (dict(route="\ud800"), "route: expected text encodable as UTF-8"),
        (dict(id=-3), "id: expected None or an integer"),
    ],
)
def test_bad_fields_are_refused_by_name(changes, fragment):
    with pytest.raises(InvalidInputError, match=fragment.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        check_trajectory(traj(**changes), H, max_steps=4, attention_dim=4)


def test_bounds_of_the_layout_are_enforced_and_named():
    with pytest.raises(InvalidInputError, match=r"steps: expected at most 2 steps \(max_steps of segment 'x'\), got 3"):
        check_trajectory(traj(steps=[Step([1.0], None, 0.0)] * 3), H, max_steps=2, where=" of segment 'x'")
    with pytest.raises(InvalidInputError, match=r"attention: expected at most 1 values"):
        check_trajectory(traj(steps=[Step([1.0], [0.1, 0.2], 0.0)]), H, attention_dim=1)


def test_not_a_trajectory():
    with pytest.raises(InvalidInputError, match="trajectory: expected a sona_shm.Trajectory, got"):
        check_trajectory({"query": [1.0] * H}, H)


def test_invalid_input_is_a_value_error():
    with pytest.raises(ValueError):
        as_vector([np.inf], "x")
    with pytest.raises(ValueError):
        as_finite_float(np.float64(3.5e38), "reward")


@pytest.mark.filterwarnings("ignore:overflow encountered in dot")
def test_huge_but_finite_values_pass_the_fast_check():
    # 1e30 squared overflows float32, so the BLAS shortcut must fall back to the exact test.
    v = as_vector(np.full(4, 1e30, np.float32), "x")
    assert np.isfinite(v).all()


@pytest.mark.guarantee("bad-input-changes-nothing")
def test_steps_are_read_once_and_a_lying_len_is_refused():
    class Lying(list):
        def __len__(self) -> int:
            return 1

    step = Step([1.0], None, 0.0)
    with pytest.raises(InvalidInputError, match=r"steps: expected a sequence whose len\(\) matches its items, got len\(\) 1 and 2 or more"):
        check_trajectory(traj(steps=Lying([step] * 5)), H, max_steps=2)
    with pytest.raises(InvalidInputError, match=r"got len\(\) 1 and 2 or more items"):
        check_trajectory(traj(steps=Lying([step] * 3)), H)  # no max_steps (InstantLoop): still refused
    checked = check_trajectory(traj(steps=Lying([step])), H, max_steps=2)  # its len() is right this time
    assert len(checked.rewards) == 1
    steps = [step, step]
    checked = check_trajectory(traj(steps=steps), H, max_steps=2)
    steps.append(step)  # changing the list afterwards changes nothing checked
    assert len(checked.activations) == len(checked.rewards) == 2
