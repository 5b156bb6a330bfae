"""Just enough ELF64 to build the lab guest: sections, notes, and the kernel in a bzImage.

Three questions the guest builder asks of binaries, answered without binutils:

- ``modinfo_depends(ko)``: a kernel module's ``depends=`` (from its ``.modinfo`` section),
  which is what ``depmod`` turns into modules.dep. The Debian kernel package ships no
  modules.dep (``depmod`` runs at install time), so the builder computes the load order
  itself.
- ``has_pvh_note(elf)``: whether an ELF kernel carries the ``Xen`` note of type 18
  (``XEN_ELFNOTE_PHYS32_ENTRY``); QEMU's ``-kernel`` boots such an ELF through PVH, which
  skips the real-mode setup and the self-decompression (about 2 s under TCG).
- ``extract_vmlinux(bzimage)``: the logic of the kernel's ``scripts/extract-vmlinux``:
  look for a compressor's magic inside the bzImage, decompress from there, and keep the
  first result that is an ELF file.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import shutil
import struct
import subprocess
import zlib
from collections.abc import Callable, Iterator

ELF_MAGIC = b"\x7fELF"
PT_NOTE = 4
XEN_ELFNOTE_PHYS32_ENTRY = 18


def _check_elf64(data: bytes) -> None:
    if data[:4] != ELF_MAGIC or data[4] != 2 or data[5] != 1:
        raise ValueError("not a little-endian ELF64 file")


def sections(data: bytes) -> dict[str, bytes]:
    """The named sections of an ELF64 file.

    :param data: the whole file.
    :raise ValueError: when it is not a little-endian ELF64 file.
    :return: section name -> contents (empty for NOBITS sections).
    """
    _check_elf64(data)
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = []
    for index in range(shnum):
        base = shoff + index * shentsize
        name, kind = struct.unpack_from("<II", data, base)
        offset, size = struct.unpack_from("<QQ", data, base + 0x18)
        headers.append((name, kind, offset, size))
    str_off, str_size = headers[shstrndx][2], headers[shstrndx][3]
    strtab = data[str_off : str_off + str_size]
    result: dict[str, bytes] = {}
    for name, kind, offset, size in headers:
        label = strtab[name : strtab.index(b"\0", name)].decode("ascii", "replace")
        result[label] = b"" if kind == 8 else data[offset : offset + size]
    return result


def modinfo(data: bytes) -> dict[str, list[str]]:
    """The ``.modinfo`` key=value strings of a kernel module (a key may repeat)."""
    info: dict[str, list[str]] = {}
    for item in sections(data).get(".modinfo", b"").split(b"\0"):
        key, sep, value = item.decode("utf-8", "replace").partition("=")
        if sep:
            info.setdefault(key, []).append(value)
    return info


def modinfo_depends(data: bytes) -> list[str]:
    """The modules a kernel module depends on (``depends=a,b``), by module name."""
    names: list[str] = []
    for value in modinfo(data).get("depends", []):
        names.extend(part for part in value.split(",") if part)
    return names


def notes(data: bytes) -> Iterator[tuple[str, int, bytes]]:
    """The (name, type, descriptor) notes of an ELF64 file's PT_NOTE segments."""
    _check_elf64(data)
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for index in range(phnum):
        base = phoff + index * phentsize
        (kind,) = struct.unpack_from("<I", data, base)
        if kind != PT_NOTE:
            continue
        (offset,) = struct.unpack_from("<Q", data, base + 8)
        (size,) = struct.unpack_from("<Q", data, base + 32)
        pos, end = offset, offset + size
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
            pos += 12
            name = data[pos : pos + namesz].rstrip(b"\0").decode("ascii", "replace")
            pos += (namesz + 3) & ~3
            desc = data[pos : pos + descsz]
            pos += (descsz + 3) & ~3
            yield name, ntype, desc


def has_pvh_note(data: bytes) -> bool:
    """Whether an ELF kernel can be PVH-booted (has ``XEN_ELFNOTE_PHYS32_ENTRY``)."""
    try:
        return any(
            name == "Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY for name, ntype, _ in notes(data)
        )
    except (ValueError, struct.error):
        return False


def _gunzip(blob: bytes) -> bytes:
    return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(blob)


def _unxz(blob: bytes) -> bytes:
    return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(blob)


def _unlzma(blob: bytes) -> bytes:
    return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(blob)


def _bunzip2(blob: bytes) -> bytes:
    return bz2.BZ2Decompressor().decompress(blob)


def _unzstd(blob: bytes) -> bytes:
    tool = shutil.which("zstd")
    if tool is None:
        raise ValueError("zstd is not installed")
    proc = subprocess.run([tool, "-dc"], input=blob, capture_output=True, check=False)
    return proc.stdout


#: (magic, decompressor), in the order extract-vmlinux tries them.
COMPRESSORS: list[tuple[bytes, Callable[[bytes], bytes]]] = [
    (b"\x1f\x8b\x08", _gunzip),
    (b"\xfd7zXZ\x00", _unxz),
    (b"BZh", _bunzip2),
    (b"\x5d\x00\x00\x00", _unlzma),
    (b"\x28\xb5\x2f\xfd", _unzstd),
]


def extract_vmlinux(bzimage: bytes) -> tuple[bytes, str]:
    """Find and decompress the ELF kernel inside a bzImage (scripts/extract-vmlinux).

    :param bzimage: the compressed kernel image.
    :raise ValueError: when no compressed ELF is found.
    :return: (the ELF vmlinux, the compressor's name).
    """
    for magic, decompress in COMPRESSORS:
        start = bzimage.find(magic)
        while start != -1:
            try:
                out = decompress(bzimage[start:])
            except (OSError, EOFError, ValueError, lzma.LZMAError, zlib.error):
                out = b""
            if out[:4] == ELF_MAGIC:
                return out, decompress.__name__.lstrip("_")
            start = bzimage.find(magic, start + 1)
    raise ValueError("no compressed ELF kernel found in the image")


def decompress_module(name: str, data: bytes) -> bytes:
    """A kernel module's ELF bytes from ``.ko``, ``.ko.xz``, ``.ko.zst`` or ``.ko.gz``."""
    if name.endswith(".xz"):
        return lzma.decompress(data)
    if name.endswith(".zst"):
        return _unzstd(data)
    if name.endswith(".gz"):
        return gzip.decompress(data)
    return data
