"""A Worker trusts only whom its admin named (DESIGN.md §5.8): a pinned key or a one-time token.

The holder of the daemon's SSH key reaches `taskrun-worker trust` through the
gate; without the pinned key or the token it enrolls nothing, not even right
after `taskrun-worker trust --reset`.
"""

from __future__ import annotations

import base64
import getpass
import json
import re
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from taskrunner.defaults import ENROLL_TOKEN_TTL_SECONDS
from taskrunner.enroll import enroll_local, trust_request
from taskrunner.keys import Keyring
from taskrunner.signing import TRUST_TYPE, SigningKey, sign
from taskrunner.worker import main as worker_main
from taskrunner.worker.enrollment import ENROLLMENT_FILE, Enrollment, token_key
from taskrunner.worker.trust import TrustRefused, TrustStore, worker_key
from tests.unit.test_gate import ED25519, _through_gate

TOKEN_RE = re.compile(r"enrollment token ([0-9a-f]{32})")


@pytest.fixture()
def home(tmp_path: Path) -> Path:
    return tmp_path / "worker-home"


@pytest.fixture()
def ring(tmp_path: Path) -> Keyring:
    return Keyring.ensure(tmp_path / "cp", time.time())[0]


@pytest.fixture()
def attacker_ring(tmp_path: Path) -> Keyring:
    """A keyring of the SSH key's holder, who can reach the gate but has no key the admin named."""
    return Keyring.ensure(tmp_path / "attacker", time.time())[0]


