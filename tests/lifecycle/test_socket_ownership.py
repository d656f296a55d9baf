"""Who owns the host's sockets and who may use them, with real processes.

- both sockets are created owner-only (0600); another user cannot connect,
  and if the file is opened up anyway, the host refuses the peer by its
  credentials (one log line) and goes on serving;
- ``--group`` shares them with one group (0660, the file's group), members
  by primary or supplementary group get in, a real guest of that group
  boots; an unknown group is one line before anything starts;
- a second host on a live socket refuses with one line and a non-zero
  status, and the first host is still reachable after;
- a host removes only the socket file it created; a stale socket is
  replaced, a user's file at the path is never touched.
"""

from __future__ import annotations

import errno
import grp
import json
import os
import socket
import stat
from pathlib import Path

import pytest

from ..bus.harness import run_guest
from ..hostile.processes import (
    OTHER_UID,
    as_user,
    logged_host,
    shared_dir,  # noqa: F401 - a fixture
    start_host,
    wait_ready,
)

INSPECT = '{"cmd": "inspect"}\n'


def _mode(path: str) -> int:
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode), path
    return stat.S_IMODE(st.st_mode)


def _shared_group() -> grp.struct_group:
    for name in ("staff", "users", "nogroup"):
        try:
            return grp.getgrnam(name)
        except KeyError:
            continue
    pytest.skip("no staff, users or nogroup group on this machine")


def _closed_unanswered(seen: dict[str, object]) -> bool:
    """The client connected and the host closed on it without a word (its
    request either unread or unsent by the time the close arrived)."""
    return seen["connect"] == 0 and (seen.get("answer") == "" or seen.get("error") in (errno.EPIPE, errno.ECONNRESET))


def _one_line(text: str) -> str:
    lines = [x for x in text.splitlines() if x.strip()]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


def test_sockets_are_owner_only_and_other_users_are_refused(shared_dir: Path) -> None:  # noqa: F811
    with logged_host(shared_dir) as host:
        admin = f"{host.socket}.admin"
        assert _mode(host.socket) == 0o600
        assert _mode(admin) == 0o600
        # The file's mode keeps another user out...
        assert as_user(OTHER_UID, OTHER_UID, admin, line=INSPECT)["connect"] == errno.EACCES
        assert as_user(OTHER_UID, OTHER_UID, host.socket, "guest")["connect"] == errno.EACCES
        # ...and with the files opened up, the host still refuses the peer by its credentials.
        os.chmod(admin, 0o666)
        os.chmod(host.socket, 0o666)
        assert _closed_unanswered(as_user(OTHER_UID, OTHER_UID, admin, line=INSPECT))
        seen = as_user(OTHER_UID, OTHER_UID, host.socket, "guest")
        assert seen["connect"] == 0 and seen.get("status") is None, seen  # closed before any answer
        assert host.inspect()["partitions"] == []
        log = host.log()
        assert "admin socket: refused pid" in log and f"(uid {OTHER_UID}, gid {OTHER_UID})" in log
        assert "guest socket: refused pid" in log
        assert "Traceback" not in log
        # The owner is served as before.
        assert host.inspect()["ok"]
        rc, lines, err = run_guest(host, "echo-demo", "200")
        assert rc == 0, err
        assert host.stop() == 0


def test_group_shares_the_sockets(shared_dir: Path) -> None:  # noqa: F811
    group = _shared_group()
    with logged_host(shared_dir, "--group", group.gr_name) as host:
        admin = f"{host.socket}.admin"
        for path in (host.socket, admin):
            assert _mode(path) == 0o660
            assert os.lstat(path).st_gid == group.gr_gid
        # a member by primary group, and one by supplementary group
        for gid, extra in ((group.gr_gid, []), (OTHER_UID, [group.gr_gid])):
            seen = as_user(OTHER_UID, gid, admin, line=INSPECT, extra_groups=extra)
            assert seen["connect"] == 0 and json.loads(seen["answer"])["ok"] is True, seen
        # not a member: kept out by the file, and by the credentials check when the file is opened up
        assert as_user(OTHER_UID + 1, OTHER_UID + 1, admin, line=INSPECT)["connect"] == errno.EACCES
        os.chmod(admin, 0o666)
        assert _closed_unanswered(as_user(OTHER_UID + 1, OTHER_UID + 1, admin, line=INSPECT))
        assert f"(uid {OTHER_UID + 1}, gid {OTHER_UID + 1})" in host.log()
        # a guest of the group gets its CONNECT answered with success
        assert as_user(OTHER_UID, group.gr_gid, host.socket, "guest") == {"connect": 0, "status": 0}
        assert "guest socket: refused" not in host.log()
        assert host.stop() == 0


def test_unknown_group_is_one_line(tmp_path: Path) -> None:
    proc = start_host(tmp_path / "h.sock", tmp_path / "log", "--group", "no-such-group-pvbus")
    try:
        assert proc.wait(timeout=60) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "no-such-group-pvbus" in _one_line((tmp_path / "log").read_text())
    assert not (tmp_path / "h.sock").exists()


def test_second_host_refuses_a_live_socket(tmp_path: Path) -> None:
    with logged_host(tmp_path) as first:
        second = start_host(first.socket, tmp_path / "second.log")
        try:
            assert wait_ready(second) == ""  # never says ready
            assert second.wait(timeout=60) != 0
        finally:
            if second.poll() is None:
                second.kill()
                second.wait()
        line = _one_line((tmp_path / "second.log").read_text())
        assert first.socket in line and "another host" in line
        # the first host is untouched and still reachable
        assert first.inspect()["ok"]
        rc, lines, err = run_guest(first, "echo-demo", "200")
        assert rc == 0, err
        assert first.stop() == 0
    assert not os.path.lexists(first.socket)  # and it cleaned up what it made


def test_host_removes_only_its_own_socket_files(tmp_path: Path) -> None:
    with logged_host(tmp_path) as host:
        # Something else takes both paths over while the host runs.
        others = []
        for path in (host.socket, f"{host.socket}.admin"):
            os.unlink(path)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(path)
            s.listen(1)
            others.append((s, path, os.lstat(path).st_ino))
        try:
            assert host.stop() == 0
            for _, path, inode in others:
                assert os.lstat(path).st_ino == inode, f"the host removed {path}, which it no longer owned"
            assert "no longer the socket this host created" in host.log()
        finally:
            for s, _, _ in others:
                s.close()


def test_stale_socket_is_replaced_and_a_users_file_is_never_touched(tmp_path: Path) -> None:
    sock = tmp_path / "host.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(str(sock))
    stale.close()  # the file stays behind, nobody listens: a host that died
    with logged_host(tmp_path) as host:
        rc, lines, err = run_guest(host, "echo-demo", "200")
        assert rc == 0, err
        assert host.stop() == 0

    precious = tmp_path / "data.img"
    precious.write_bytes(b"the user's data" * 100)
    proc = start_host(precious, tmp_path / "file.log")
    try:
        assert proc.wait(timeout=60) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert precious.read_bytes() == b"the user's data" * 100
    line = _one_line((tmp_path / "file.log").read_text())
    assert str(precious) in line and "not a socket" in line
