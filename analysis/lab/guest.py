"""``tsprobe lab build-guest``: the lab guest, a Debian kernel and an initramfs, cached.

What goes in, and where it comes from:

- the kernel: ``apt-get download`` of the image package ``linux-image-amd64`` depends on
  (e.g. ``linux-image-6.1.0-56-amd64``), unpacked with ``dpkg-deb -x`` into a scratch
  directory (never installed). The ELF ``vmlinux`` is extracted from the bzImage
  (``analysis.lab.elf.extract_vmlinux``) and used when it has a PVH note, which QEMU
  boots directly (about 2 s faster under TCG); otherwise the bzImage is used.
- the virtio modules (virtio, virtio_ring, virtio_pci and its helpers, virtio_net,
  net_failover, failover) from the same package; the package ships no modules.dep, so
  the load order comes from each module's ``.modinfo`` ``depends=``. ``.ko.xz``/``.ko.zst``
  are decompressed here, so busybox ``insmod`` loads plain ``.ko`` files.
- busybox-static (``apt-get download`` unless the apt cache already holds it).
- the host's ``/usr/bin/python3.11`` with its shared libraries (from ``ldd``), and the
  stdlib modules the guest runs: found by running the agent, a stall sampler and the lab
  hooks on the host with ``-X importtime`` against the staged tree, plus a few modules
  needed only on error paths. Bytecode only (legacy ``.pyc`` beside where the ``.py``
  was), except ``os.py``'s landmark.
- the agent's dependencies from this interpreter's site-packages (psutil,
  prometheus_client, click) and tsprobe's guest packages (probe, agent, tsprobe; never
  analysis), under ``/opt/tsprobe``, unpacked from the wheel built from this checkout
  (``analysis.lab.wheel``: what a user would ``pip install``; manifest ``tsprobe_wheel``);
  the lab hooks as ``/opt/tsprobe/lab/hooks.py``
  (``analysis/lab/guest_hooks.py``), the memory workload as ``/opt/tsprobe/lab/workload.py``
  (``analysis/lab/guest_workload.py``, builtins only) and ``/init``
  (``analysis/lab/init.sh``).

The result lives under the cache directory (``$TSPROBE_CACHE`` or
``~/.cache/tsprobe/guest``) in ``guests/KEY/`` where KEY hashes every input: package
versions, the python binary, the sources of the packages copied in and of the builder
itself. A second build with the same inputs finds ``guests/KEY/manifest.json`` and
returns at once. ``apt-get update`` runs only when a download fails for lack of lists.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from analysis.lab import cpio, elf
from analysis.lab.errors import GuestBuildError
from analysis.lab.wheel import build_wheel, checkout_root, sha256, unpack_packages

#: Bump when the layout of the guest changes in a way the inputs do not show.
BUILD_FORMAT = 3
PYTHON = "/usr/bin/python3.11"
PY_VERSION = "3.11"
STDLIB = f"/usr/lib/python{PY_VERSION}"
GUEST_OPT = "opt/tsprobe"
META_PACKAGE = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"
APT_ARCHIVES = Path("/var/cache/apt/archives")
WANTED_MODULES = ("virtio_net", "virtio_pci")
GUEST_PACKAGES = ("probe", "agent", "tsprobe")
DEPENDENCIES = ("psutil", "prometheus_client", "click")
DIST_NAMES = {"psutil": "psutil", "prometheus_client": "prometheus-client", "click": "click"}
#: Files of the dependencies the guest never needs.
SKIP_FILES = re.compile(r"(^|/)(tests?|__pycache__)(/|$)|_ps(aix|bsd|osx|sunos|windows)\.py$")
#: Stdlib modules used only on paths the discovery run may not take (errors, help).
EXTRA_STDLIB = (
    "encodings",
    "encodings.aliases",
    "encodings.utf_8",
    "encodings.latin_1",
    "encodings.ascii",
    "encodings.idna",
    "stringprep",
    "os",
    "traceback",
    "linecache",
    "tokenize",
    "token",
    "argparse",
    "gettext",
    "locale",
    "shutil",
    "textwrap",
    "difflib",
)
#: Builds kept in the cache (older ones are removed after a build).
KEEP_BUILDS = 3
HERE = Path(__file__).resolve().parent
INIT_SCRIPT = HERE / "init.sh"
HOOKS_SCRIPT = HERE / "guest_hooks.py"
WORKLOAD_SCRIPT = HERE / "guest_workload.py"
#: The kernel command line every lab guest gets (scenarios append their own words).
#: ``cryptomgr.notests`` and ``initcall_blacklist=crypto_kdf108_init`` skip the crypto
#: self-tests, a large part of the kernel's start under TCG (docs/lab-notes.md). The lab
#: guest uses no kernel crypto that needs them.
BASE_CMDLINE = (
    "console=ttyS0 loglevel=5 panic=-1 rdinit=/init"
    " cryptomgr.notests initcall_blacklist=crypto_kdf108_init"
)

Log = Callable[[str], None]


@dataclass(frozen=True)
class Guest:
    """A built guest: what QEMU's ``-kernel`` and ``-initrd`` take, and how it was made."""

    key: str
    directory: Path
    kernel: Path
    initrd: Path
    boot: str  # "pvh" (ELF vmlinux) or "bzimage"
    manifest: dict[str, Any]