def _init(home: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[str, str]:
    assert worker_main.main(["init", "--key", ED25519, "--home", str(home), "--command",
                             "/usr/local/bin/taskrun-worker", *extra]) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


def _token(text: str) -> str:
    found = TOKEN_RE.search(text)
    assert found is not None, text
    return found.group(1)


def _request(ring: Keyring, home: Path, token: str | None = None, now: float | None = None) -> dict[str, Any]:
    return trust_request(ring, worker_key(home).key_id, time.time() if now is None else now, token)


def _apply(home: Path, request: dict[str, Any], now: float | None = None) -> list[dict[str, Any]]:
    return TrustStore(home).apply(request, worker_key(home).key_id, time.time() if now is None else now)


# ---------------------------------------------------------------- init and reset name the enroller


def test_init_prints_a_token_on_stderr_and_keeps_only_its_hash_owner_only(
        home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, err = _init(home, capsys)
    token = _token(err)
    assert out.startswith("restrict,command=") and token not in out  # stdout goes to authorized_keys
    path = home / ENROLLMENT_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    stored = json.loads(path.read_text())
    assert token not in path.read_text()
    assert stored["token_sha256"] == token_key(token).hex()
    assert stored["expires_at"] == pytest.approx(time.time() + ENROLL_TOKEN_TTL_SECONDS, abs=60)
    assert f"--token {token}" in err


@pytest.mark.parametrize("extra", [(), ("--trust-key", "SHA256:" + "A" * 43)])
def test_init_says_the_worker_add_command_with_this_login_and_where_the_port_goes(
        home: Path, capsys: pytest.CaptureFixture[str], extra: tuple[str, ...]) -> None:
    _, err = _init(home, capsys, *extra)
    # The login defaults to the control plane's local user name: name the one who ran init here.
    assert f"taskrun worker add NAME --host HOST --user {getpass.getuser()} --fingerprint SHA256:" in err
    assert "--port PORT" in err


def test_init_with_a_pinned_key_issues_no_token(home: Path, ring: Keyring,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    _, err = _init(home, capsys, "--trust-key", ring.current.public_line)
    assert TOKEN_RE.search(err) is None and ring.current.key_id in err
    assert json.loads((home / ENROLLMENT_FILE).read_text())["pinned"] == [ring.current.key_id]


def test_init_refuses_a_trust_key_that_is_no_key(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert worker_main.main(["init", "--key", ED25519, "--home", str(home), "--command", "/x/taskrun-worker",
                             "--trust-key", "SHA256:short"]) == 2
    assert "neither a key id" in capsys.readouterr().err
    assert not (home / ENROLLMENT_FILE).exists()


def test_init_on_an_enrolled_worker_issues_no_token(home: Path, ring: Keyring,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    _apply(home, _request(ring, home, _token(_init(home, capsys)[1])))
    _, err = _init(home, capsys)
    assert TOKEN_RE.search(err) is None and "already trusts" in err
    assert not (home / ENROLLMENT_FILE).exists()


# ---------------------------------------------------------------- tokens


def test_an_enrollment_carrying_the_tokens_mac_enrolls_once(home: Path, ring: Keyring,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    token = _token(_init(home, capsys)[1])
    request = _request(ring, home, token)
    assert token not in json.dumps(request)  # only its MAC travels

    assert [k["key_id"] for k in _apply(home, request)] == [ring.current.key_id]
    assert not (home / ENROLLMENT_FILE).exists()  # used up
    # Even if the trust store were lost, the same statement (or token) enrolls nothing again.
    TrustStore(home).path.unlink()
    with pytest.raises(TrustRefused, match="its admin named none"):
        _apply(home, _request(ring, home, token))


def test_an_enrollment_without_the_token_is_refused(home: Path, attacker_ring: Keyring,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    _init(home, capsys)
    with pytest.raises(TrustRefused, match="needs its one-time enrollment token"):
        _apply(home, _request(attacker_ring, home))
    assert TrustStore(home).state()["keys"] == []
    assert (home / ENROLLMENT_FILE).exists()  # not used up by a failed attempt


def test_an_enrollment_with_a_wrong_token_is_refused(home: Path, attacker_ring: Keyring,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    _init(home, capsys)
    with pytest.raises(TrustRefused, match="does not match"):
        _apply(home, _request(attacker_ring, home, "0" * 32))


def test_a_tokens_mac_lifted_from_a_captured_statement_does_not_enroll_other_keys(
        home: Path, ring: Keyring, attacker_ring: Keyring, capsys: pytest.CaptureFixture[str]) -> None:
    token = _token(_init(home, capsys)[1])
    captured = _request(ring, home, token)
    mac = json.loads(base64.b64decode(captured["envelope"]["payload"]))["enrollment_mac"]
    # The attacker re-signs a statement of its own keys carrying the captured MAC.
    forged = _request(attacker_ring, home)
    body = json.loads(base64.b64decode(forged["envelope"]["payload"]))
    body["enrollment_mac"] = mac
    forged["envelope"] = sign(TRUST_TYPE, json.dumps(body).encode(), attacker_ring.signers(time.time()))
    with pytest.raises(TrustRefused, match="does not match"):
        _apply(home, forged)
    assert TrustStore(home).state()["keys"] == []


def test_an_expired_token_enrolls_nothing(home: Path, ring: Keyring, capsys: pytest.CaptureFixture[str]) -> None:
    token = _token(_init(home, capsys, "--token-ttl", "1m")[1])
    later = time.time() + 120
    with pytest.raises(TrustRefused, match="enrollment token has expired"):
        _apply(home, _request(ring, home, token, now=later), now=later)


def test_a_worker_whose_admin_named_nobody_refuses_every_enrollment(home: Path, ring: Keyring) -> None:
    with pytest.raises(TrustRefused, match="this Worker trusts no control plane key and its admin named none"):
        _apply(home, _request(ring, home, "0" * 32))


# ---------------------------------------------------------------- pinned keys


def test_a_statement_signed_by_the_pinned_key_enrolls_without_a_token(home: Path, ring: Keyring) -> None:
    Enrollment(home).pin([ring.current.key_id], time.time())
    assert [k["key_id"] for k in _apply(home, _request(ring, home))] == [ring.current.key_id]
    assert not (home / ENROLLMENT_FILE).exists()


def test_a_statement_by_any_other_key_is_refused_when_a_key_is_pinned(
        home: Path, ring: Keyring, attacker_ring: Keyring) -> None:
    Enrollment(home).pin([ring.current.key_id], time.time())
    with pytest.raises(TrustRefused, match="not signed by the control plane key its admin pinned"):
        _apply(home, _request(attacker_ring, home))


# ---------------------------------------------------------------- reset, and the gate


def test_reset_prints_a_new_token_and_the_old_one_no_longer_enrolls(
        home: Path, ring: Keyring, attacker_ring: Keyring, capsys: pytest.CaptureFixture[str]) -> None:
    first = _token(_init(home, capsys)[1])
    _apply(home, _request(ring, home, first))
    assert worker_main.main(["trust", "--home", str(home), "--reset"]) == 0
    second = _token(capsys.readouterr().out)
    assert second != first and TrustStore(home).state()["keys"] == []

    for request in (_request(attacker_ring, home), _request(attacker_ring, home, first), _request(ring, home, first)):
        with pytest.raises(TrustRefused):
            _apply(home, request)
    assert [k["key_id"] for k in _apply(home, _request(ring, home, second))] == [ring.current.key_id]


def test_reset_with_a_trust_key_pins_it(home: Path, ring: Keyring, capsys: pytest.CaptureFixture[str]) -> None:
    assert worker_main.main(["trust", "--home", str(home), "--reset", "--trust-key", ring.current.key_id]) == 0
    assert TOKEN_RE.search(capsys.readouterr().out) is None
    assert [k["key_id"] for k in _apply(home, _request(ring, home))] == [ring.current.key_id]


def test_trust_key_without_reset_is_a_usage_error(home: Path, ring: Keyring,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert worker_main.main(["trust", "--home", str(home), "--trust-key", ring.current.key_id]) == 2
    assert "go with --reset" in capsys.readouterr().err


def test_through_the_gate_the_ssh_key_holder_enrolls_nothing_before_or_after_a_reset(
        home: Path, attacker_ring: Keyring, capsys: pytest.CaptureFixture[str]) -> None:
    _init(home, capsys)
    own = json.dumps(_request(attacker_ring, home)).encode()
    guessed = json.dumps(_request(attacker_ring, home, "f" * 32)).encode()
    assert _through_gate(home, "taskrun-worker trust", own).returncode == 2
    assert _through_gate(home, "taskrun-worker trust", guessed).returncode == 2
    assert worker_main.main(["trust", "--home", str(home), "--reset"]) == 0
    capsys.readouterr()
    refused = _through_gate(home, "taskrun-worker trust", json.dumps(_request(attacker_ring, home)).encode())
    assert refused.returncode == 2 and b"enrollment token" in refused.stderr
    assert TrustStore(home).state()["keys"] == []
    status = _through_gate(home, "taskrun-worker status --json")
    assert json.loads(status.stdout)["trusted"] == [] and "runs" not in json.loads(status.stdout)


@pytest.mark.parametrize("damage", ["planted", "torn"])
def test_the_local_worker_is_enrolled_by_the_daemon_pinning_its_own_key_and_put_right_at_each_start(
        tmp_path: Path, ring: Keyring, damage: str) -> None:
    home = tmp_path / "local"
    enroll_local(home, ring, time.time())
    assert [k["key_id"] for k in TrustStore(home).state()["keys"]] == [ring.current.key_id]
    # A store changed behind the daemon's back (a key added and dated far ahead, or torn) is put right.
    if damage == "planted":
        planted = SigningKey.generate()
        data = json.loads(TrustStore(home).path.read_text())
        data["keys"].append({"key_id": planted.key_id, "public": planted.public_line, "retire_at": None})
        data["issued_at"] = time.time() + 10 ** 8
        TrustStore(home).path.write_text(json.dumps(data))
    else:
        TrustStore(home).path.write_text('{"keys": [{"key_id": 1}]')
    enroll_local(home, ring, time.time())
    assert [k["key_id"] for k in TrustStore(home).state()["keys"]] == [ring.current.key_id]
