"""No code path may accept an unknown SSH host key (DESIGN.md §5.1): the package never names paramiko's accepting policies."""

from __future__ import annotations

from pathlib import Path

import taskrunner

PACKAGE = Path(taskrunner.__file__).parent
FORBIDDEN = ("AutoAddPolicy", "WarningPolicy")


def test_no_module_of_the_package_names_an_accepting_host_key_policy() -> None:
    sources = sorted(PACKAGE.rglob("*.py"))
    assert len(sources) > 20 and PACKAGE / "links" / "ssh.py" in sources

    offending = [
        f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}"
        for path in sources
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if any(name in line for name in FORBIDDEN)
    ]

    assert offending == []


def test_the_ssh_link_refuses_unknown_host_keys() -> None:
    assert "set_missing_host_key_policy(paramiko.RejectPolicy())" in (PACKAGE / "links" / "ssh.py").read_text()
