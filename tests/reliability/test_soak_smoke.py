"""A short soak (tests/reliability/soaklib.py; bench/soak runs the long one): about 75 s of mixed Tasks over
the local Worker and two sshd Workers in network namespaces, with one fault of each kind in turn: the
daemon SIGKILLed and started again, a Worker's session SIGKILLed, a link cut past
`worker_offline_after` + `worker_grace` (its Runs lost and run again elsewhere) and healed, the
repository's tmpfs filled for a few seconds. Then every invariant of tests/reliability/checker.py holds
for every Task, and the daemon never exited by itself.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.netns import require_root_tools
from tests.reliability.soaklib import FAULTS, GRACE, OFFLINE_AFTER, Soak, SoakOptions

pytestmark = [pytest.mark.slow, pytest.mark.sshd]


def test_a_short_soak_with_one_fault_of_each_kind_breaks_no_invariant(tmp_path: Path) -> None:
    require_root_tools()
    cut = OFFLINE_AFTER + GRACE + 3.0  # past the grace period: the cut Worker's Runs are lost and retried
    options = SoakOptions(minutes=1.5, seed=13, faults=(), first_faults=FAULTS, fault_every=12.0,
                          task_every=1.5, cut_seconds=(cut, cut), disk_seconds=(5.0, 8.0), tmpfs_mb=128,
                          settle=240.0)
    soak = Soak(options, tmp_path / f"soak-{uuid.uuid4().hex[:10]}")
    try:
        soak.prepare()
        report = soak.run()
    finally:
        soak.close(keep=True)
    assert {kind: report.faults.get(kind, 0) for kind in FAULTS} == dict.fromkeys(FAULTS, 1), report.fault_log
    assert report.violations == [], "\n".join(report.violations + report.fault_log)
    assert report.gave_up == []
    assert report.runs.get("COMPLETED", 0) >= 20, report.runs
    assert report.start is not None and report.end is not None