def cache_dir() -> Path:
    """The guest cache: ``$TSPROBE_CACHE`` or ``~/.cache/tsprobe/guest``."""
    env = os.environ.get("TSPROBE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "tsprobe" / "guest"


def _run(cmd: list[str], cwd: Path | None = None, timeout: float = 600) -> str:
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError as err:
        raise GuestBuildError(f"{cmd[0]} is not installed") from err
    except subprocess.TimeoutExpired as err:
        raise GuestBuildError(f"{' '.join(cmd)}: no answer after {timeout:.0f} s") from err
    if proc.returncode != 0:
        last = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] or ["?"]
        raise GuestBuildError(f"{' '.join(cmd)} failed: {last[0]}")
    return proc.stdout


# -- apt ----------------------------------------------------------------------------------


class _Apt:
    """apt-cache / apt-get download, with one ``apt-get update`` when lists are missing."""

    def __init__(self, log: Log) -> None:
        self.log = log
        self.updated = False

    def _retry(self, cmd: list[str], cwd: Path | None = None) -> str:
        try:
            return _run(cmd, cwd)
        except GuestBuildError:
            if self.updated:
                raise
            self.log("apt: no package lists for this yet: running apt-get update once")
            _run(["apt-get", "update"])
            self.updated = True
            return _run(cmd, cwd)

    def depends(self, package: str) -> str:
        out = self._retry(["apt-cache", "depends", package])
        match = re.search(r"^\s*Depends:\s*(linux-image-\S+)", out, re.M)
        if not match:
            raise GuestBuildError(f"{package} depends on no linux-image package")
        return match.group(1)

    def version(self, package: str) -> str:
        out = self._retry(["apt-cache", "show", "--no-all-versions", package])
        match = re.search(r"^Version:\s*(\S+)", out, re.M)
        if not match:
            raise GuestBuildError(f"apt knows no version of {package}")
        return match.group(1)

    def fetch(self, package: str, version: str, debs: Path) -> Path:
        """The .deb of ``package`` at ``version``: from the caches, else downloaded."""
        for where in (debs, APT_ARCHIVES):
            for path in sorted(where.glob(f"{package}_*.deb")):
                if _deb_field(path, "Version") == version:
                    return path
        self.log(f"apt: downloading {package} {version}")
        debs.mkdir(parents=True, exist_ok=True)
        self._retry(["apt-get", "download", f"{package}={version}"], cwd=debs)
        for path in sorted(debs.glob(f"{package}_*.deb")):
            if _deb_field(path, "Version") == version:
                return path
        raise GuestBuildError(f"apt-get download {package} left no .deb in {debs}")


def _deb_field(path: Path, field: str) -> str:
    return _run(["dpkg-deb", "-f", str(path), field]).strip()


# -- inputs and the cache key --------------------------------------------------------------


@dataclass(frozen=True)
class Inputs:
    """Everything a guest is built from."""

    kernel_package: str
    kernel_version: str
    busybox_version: str
    packages: dict[str, Path]  # import name -> package directory (ours and dependencies)
    versions: dict[str, str]

    def key(self) -> str:
        """The content hash naming the build in the cache."""
        digest = hashlib.sha256()
        digest.update(f"format {BUILD_FORMAT}\n".encode())
        for item in (self.kernel_package, self.kernel_version, self.busybox_version):
            digest.update(item.encode() + b"\n")
        digest.update(json.dumps(self.versions, sort_keys=True).encode())
        digest.update(_file_hash(Path(PYTHON)).encode())
        for path in (
            Path(__file__),
            HERE / "wheel.py",
            INIT_SCRIPT,
            HOOKS_SCRIPT,
            WORKLOAD_SCRIPT,
            HERE / "elf.py",
            HERE / "cpio.py",
        ):
            digest.update(_file_hash(path).encode())
        for name in GUEST_PACKAGES:
            for path in _package_files(self.packages[name]):
                digest.update(str(path.relative_to(self.packages[name].parent)).encode())
                digest.update(_file_hash(path).encode())
        return digest.hexdigest()[:20]


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _package_files(root: Path) -> list[Path]:
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and not SKIP_FILES.search(p.relative_to(root).as_posix())
    )


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise GuestBuildError(f"the Python package {name} is not installed here")
    return Path(next(iter(spec.submodule_search_locations)))


