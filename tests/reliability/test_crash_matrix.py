"""The crash matrix (issue 13): the daemon or its Worker SIGKILLed at a named crash point, restarted, and every
invariant of tests/reliability/checker.py holds: one final status per Task, no Run result lost or recorded
twice, output.log byte for byte, records, commits and result branches in agreement, git fsck clean, the
user's work intact, nothing left running or half-written.

The suite kills at a few points on both sides around commits, refs and results (daemon) and the ledger,
the Agent's start, the result and the ack (Worker). A point whose mark was never written fails: the crash
must have happened, unless harness.UNREACHABLE says why it cannot. bench/crash_matrix runs every point
with several seeds (about 15 minutes per seed on 2 cores: too long for the suite).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from taskrunner.crashpoints import POINTS
from tests.reliability.harness import UNREACHABLE, Outcome, Scenario

FAST = (
    "daemon.commit_built",
    "daemon.head_moved",
    "daemon.result_ref_moved",
    "daemon.run_finished",
    "worker.ledger_admitted",
    "worker.agent_spawned",
    "worker.result_written",
    "worker.ack_received",
)


def run_point(base: Path, point: str, seed: int) -> Outcome:
    """Run the scenario of `seed` with a crash at `point`; its directory is removed unless it failed."""
    scenario = Scenario(base, seed)
    outcome = scenario.run(point)
    if not outcome.violations and (outcome.crashed or point in UNREACHABLE):
        scenario.remove()
    return outcome


def assert_held(outcome: Outcome) -> None:
    """The crash happened at its point, on its side (or the point is known unreachable), and nothing broke."""
    point = outcome.point
    if point in UNREACHABLE:
        assert outcome.crashed is None, f"{point} is listed unreachable ({UNREACHABLE[point]}) but was reached"
    else:
        assert outcome.crashed and outcome.crashed.split()[0] == point, f"{point} was never reached"
        assert outcome.side == point.split(".", 1)[0], f"{point} killed the {outcome.side or 'nothing'}"
    assert outcome.violations == [], "\n".join(outcome.violations)


def test_the_fast_subset_covers_both_sides_and_names_real_points() -> None:
    assert set(FAST) <= set(POINTS)
    assert {p.split(".")[0] for p in FAST} == {"daemon", "worker"}
    assert set(UNREACHABLE) <= set(POINTS)


@pytest.mark.parametrize("point", FAST)
def test_killed_at_a_point_nothing_is_lost_or_recorded_twice(point: str, tmp_path: Path) -> None:
    assert_held(run_point(tmp_path, point, seed=1))
