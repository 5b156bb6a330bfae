"""A ``newc`` cpio writer for the guest's initramfs (no root, no cpio tool needed).

The kernel unpacks an initramfs in the "new ASCII" cpio format: per entry a 110-byte
header (``070701`` and 13 eight-digit hex fields: inode, mode, uid, gid, nlink, mtime,
file size, device major/minor, rdev major/minor, name size, checksum), the NUL-terminated
name padded to 4 bytes, then the data padded to 4 bytes; ``TRAILER!!!`` ends the archive.
Writing it here lets the builder add ``/dev/console`` (a character device the kernel
needs before ``/init`` mounts devtmpfs) without being root, and makes the archive
reproducible: entries sorted, owner root, mtime 0.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO


class CpioWriter:
    """Write entries to a newc cpio stream."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._ino = 1

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        encoded = name.encode() + b"\0"
        fields = [
            self._ino,
            mode,
            0,
            0,
            2 if stat.S_ISDIR(mode) else 1,
            0,
            len(data),
            0,
            0,
            rdev[0],
            rdev[1],
            len(encoded),
            0,
        ]
        self._ino += 1
        header = b"070701" + b"".join(f"{value:08x}".encode() for value in fields)
        self._out.write(header + encoded)
        self._out.write(b"\0" * (-(len(header) + len(encoded)) % 4))
        self._out.write(data)
        self._out.write(b"\0" * (-len(data) % 4))

    def directory(self, name: str, perm: int = 0o755) -> None:
        """Add a directory."""
        self._entry(name, stat.S_IFDIR | perm)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        """Add a regular file."""
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        """Add a symbolic link."""
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        """Add a character device node."""
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def tree(self, root: Path) -> int:
        """Add everything under ``root`` (sorted; names relative to it).

        :return: the number of entries added.
        """
        count = 0
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            base = Path(dirpath)
            rel_dir = base.relative_to(root).as_posix()
            if rel_dir != ".":
                self.directory(rel_dir, stat.S_IMODE(base.stat().st_mode))
                count += 1
            for name in sorted(filenames + [d for d in dirnames if (base / d).is_symlink()]):
                path = base / name
                rel = path.relative_to(root).as_posix()
                st = path.lstat()
                if stat.S_ISLNK(st.st_mode):
                    self.symlink(rel, os.readlink(path))
                else:
                    self.file(rel, path.read_bytes(), stat.S_IMODE(st.st_mode))
                count += 1
        return count

    def close(self) -> None:
        """Write the trailer (the stream itself is the caller's to close)."""
        self._entry("TRAILER!!!", 0)
