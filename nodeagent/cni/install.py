"""Install ``trellis-cni`` on a node: copy the executable, chain it into the CNI config.

Run by the agent DaemonSet's init container with the host's CNI directories
mounted (deploy/charts/trellis). The config change is a pure function over the
JSON (``chain``/``unchain``), tested on its own; writing is atomic (temporary
file + rename) so the kubelet never reads half a file.

The kubelet uses the lexically first ``.conflist``/``.conf`` in the directory,
so that is the one we extend. A bare ``.conf`` is a single plugin: we rewrite it
as a ``.conflist`` whose second plugin is ours.

Removal (``--remove``) must run when Trellis is uninstalled: while the entry is
chained and no agent answers, every new pod on the node fails to start, which
is the intended fail-closed behaviour during an agent restart but not after an
uninstall.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import zipapp
from pathlib import Path
from typing import Any

PLUGIN_TYPE = "trellis-cni"


def chain(config: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    """``config`` (a conflist, or a single-plugin conf) with ``entry`` as its last plugin.
    Idempotent: an earlier trellis-cni entry is replaced, not duplicated."""
    if "plugins" not in config:
        single = {k: v for k, v in config.items() if k not in ("cniVersion", "name")}
        config = {"cniVersion": config.get("cniVersion", "1.0.0"),
                  "name": config.get("name", "k8s-pod-network"), "plugins": [single]}
    plugins = [p for p in config["plugins"] if p.get("type") != PLUGIN_TYPE]
    if not plugins:
        raise ValueError("plugins: no interface plugin to chain after")
    return {**config, "plugins": [*plugins, dict(entry, type=PLUGIN_TYPE)]}


def unchain(config: dict[str, Any]) -> dict[str, Any]:
    if "plugins" not in config:
        return config
    return {**config, "plugins": [p for p in config["plugins"] if p.get("type") != PLUGIN_TYPE]}


def primary_config(conf_dir: Path) -> Path | None:
    """The file the kubelet will use: the lexically first .conflist/.conf/.json."""
    files = sorted(p for p in conf_dir.iterdir()
                   if p.suffix in (".conflist", ".conf", ".json") and p.is_file())
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


def install(binary: Path, bin_dir: Path, conf_dir: Path, entry: dict[str, Any]) -> Path:
    _write_atomic(bin_dir / PLUGIN_TYPE, binary.read_bytes(), 0o755)
    path = primary_config(conf_dir)
    if path is None:
        raise FileNotFoundError(f"{conf_dir}: no CNI configuration yet (is the cluster's CNI "
                                "installed?)")
    chained = chain(json.loads(path.read_text()), entry)
    target = path.with_suffix(".conflist")
    _write_atomic(target, json.dumps(chained, indent=2).encode())
    if target != path:
        path.unlink()
    return target


def remove(bin_dir: Path, conf_dir: Path) -> None:
    path = primary_config(conf_dir)
    if path is not None:
        _write_atomic(path, json.dumps(unchain(json.loads(path.read_text())), indent=2).encode())
    (bin_dir / PLUGIN_TYPE).unlink(missing_ok=True)


def build_zipapp(output: Path) -> None:
    """The plugin as one file for the host's ``python3`` (3.10+): nodeagent/cni only,
    which uses nothing but the standard library (tests/nodeagent/test_cni_install.py
    runs the result with an isolated system interpreter to prove it)."""
    package = Path(__file__).resolve().parent
    with tempfile.TemporaryDirectory() as staging:
        root = Path(staging)
        (root / "nodeagent" / "cni").mkdir(parents=True)
        (root / "nodeagent" / "__init__.py").write_text("")
        for source in package.glob("*.py"):
            shutil.copy(source, root / "nodeagent" / "cni" / source.name)
        zipapp.create_archive(root, output, interpreter="/usr/bin/env python3",
                              main="nodeagent.cni.main:main")
    output.chmod(0o755)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nodeagent.cni.install")
    parser.add_argument("--binary", type=Path, default=Path("/opt/trellis/trellis-cni"))
    parser.add_argument("--bin-dir", type=Path)
    parser.add_argument("--conf-dir", type=Path)
    parser.add_argument("--agent-socket", default="/var/run/trellis/cni.sock")
    parser.add_argument("--timeout-seconds", type=float, default=30.0)
    parser.add_argument("--remove", action="store_true", help="undo an install")
    parser.add_argument("--build-zipapp", type=Path, metavar="OUTPUT",
                        help="only write the plugin as an executable zipapp (image build)")
    args = parser.parse_args(argv)
    if args.build_zipapp is None and (args.bin_dir is None or args.conf_dir is None):
        parser.error("--bin-dir and --conf-dir are required")
    try:
        if args.build_zipapp is not None:
            build_zipapp(args.build_zipapp)
        elif args.remove:
            remove(args.bin_dir, args.conf_dir)
            print(f"trellis-cni removed from {args.conf_dir}")
        else:
            entry = {"agentSocket": args.agent_socket, "timeoutSeconds": args.timeout_seconds}
            target = install(args.binary, args.bin_dir, args.conf_dir, entry)
            print(f"trellis-cni chained into {target}")
    except (OSError, ValueError, shutil.Error) as exc:
        print(f"trellis-cni install: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
