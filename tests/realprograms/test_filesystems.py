"""Linux's own file systems on the paravirtual disk, written by real tools
in a guest and checked on the host.

Inside a guest: ``mkfs.ext4`` (or ``mkfs.fat``) on ``/dev/pvbus/disk0``,
``mount``, a file tree copied in by ``tar`` and ``cp``; a second guest
mounts it with ``--mount`` and adds to it.  On the host, with the guests
gone: ``e2fsck -fn`` / ``fsck.fat -n`` find the image clean, and every file
read back from the image is byte-identical to its source.  And the disk's
file itself, written at odd offsets and lengths by a program (read-modify-
write at the edges) and fsync'd, holds exactly those bytes on the host.
"""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

from .helpers import host, image_tree, make_tree, run_ok, skip_unless_ready, tool, tree_of


def test_ext4_tree_by_tar_and_cp_is_clean_and_identical_on_the_host(tmp_path: Path) -> None:
    skip_unless_ready("mkfs.ext4", "e2fsck", "tar")
    src, more, mnt, image = tmp_path / "src", tmp_path / "more", tmp_path / "mnt", tmp_path / "disk.img"
    for directory in (src, more, mnt):
        directory.mkdir()
    files = make_tree(src, seed=1)
    extra = {f"more/{k}": v for k, v in make_tree(more, seed=2).items()}
    with host(image, "48M") as (_, sock):
        run_ok(sock, f'mkfs.ext4 -q /dev/pvbus/disk0; mount -t ext4 /dev/pvbus/disk0 "{mnt}"; '
                     f'tar -C "{src}" -cf - . | tar -C "{mnt}" -xf -')
        out = run_ok(sock, f'cp -a "{more}" "{mnt}/more"; sync; ls "{mnt}"', mounts=(f"disk0:{mnt}:ext4",))
    assert "more" in out.split() and "top.txt" in out.split()
    fsck = subprocess.run([tool("e2fsck"), "-fn", str(image)], capture_output=True)
    assert fsck.returncode == 0, fsck.stdout.decode() + fsck.stderr.decode()
    assert image_tree(image, "ext4", tmp_path / "back") == {**files, **extra}


def _kernel_has(fstype: str) -> bool:
    with open("/proc/filesystems") as f:
        return any(line.split()[-1] == fstype for line in f if line.strip())


def test_vfat_tree_is_clean_and_identical_on_the_host(tmp_path: Path) -> None:
    """Through Linux's vfat driver where the kernel has it; else through
    mtools, another real program writing FAT through the disk's file."""
    by_kernel = _kernel_has("vfat")
    skip_unless_ready("mkfs.fat", "fsck.fat", *(() if by_kernel else ("mcopy",)))
    src, mnt, image = tmp_path / "src", tmp_path / "mnt", tmp_path / "disk.img"
    for directory in (src, mnt):
        directory.mkdir()
    files = make_tree(src, seed=3)
    copy_in = (f'mount -t vfat /dev/pvbus/disk0 "{mnt}"; cp -r "{src}/." "{mnt}/"' if by_kernel
               else f'mcopy -s -i /dev/pvbus/disk0 "{src}"/* ::/')
    with host(image, "40M") as (_, sock):
        run_ok(sock, f"mkfs.fat /dev/pvbus/disk0 >/dev/null; {copy_in}")
    fsck = subprocess.run([tool("fsck.fat"), "-n", str(image)], capture_output=True)
    assert fsck.returncode == 0, fsck.stdout.decode() + fsck.stderr.decode()
    if by_kernel:
        back = image_tree(image, "vfat", tmp_path / "back")
    else:
        (tmp_path / "back").mkdir()
        subprocess.run(["mcopy", "-s", "-i", str(image), "::/*", str(tmp_path / "back")], check=True,
                       capture_output=True)
        back = tree_of(tmp_path / "back")
    assert back == files


WRITER = '''
import json, os, sys

fd = os.open("/dev/pvbus/disk0", os.O_RDWR)
size = os.fstat(fd).st_size
for offset, data in json.load(sys.stdin):
    assert os.pwrite(fd, bytes.fromhex(data), offset) == len(data) // 2
os.fsync(fd)
tail = os.pread(fd, 100, size - 10)
print(json.dumps({"size": size, "tail_len": len(tail)}))
'''


def test_unaligned_writes_through_the_file_land_on_the_host_image(tmp_path: Path) -> None:
    skip_unless_ready()
    image, size = tmp_path / "disk.img", 4 << 20
    rng = random.Random(5)
    expected = bytearray(size)
    writes = []
    for _ in range(60):
        length = rng.choice([1, 7, 511, 513, 4095, 4097, 70_000, 1 << 20])
        offset = rng.randrange(0, size - length)
        data = rng.randbytes(length)
        expected[offset : offset + length] = data
        writes.append((offset, data.hex()))
    import json

    from .helpers import guest

    with host(image, "4M") as (_, sock):
        done = guest(sock, ["python3", "-c", WRITER], input=json.dumps(writes).encode())
    assert done.returncode == 0, done.stderr.decode()
    assert json.loads(done.stdout) == {"size": size, "tail_len": 10}  # a read crossing the end stops there
    assert image.read_bytes() == expected