def _lists_stamp() -> str:
    """What apt's answers depend on: the package lists' names, sizes and mtimes."""
    parts = []
    for path in sorted(Path("/var/lib/apt/lists").glob("*Packages*")):
        st = path.stat()
        parts.append(f"{path.name} {st.st_size} {st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _resolve_packages(apt: _Apt, cache: Path) -> tuple[str, str, str]:
    """(kernel image package, its version, busybox-static version).

    apt-cache takes about a second per call here, so the answer is kept in the cache
    and reused while apt's package lists are unchanged.
    """
    memo = cache / "apt-resolution.json"
    stamp = _lists_stamp()
    try:
        saved = json.loads(memo.read_text())
        if saved.get("stamp") == stamp:
            return saved["kernel"], saved["kernel_version"], saved["busybox_version"]
    except (OSError, ValueError, KeyError):
        pass
    kernel = apt.depends(META_PACKAGE)
    result = (kernel, apt.version(kernel), apt.version(BUSYBOX_PACKAGE))
    memo.write_text(
        json.dumps(
            {
                "stamp": _lists_stamp(),
                "kernel": result[0],
                "kernel_version": result[1],
                "busybox_version": result[2],
            }
        )
    )
    return result


def gather_inputs(apt: _Apt, cache: Path) -> Inputs:
    """Resolve the package versions and source locations (fast: no download)."""
    kernel, kernel_version, busybox_version = _resolve_packages(apt, cache)
    packages = {name: _package_dir(name) for name in (*GUEST_PACKAGES, *DEPENDENCIES)}
    versions = {name: importlib.metadata.version(DIST_NAMES[name]) for name in DEPENDENCIES}
    if not Path(PYTHON).exists():
        raise GuestBuildError(f"{PYTHON} is missing: the guest copies the host's python")
    return Inputs(kernel, kernel_version, busybox_version, packages, versions)


# -- building -----------------------------------------------------------------------------


def _module_order(modules_root: Path, wanted: Iterable[str]) -> list[tuple[str, Path]]:
    """The modules ``wanted`` needs, dependencies first (what modules.dep would say)."""
    index: dict[str, Path] = {}
    for path in modules_root.rglob("*.ko*"):
        stem = path.name.split(".ko")[0]
        index[stem.replace("-", "_")] = path
    order: list[tuple[str, Path]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        key = name.replace("-", "_")
        if key in seen:
            return
        seen.add(key)
        path = index.get(key)
        if path is None:
            raise GuestBuildError(f"kernel module {name} is not in the kernel package")
        data = elf.decompress_module(path.name, path.read_bytes())
        for dep in elf.modinfo_depends(data):
            visit(dep)
        order.append((key, path))

    for name in wanted:
        visit(name)
    return order


def _ldd(binary: Path) -> list[Path]:
    paths = []
    for line in _run(["ldd", str(binary)]).splitlines():
        match = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
        if match:
            paths.append(Path(match.group(1)))
    return paths


def _copy_real(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src.resolve(), dst)
    shutil.copymode(src.resolve(), dst)


def _stage_packages(inputs: Inputs, opt: Path, work: Path, log: Log) -> dict[str, str] | None:
    """Stage the dependencies from site-packages and tsprobe's guest packages from the
    wheel built from this checkout (``analysis.lab.wheel``; without a checkout, from the
    installed packages).

    :return: the wheel's name and SHA-256, or None when there was no checkout.
    """
    root = checkout_root()
    for name, path in inputs.packages.items():
        if root is not None and name in GUEST_PACKAGES:
            continue
        for file in _package_files(path):
            _copy_real(file, opt / name / file.relative_to(path))
    if root is None:
        log("tsprobe: no checkout here: the guest gets the installed packages")
        return None
    wheel = build_wheel(root, work / "wheel")
    files = unpack_packages(wheel, GUEST_PACKAGES, opt)
    log(f"tsprobe: {wheel.name} built; {len(files)} files of {', '.join(GUEST_PACKAGES)}")
    return {"wheel": wheel.name, "sha256": sha256(wheel)}


_FIND_SPECS = """
import importlib.util, json, sys
out = {}
for name in json.load(sys.stdin):
    try:
        spec = importlib.util.find_spec(name)
    except Exception:
        continue
    if spec is not None and spec.origin and spec.origin.startswith("/"):
        out[name] = spec.origin
print(json.dumps(out))
"""

_COMPILE = """
import json, py_compile, sys
for src, dst, shown in json.load(sys.stdin):
    py_compile.compile(src, cfile=dst, dfile=shown, doraise=True,
                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
"""


def _importtime_modules(text: str) -> set[str]:
    names = set()
    for line in text.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name and name != "imported package":
                names.add(name)
    return names


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _discover_stdlib(opt: Path, log: Log) -> set[str]:
    """Run the agent, a sampler and the hooks from ``opt`` with -X importtime."""
    env = {**os.environ, "PYTHONPATH": str(opt), "PYTHONDONTWRITEBYTECODE": "1"}
    names: set[str] = set()
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="tsprobe-discover-") as tmp:
        agent_cmd = [
            PYTHON, "-X", "importtime", "-S", "-m", "tsprobe.cli", "agent",
            "--interval", "1ms", "--threshold", "50ms", "--listen", f"127.0.0.1:{port}",
            "--events", f"{tmp}/events.jsonl", "--duration", "5s",
        ]  # fmt: skip
        proc = subprocess.Popen(
            agent_cmd, cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 4.5
        asked: set[str] = set()
        while time.monotonic() < deadline and len(asked) < 5:
            for path in ("/healthz", "/metrics", "/events?since=0", "/clock", "/nope"):
                if path in asked:
                    continue
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2):
                        asked.add(path)
                except OSError as err:
                    if getattr(err, "code", None):  # an HTTP error answer is an answer
                        asked.add(path)
            time.sleep(0.2)
        _, stderr = proc.communicate(timeout=30)
        names |= _importtime_modules(stderr.decode(errors="replace"))
        sampler = [
            PYTHON, "-X", "importtime", "-I", "-S", "-c",
            f"import sys; sys.path.insert(0, {str(opt)!r}); "
            "from probe.stall import main; sys.exit(main(sys.argv[2:]))",
            "probe.stall", "--cpu", "0", "--interval-ns", "1000000",
            "--threshold-ns", "50000000", "--mode", "tick", "--no-fifo",
        ]  # fmt: skip
        sproc = subprocess.Popen(sampler, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.5)
        sproc.kill()
        names |= _importtime_modules(sproc.communicate()[1].decode(errors="replace"))
        hooks = subprocess.run(
            [PYTHON, "-X", "importtime", "-S", str(HOOKS_SCRIPT), "selftest"],
            capture_output=True,
            text=True,
            check=False,
        )
        names |= _importtime_modules(hooks.stderr)
    log(f"python: {len(names)} modules imported by the agent, a sampler and the hooks")
    return names | set(EXTRA_STDLIB)


def _stage_python(root: Path, modules: set[str], log: Log) -> None:
    _copy_real(Path(PYTHON), root / PYTHON.lstrip("/"))
    for lib in _ldd(Path(PYTHON)):
        _copy_real(lib, root / str(lib).lstrip("/"))
    # Parents of dotted names, so packages come with their __init__.
    full = set(modules)
    for name in modules:
        parts = name.split(".")
        full.update(".".join(parts[:i]) for i in range(1, len(parts)))
    out = subprocess.run(
        [PYTHON, "-I", "-S", "-c", _FIND_SPECS],
        input=json.dumps(sorted(full)),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    origins = {name: Path(origin) for name, origin in json.loads(out).items()}
    jobs = []
    count = 0
    for origin in sorted(set(origins.values())):
        if not str(origin).startswith(STDLIB + "/") or "-packages/" in str(origin):
            continue
        dest = root / str(origin).lstrip("/")
        if origin.suffix == ".py":
            jobs.append([str(origin), str(dest.with_suffix(".pyc")), str(origin)])
        else:
            _copy_real(origin, dest)
            for lib in _ldd(origin):
                _copy_real(lib, root / str(lib).lstrip("/"))
        count += 1
    # getpath's landmarks: lib/pythonX.Y/os.py and lib-dynload.
    _copy_real(Path(STDLIB) / "os.py", root / STDLIB.lstrip("/") / "os.py")
    (root / STDLIB.lstrip("/") / "lib-dynload").mkdir(parents=True, exist_ok=True)
    _compile(jobs)
    log(f"python: {count} stdlib files (bytecode) and {PYTHON} with its libraries")


def _compile(jobs: list[list[str]]) -> None:
    if not jobs:
        return
    for _, dst, _ in jobs:
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [PYTHON, "-I", "-S", "-c", _COMPILE],
        input=json.dumps(jobs),
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise GuestBuildError(f"compiling to bytecode failed: {proc.stderr.strip()[-300:]}")


def _bytecode_only(tree: Path, shown_root: str) -> None:
    """Replace every .py under ``tree`` by a legacy .pyc (the guest has no compiler use)."""
    jobs = []
    for path in sorted(tree.rglob("*.py")):
        shown = f"{shown_root}/{path.relative_to(tree).as_posix()}"
        jobs.append([str(path), str(path.with_suffix(".pyc")), shown])
    _compile(jobs)
    for src, _, _ in jobs:
        Path(src).unlink()


def _human(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{size} B"
        size /= 1024  # type: ignore[assignment]
    return f"{size} B"


def _stage_kernel(bzimage: Path, out: Path, log: Log) -> tuple[Path, str]:
    """The kernel to boot, in ``out``: the ELF vmlinux extracted from the bzImage when it
    has a PVH note (PVH boot is faster), else the bzImage itself.

    :return: the kernel file and the boot method (``pvh`` or ``bzimage``).
    """
    boot = "bzimage"
    kernel = out / "bzImage"
    try:
        vmlinux, how = elf.extract_vmlinux(bzimage.read_bytes())
        if elf.has_pvh_note(vmlinux):
            kernel = out / "vmlinux"
            kernel.write_bytes(vmlinux)
            boot = "pvh"
            log(f"kernel: ELF vmlinux extracted ({how}), has a PVH note: PVH boot")
        else:
            log("kernel: the extracted vmlinux has no PVH note: booting the bzImage")
    except ValueError as err:
        log(f"kernel: no vmlinux in the bzImage ({err}): booting the bzImage")
    if boot == "bzimage":
        shutil.copyfile(bzimage, kernel)
    return kernel, boot


def _write_initramfs(root: Path, out: Path) -> tuple[Path, int]:
    """The initramfs of ``root``, uncompressed (under TCG unpacking a compressed one costs
    the boot more than the larger cache entry costs; docs/lab-notes.md has the figures),
    with /dev/console and /dev/null.

    :return: the file and its number of entries.
    """
    initrd = out / "initramfs.cpio"
    with open(initrd, "wb") as fh:
        writer = cpio.CpioWriter(fh)
        writer.chardev("dev/console", 5, 1)
        writer.chardev("dev/null", 1, 3, 0o666)
        entries = writer.tree(root)
        writer.close()
    return initrd, entries


def _build(inputs: Inputs, apt: _Apt, cache: Path, work: Path, log: Log) -> dict[str, Any]:
    debs = cache / "debs"
    kdeb = apt.fetch(inputs.kernel_package, inputs.kernel_version, debs)
    bdeb = apt.fetch(BUSYBOX_PACKAGE, inputs.busybox_version, debs)
    log(f"kernel: {kdeb.name} ({_human(kdeb.stat().st_size)}), busybox: {bdeb.name}")
    unpack = work / "unpack"
    for part in ("kernel", "busybox"):
        (unpack / part).mkdir(parents=True)
    _run(["dpkg-deb", "-x", str(kdeb), str(unpack / "kernel")])
    _run(["dpkg-deb", "-x", str(bdeb), str(unpack / "busybox")])
    bzimage = next((unpack / "kernel" / "boot").glob("vmlinuz-*"), None)
    if bzimage is None:
        raise GuestBuildError(f"{kdeb.name} holds no /boot/vmlinuz-*")
    out = work / "out"
    out.mkdir()
    kernel, boot = _stage_kernel(bzimage, out, log)

    root = work / "root"
    for name in ("bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "run"):
        (root / name).mkdir(parents=True, exist_ok=True)
    _copy_real(unpack / "busybox" / "bin" / "busybox", root / "bin" / "busybox")
    (root / "bin" / "sh").symlink_to("busybox")

    modroot = next((unpack / "kernel" / "lib" / "modules").iterdir())
    order = _module_order(modroot, WANTED_MODULES)
    moddir = root / "lib" / "modules"
    moddir.mkdir(parents=True)
    for name, path in order:
        (moddir / f"{name}.ko").write_bytes(elf.decompress_module(path.name, path.read_bytes()))
    (moddir / "load-order").write_text("".join(f"{name}.ko\n" for name, _ in order))
    log(f"modules: {' '.join(name for name, _ in order)} (load order)")

    opt = root / GUEST_OPT
    wheel = _stage_packages(inputs, opt, work, log)
    modules = _discover_stdlib(opt, log)
    _stage_python(root, modules, log)
    _bytecode_only(opt, "/" + GUEST_OPT)
    _copy_real(HOOKS_SCRIPT, opt / "lab" / "hooks.py")
    _copy_real(WORKLOAD_SCRIPT, opt / "lab" / "workload.py")
    _copy_real(INIT_SCRIPT, root / "init")
    os.chmod(root / "init", 0o755)

    initrd, entries = _write_initramfs(root, out)
    sizes = {"kernel": kernel.stat().st_size, "initramfs": initrd.stat().st_size}
    log(
        f"initramfs: {entries} entries, {_human(sizes['initramfs'])} (uncompressed); "
        f"kernel {kernel.name} {_human(sizes['kernel'])}"
    )
    return {
        "format": BUILD_FORMAT,
        "kernel": kernel.name,
        "initrd": initrd.name,
        "boot": boot,
        "kernel_package": f"{inputs.kernel_package} {inputs.kernel_version}",
        "busybox": inputs.busybox_version,
        "python": PYTHON,
        "dependencies": inputs.versions,
        "tsprobe_wheel": wheel,
        "modules": [name for name, _ in order],
        "sizes": sizes,
        "cmdline": BASE_CMDLINE,
    }


def build_guest(cache: Path | None = None, force: bool = False, log: Log | None = None) -> Guest:
    """Build the lab guest, or return the cached one built from the same inputs.

    :param cache: the cache directory (default ``cache_dir()``).
    :param force: rebuild even when the cache holds this build.
    :param log: called with one line per step (default: print with a ``build-guest:`` prefix).
    :raise GuestBuildError: when a package cannot be fetched or a file is missing.
    :return: the guest.
    """
    say: Log = log or (lambda line: print(f"build-guest: {line}", flush=True))
    cache = cache or cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    apt = _Apt(say)
    with open(cache / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        inputs = gather_inputs(apt, cache)
        key = inputs.key()
        final = cache / "guests" / key
        if (final / "manifest.json").exists() and not force:
            guest = load_guest(final)
            say(
                f"cached guest {key}: {guest.kernel.name} "
                f"{_human(guest.kernel.stat().st_size)}, {guest.initrd.name} "
                f"{_human(guest.initrd.stat().st_size)} ({final})"
            )
            return guest
        started = time.monotonic()
        say(f"building guest {key} in {final}")
        (cache / "guests").mkdir(exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="build-", dir=cache) as tmp:
            manifest = _build(inputs, apt, cache, Path(tmp), say)
            manifest["key"] = key
            manifest["build_seconds"] = round(time.monotonic() - started, 1)
            (Path(tmp) / "out" / "manifest.json").write_text(json.dumps(manifest, indent=2))
            if final.exists():
                shutil.rmtree(final)
            os.replace(Path(tmp) / "out", final)
        say(f"done in {manifest['build_seconds']} s")
        _prune(cache / "guests", keep=KEEP_BUILDS, log=say)
        return load_guest(final)


def _prune(guests: Path, keep: int, log: Log) -> None:
    """Remove all but the ``keep`` newest builds (each is about 70 MiB)."""
    builds = sorted(
        (p for p in guests.iterdir() if (p / "manifest.json").exists()),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for old in builds[keep:]:
        shutil.rmtree(old, ignore_errors=True)
        log(f"removed the older build {old.name}")


def load_guest(directory: Path) -> Guest:
    """Read a built guest from its cache directory.

    :raise GuestBuildError: when the directory holds no complete build.
    """
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError) as err:
        raise GuestBuildError(f"{directory}: not a built guest ({err})") from err
    return Guest(
        key=str(manifest.get("key", directory.name)),
        directory=directory,
        kernel=directory / manifest["kernel"],
        initrd=directory / manifest["initrd"],
        boot=str(manifest["boot"]),
        manifest=manifest,
    )


if __name__ == "__main__":  # pragma: no cover
    build_guest(force="--force" in sys.argv)
