"""Keep ``trellis-cni`` installed on a node: the executable, and our entry in the CNI chain.

Runs as a long-lived container of the agent DaemonSet (``trellis cni install``)
with the host's CNI directories mounted (deploy/charts/trellis), as istio-cni's
installer does:

- at start it copies the plugin binary into the bin directory and chains our
  entry after the last plugin of the primary configuration;
- then it checks every ``interval`` (0.5 s) and puts the entry back when the
  cluster's CNI rewrote its configuration without it (k3s, Calico, Cilium and
  flannel do on restarts and upgrades), or wrote a new file that sorts first.
  Polling rather than inotify: the standard library has no inotify, a check is
  one directory listing and one read of a file of a few KiB (tens of
  microseconds), and the bound it gives (half a second) is what matters;
- the readiness file exists exactly while the chain is in place, so the
  container reports not-ready while it is missing (the chart's probe reads it);
- on SIGTERM it asks the API server whether this is an uninstall (the
  DaemonSet is gone or being deleted) or an upgrade (it is still there; the
  next pod takes over), see ``lifecycle.py``. Only on an uninstall does it
  unchain the plugin and remove its binary and the agent's fallback verdicts:
  while the entry stays chained and no agent answers, new pods in the mesh's
  namespaces wait (fail closed), which is right during an upgrade and wrong
  after an uninstall.

The kubelet (libcni) uses the lexically first ``.conflist``/``.conf``/``.json``
in the directory, so that is the one we extend. A ``.conf`` holds one plugin and
cannot be chained: we rewrite it as a ``.conflist`` whose first plugin is the
original one and delete the ``.conf`` (istio-cni does the same). The edits are
pure functions over the JSON (``chain``/``unchain``), tested on their own;
writing is atomic (temporary file + rename) so the kubelet never reads half a
file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodeagent.cni.lifecycle import DaemonSetRef, check_uninstall

_log = logging.getLogger("trellis.cni.install")
PLUGIN_TYPE = "trellis-cni"
CONFIG_SUFFIXES = (".conflist", ".conf", ".json")
# Where `make setup` builds the plugin (tests, a node run from a checkout); the
# image carries it at /opt/trellis/trellis-cni.
BUILT_PLUGIN = Path(__file__).resolve().parents[2] / "build" / "cni" / PLUGIN_TYPE


def chain(config: dict[str, Any], entry: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` (a conflist, or a single-plugin conf) with ``entry`` as its last plugin.
    Idempotent: an earlier trellis-cni entry is replaced, not duplicated."""
    if "plugins" not in config:
        single = {k: v for k, v in config.items() if k not in ("cniVersion", "name")}
        config = {"cniVersion": config.get("cniVersion", "1.0.0"),
                  "name": config.get("name", "k8s-pod-network"), "plugins": [single]}
    if not isinstance(config["plugins"], list):
        raise ValueError("plugins: not a list")
    plugins = [p for p in config["plugins"] if p.get("type") != PLUGIN_TYPE]
    if not plugins:
        raise ValueError("plugins: no interface plugin to chain after")
    return {**config, "plugins": [*plugins, dict(entry, type=PLUGIN_TYPE)]}


