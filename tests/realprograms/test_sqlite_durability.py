"""A database in a guest keeps every transaction it committed when the
host is SIGKILLed: ``fsync`` in the guest returns only after the host's
backend flushed (FUSE fsync -> SYNCHRONIZE CACHE -> fdatasync), so what a
commit promised is in the image.

The guest runs sqlite (the stdlib module in a subprocess) on ext4 mounted
with ``--mount``, committing rows and saying each one (write-ahead log,
``synchronous=FULL``: in the default rollback-journal mode the commit point
is the journal's unlink, which sqlite does not fsync, so the last commit
before a crash may roll back there on any disk); the test SIGKILLs the
host mid-stream.  A second host and guest on the same image (ext4 replays
its journal on mount) find every row that was said to be committed, the
database intact and, once unmounted cleanly, ``e2fsck -fn`` clean.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from .helpers import guest, guest_command, host, skip_unless_ready, tool

WRITER = '''
import sqlite3, sys

db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA journal_mode=WAL")  # a commit is an fsync'd append to the log
db.execute("PRAGMA synchronous=FULL")
db.execute("CREATE TABLE IF NOT EXISTS rows (id INTEGER PRIMARY KEY, payload BLOB)")
i = 0
while True:
    db.execute("BEGIN")
    db.execute("INSERT INTO rows VALUES (?, ?)", (i, bytes([i % 251]) * 3000))
    db.execute("COMMIT")
    print(i, flush=True)  # said only once the commit returned
    i += 1
'''

READER = '''
import json, sqlite3, sys

db = sqlite3.connect(sys.argv[1])
ids = [r[0] for r in db.execute("SELECT id FROM rows")]
bad = sum(payload != bytes([i % 251]) * 3000 for i, payload in db.execute("SELECT id, payload FROM rows"))
print(json.dumps({"ids": ids, "check": db.execute("PRAGMA integrity_check").fetchone()[0], "bad": bad}))
'''

COMMITS_BEFORE_KILL = 40


def test_committed_rows_survive_a_host_sigkill(tmp_path: Path) -> None:
    skip_unless_ready("mkfs.ext4", "e2fsck")
    image, mnt = tmp_path / "disk.img", tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run([tool("mkfs.ext4"), "-q", "-F", str(image), "32M"], check=True, capture_output=True)
    mounts = (f"disk0:{mnt}:ext4",)
    db = f"{mnt}/rows.db"
    committed: list[int] = []
    with host(image) as (host_proc, sock):
        proc = subprocess.Popen(guest_command(sock, ["python3", "-c", WRITER, db], mounts),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert proc.stdout is not None
            while len(committed) < COMMITS_BEFORE_KILL:
                line = proc.stdout.readline()
                assert line, f"the writer stopped: {proc.stderr.read().decode() if proc.stderr else ''}"
                committed.append(int(line))
            host_proc.kill()
            host_proc.wait()
            rest, _ = proc.communicate(timeout=60)
            committed += [int(x) for x in rest.split()]  # said before the guest saw its host go
            assert proc.returncode != 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    with host(image) as (_, sock):
        done = guest(sock, ["python3", "-c", READER, db], mounts)
    assert done.returncode == 0, done.stderr.decode()
    found = json.loads(done.stdout)
    assert found["check"] == "ok" and found["bad"] == 0
    assert set(committed) <= set(found["ids"]), sorted(set(committed) - set(found["ids"]))[:10]
    assert committed == list(range(len(committed)))
    fsck = subprocess.run([tool("e2fsck"), "-fn", str(image)], capture_output=True)
    assert fsck.returncode == 0, fsck.stdout.decode()
