"""Installs the peer servers' packages into the bench's own work directory.

Node peers: ``npm install`` of ``bench/peers/package.json`` into ``<work>/node``; the
servers run with ``NODE_PATH`` pointing there. python-socketio: a virtualenv in
``<work>/pyenv`` with ``bench/peers/python-socketio/requirements.txt``. Both are reused
while the manifest is unchanged (its copy in the work dir is compared).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from chatd.bench.fleet import BenchError

ROOT = Path(__file__).resolve().parents[2]
PEERS = ROOT / "bench" / "peers"
INSTALL_TIMEOUT = 600


def _run(argv: list[str], cwd: Path, log: Path) -> None:
    with open(log, "ab") as out:
        try:
            done = subprocess.run(argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, timeout=INSTALL_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BenchError(f"{' '.join(argv)} failed: {exc} (log: {log})") from None
    if done.returncode:
        raise BenchError(f"{' '.join(argv)} exited with {done.returncode} (log: {log})")


def _fresh(manifest: Path, copy: Path, marker: Path) -> bool:
    return marker.exists() and copy.exists() and copy.read_bytes() == manifest.read_bytes()


def node_modules(work: Path) -> Path:
    """``<work>/node/node_modules`` with the Node peers' packages; installs them if needed."""
    manifest = PEERS / "package.json"
    if not manifest.exists():
        raise BenchError(f"{manifest} is missing: the peers ship with the source tree, not the wheel")
    if shutil.which("node") is None or shutil.which("npm") is None:
        raise BenchError("node and npm are needed for the Node peers")
    dest = work / "node"
    dest.mkdir(parents=True, exist_ok=True)
    copy, modules = dest / "package.json", dest / "node_modules"
    if not _fresh(manifest, copy, modules):
        shutil.copyfile(manifest, copy)
        lock = PEERS / "package-lock.json"
        if lock.exists():
            shutil.copyfile(lock, dest / "package-lock.json")
        _run(["npm", "install", "--no-audit", "--no-fund", "--omit=dev"], dest, work / "npm-install.log")
    return modules


def python_env(work: Path) -> Path:
    """The python of ``<work>/pyenv`` with python-socketio installed; creates it if needed."""
    manifest = PEERS / "python-socketio" / "requirements.txt"
    if not manifest.exists():
        raise BenchError(f"{manifest} is missing: the peers ship with the source tree, not the wheel")
    dest = work / "pyenv"
    python = dest / "bin" / "python"
    copy = dest / "requirements.txt"
    if not _fresh(manifest, copy, python):
        log = work / "pip-install.log"
        if not python.exists():
            _run([sys.executable, "-m", "venv", str(dest)], work, log)
        _run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", "-r", str(manifest)], work, log)
        shutil.copyfile(manifest, copy)
    return python
