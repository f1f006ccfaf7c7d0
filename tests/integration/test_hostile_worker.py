"""A Worker that sends malformed records (a compromised host, a broken build) ends only its own
session, never the daemon: the daemon says why, reconnects, and the Worker's Runs still complete.

The Worker is a real sshd whose forced command is a relay in front of the real gate: on each of the
first sessions it adds one hostile record after `ready`, then it only relays.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.agentprobes import Gate
from tests.conftest import taskrun, wait_status, wait_until, write_task
from tests.integration.test_ssh_key_holder import _start, _stop
from tests.integration.test_ssh_workers import _add, hosts  # noqa: F401 (hosts is a fixture)
from tests.sshd import SshdHost

pytestmark = pytest.mark.sshd

HOSTILE = [
    {"type": "trusted", "keys": [1, "a"]},
    {"type": "heartbeat", "time": 1, "running": "x"},
    {"type": "cancel", "run_id": "RUN"},
    {"type": "error", "message": "m", "run_id": [1]},
    {"type": "result", "run_id": {"a": 1}},
]

RELAY = r'''
import json, os, subprocess, sys, threading
records = json.loads(open(sys.argv[1]).read())
counter = sys.argv[2]
n = int(open(counter).read()) if os.path.exists(counter) else 0
open(counter, "w").write(str(n + 1))
inject = json.dumps(records[n]) + "\n" if n < len(records) else None
gate = subprocess.Popen(sys.argv[3:], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
def upstream():
    while (data := sys.stdin.buffer.read1(65536)):
        gate.stdin.write(data); gate.stdin.flush()
    gate.stdin.close()
threading.Thread(target=upstream, daemon=True).start()
out = sys.stdout.buffer
while (line := gate.stdout.readline()):
    out.write(line)
    header = json.loads(line)
    if header.get("len"):
        out.write(gate.stdout.read(header["len"]))
    out.flush()
    if inject and header.get("type") == "ready":
        out.write(inject.replace('"RUN"', json.dumps(runs[0]["run_id"] if (runs := header.get("runs")) else "x")).encode()); out.flush()
        inject = None
'''


def _sessions(counter: Path) -> int:
    """How many sessions the relay saw (0 before the first; the relay writes the file in place)."""
    try:
        text = counter.read_text()
    except FileNotFoundError:
        return 0
    return int(text) if text.isdigit() else 0


def _relay_in_front_of_the_gate(host: SshdHost, tmp_path: Path) -> Path:
    (tmp_path / "records.json").write_text(json.dumps(HOSTILE))
    (tmp_path / "relay.py").write_text(RELAY)
    counter = tmp_path / "sessions"
    text = host.authorized_keys.read_text()
    assert text.count('command="') == 1
    host.authorized_keys.write_text(text.replace(
        'command="', f'command="{sys.executable} {tmp_path / "relay.py"} {tmp_path / "records.json"} {counter} '))
    return counter


def test_malformed_records_from_a_worker_end_its_session_not_the_daemon(
        repo: Path, hosts: list[SshdHost], tmp_path: Path, gate: Gate) -> None:
    host = hosts[0]
    _add(repo, "w1", host)
    assert taskrun(repo, "worker", "remove", "local").returncode == 0
    counter = _relay_in_front_of_the_gate(host, tmp_path)
    # It runs until every hostile session came and went, and a clean one came: the gate opens then.
    # A session that ends as its Run is being assigned loses the Run, which is then placed again.
    write_task(repo, "survives", f"echo one; until {gate.check}; do sleep 0.05; done; echo two",
               front="retries: 9\n")
    daemon = _start(repo)
    try:
        wait_until(lambda: _sessions(counter) > len(HOSTILE), 150, "a session after the hostile ones")
        gate.open()
        record = wait_status(repo, "survives", "COMPLETED", "FAILED", timeout=180)
        assert daemon.poll() is None, "the daemon died"
        assert taskrun(repo, "workers", "--json").returncode == 0
    finally:
        gate.open()  # on a failure too: no Agent is left waiting on the Worker
        _stop(daemon)
    assert record["status"] == "COMPLETED", record
    assert _sessions(counter) > len(HOSTILE)  # every hostile record was sent, each in a session of its own
    log = (repo.parent / "daemon.log").read_text()
    assert "Traceback" not in log
    assert log.count("protocol error") == len(HOSTILE), log[-3000:]
    assert taskrun(repo, "logs", "survives").stdout == "one\ntwo\n"  # the Run that completed, whole