def unchain(config: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(config.get("plugins"), list):
        return config
    return {**config, "plugins": [p for p in config["plugins"] if p.get("type") != PLUGIN_TYPE]}


def is_chained(config: Mapping[str, Any], entry: Mapping[str, Any]) -> bool:
    """Our entry, exactly as we would write it, is among the plugins."""
    plugins = config.get("plugins")
    return isinstance(plugins, list) and dict(entry, type=PLUGIN_TYPE) in plugins


def config_files(conf_dir: Path) -> list[Path]:
    """In the order libcni reads them; the first is the one the kubelet uses."""
    return sorted(p for p in conf_dir.iterdir()
                  if p.suffix in CONFIG_SUFFIXES and p.is_file() and not p.name.startswith("."))


def primary_config(conf_dir: Path) -> Path | None:
    files = config_files(conf_dir)
    return files[0] if files else None


def _write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_config(path: Path) -> dict[str, Any]:
    value = json.loads(path.read_text())
    if not isinstance(value, dict):
        raise ValueError(f"{path}: not a JSON object")
    return value


def copy_binary(binary: Path, bin_dir: Path) -> bool:
    """Put ``binary`` into ``bin_dir`` unless an identical copy is there; True if copied."""
    target = bin_dir / PLUGIN_TYPE
    data = binary.read_bytes()
    with contextlib.suppress(OSError):
        if target.read_bytes() == data:
            return False
    _write_atomic(target, data, 0o755)
    return True


def install(binary: Path, bin_dir: Path, conf_dir: Path, entry: Mapping[str, Any]) -> Path:
    """Copy the plugin and chain it into the primary configuration; return that file."""
    copy_binary(binary, bin_dir)
    path = primary_config(conf_dir)
    if path is None:
        raise FileNotFoundError(f"{conf_dir}: no CNI configuration yet (is the cluster's CNI "
                                "installed?)")
    chained = chain(_read_config(path), entry)
    target = path.with_suffix(".conflist")
    _write_atomic(target, json.dumps(chained, indent=2).encode())
    if target != path:
        path.unlink()
    return target


def remove(bin_dir: Path, conf_dir: Path, extra_files: tuple[Path, ...] = ()) -> list[Path]:
    """Unchain us from every configuration that names us, delete the binary and
    ``extra_files``; return what was changed or deleted."""
    changed: list[Path] = []
    for path in config_files(conf_dir):
        try:
            config = _read_config(path)
        except (OSError, ValueError):
            continue  # not ours to repair
        if unchain(config) != config:
            _write_atomic(path, json.dumps(unchain(config), indent=2).encode())
            changed.append(path)
    for path in (bin_dir / PLUGIN_TYPE, *extra_files):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            changed.append(path)
    return changed


@dataclass(frozen=True, slots=True)
class InstallSettings:
    """Everything ``trellis cni install`` was told, validated once."""

    binary: Path
    bin_dir: Path
    conf_dir: Path
    entry: Mapping[str, Any]  # our plugin's fields in the chain (agentSocket, ...)
    ready_file: Path | None = None
    fallback_file: Path | None = None  # the agent's verdicts, removed on uninstall
    interval_s: float = 0.5
    owner: DaemonSetRef | None = None  # None: never an uninstall (not on Kubernetes)
    kubeconfig: Path | None = None

    def __post_init__(self) -> None:
        if not 0.05 <= self.interval_s <= 60:
            raise ValueError(f"interval_s: {self.interval_s!r} is not between 0.05 and 60")
        for name in ("bin_dir", "conf_dir"):
            if not getattr(self, name).is_dir():
                raise ValueError(f"{name}: {str(getattr(self, name))!r} is not a directory")
        if not self.binary.is_file():
            raise ValueError(f"binary: {str(self.binary)!r} is not a file")


class ChainKeeper:
    """One check at a time: put back what is missing, report whether all is in place."""

    def __init__(self, settings: InstallSettings) -> None:
        self.settings = settings
        self.ready = False
        self.problem = "not checked yet"

    def check(self) -> bool:
        s = self.settings
        try:
            if copy_binary(s.binary, s.bin_dir):
                _log.info("plugin binary installed", extra={"fields": {
                    "path": str(s.bin_dir / PLUGIN_TYPE)}})
            problem = self._check_chain()
        except OSError as exc:
            problem = f"{exc.filename or s.conf_dir}: {exc.strerror or exc}"
        self._set_ready(problem)
        return self.ready

    def _check_chain(self) -> str | None:
        s = self.settings
        path = primary_config(s.conf_dir)
        if path is None:
            return f"{s.conf_dir}: no CNI configuration yet (is the cluster's CNI installed?)"
        try:
            config = _read_config(path)
            if path.suffix == ".conflist" and is_chained(config, s.entry):
                return None
            target = install(s.binary, s.bin_dir, s.conf_dir, s.entry)
        except ValueError as exc:  # half-written by the cluster's CNI, or no plugin yet
            return f"{path}: {exc}"
        if self.ready:
            _log.warning("trellis-cni was missing from the CNI chain; chained again", extra={
                "fields": {"config": str(target), "was": path.name}})
        else:
            _log.info("trellis-cni chained", extra={"fields": {
                "config": str(target), "was": path.name}})
        return None

    def _set_ready(self, problem: str | None) -> None:
        ready_file = self.settings.ready_file
        if problem is None and not self.ready:
            _log.info("trellis-cni is chained", extra={"fields": {
                "conf_dir": str(self.settings.conf_dir)}})
            if ready_file is not None:
                _write_atomic(ready_file, b"chained\n")
        elif problem is not None and (self.ready or problem != self.problem):
            _log.warning("trellis-cni is not chained", extra={"fields": {"why": problem}})
            if ready_file is not None:
                ready_file.unlink(missing_ok=True)
        self.ready, self.problem = problem is None, problem or ""


async def keep_installed(settings: InstallSettings, stop: asyncio.Event) -> None:
    """Check until ``stop``; then, on a real uninstall only, remove what we installed."""
    keeper = ChainKeeper(settings)
    while not stop.is_set():
        keeper.check()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), settings.interval_s)
    if settings.ready_file is not None:
        settings.ready_file.unlink(missing_ok=True)
    if settings.owner is None or not await check_uninstall(settings.owner, settings.kubeconfig):
        _log.info("stopping; trellis-cni stays chained for the next agent")
        return
    extra = (settings.fallback_file,) if settings.fallback_file is not None else ()
    removed = remove(settings.bin_dir, settings.conf_dir, extra)
    _log.info("uninstalled trellis-cni from this node", extra={"fields": {
        "changed": [str(p) for p in removed]}})


async def run(settings: InstallSettings) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await keep_installed(settings, stop)
    return 0
