"""`trellis lab …`: the local lab of network namespaces that runs the whole mesh.

    trellis lab up [-f FILE] [--no-mesh] [--cert-ttl 90s]
                                           build the lab (default: 2 nodes, 5 pods)
    trellis lab status [--json]            what is up, with addresses
    trellis lab exec POD -- CMD…           run CMD inside a pod's network namespace
    trellis lab apply -f FILE              add or update objects live
    trellis lab delete -f FILE             remove objects live
    trellis lab demo                       up, then traffic through the mesh
    trellis lab down                       remove everything the lab made

A mistake the user can fix is one line ``trellis: error: …`` and exit 2; a lab
that did not come up adds the lines that explain it (a log tail) and exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable

from lab import changes, demo, lifecycle, redirect_mode, supervisor
from lab.errors import LabError, LabNotUp
from lab.processes import CA_NAME, agent_name, app_name, proxy_name
from lab.render import status_json, status_table
from lab.state import LabDir, LabRecord, load_record

Handler = Callable[[argparse.Namespace, LabDir], int]


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    lab = subparsers.add_parser(
        "lab", help="the local lab: nodes and pods as network namespaces",
        description="The local lab: nodes and pods as network namespaces on this machine, "
                    "running the whole mesh.")
    commands = lab.add_subparsers(dest="lab_command", metavar="COMMAND", required=True)

    up = commands.add_parser("up", help="build the lab (or finish building it)")
    up.add_argument("-f", "--file", help="a lab description (Kubernetes-style YAML) "
                                          "instead of the default lab")
    up.add_argument("--no-mesh", action="store_true",
                    help="network and apps only: no CA, no node agents")
    up.add_argument("--redirect", choices=("iptables", "ebpf"), default=None,
                    help="how agents capture pod traffic (default: the running lab's "
                         "mode, else iptables)")
    up.add_argument("--cert-ttl", metavar="DURATION", default=None,
                    help="lifetime of the workload certificates the lab's CA issues, e.g. "
                         "90s or 10m (default: the running lab's, else 24h); proxies "
                         "renew at half-life, so a short one shows rotation under load")
    up.set_defaults(func=_handler(_up, root=True))

    down = commands.add_parser("down", help="remove everything the lab made")
    down.set_defaults(func=_handler(_down, root=True))

    status = commands.add_parser("status", help="nodes, pods and services of the lab")
    status.add_argument("--json", action="store_true", help="machine-readable")
    status.set_defaults(func=_handler(_status))

    run = commands.add_parser("exec", help="run a command in a pod's network namespace",
                              usage="trellis lab exec POD -- CMD [ARG …]")
    run.add_argument("pod", help="pod name, or namespace/name")
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="the command and its arguments")
    run.set_defaults(func=_handler(_exec, root=True))

    apply = commands.add_parser("apply", help="add or update Pods, Services, Namespaces, "
                                              "policies in the running lab")
    apply.add_argument("-f", "--file", required=True, help="multi-document YAML")
    apply.set_defaults(func=_handler(_apply, root=True))

    delete = commands.add_parser("delete", help="remove them from the running lab")
    delete.add_argument("-f", "--file", required=True, help="multi-document YAML")
    delete.set_defaults(func=_handler(_delete, root=True))

    show = commands.add_parser("demo", help="bring the lab up and show traffic through the mesh")
    show.set_defaults(func=_handler(_demo, root=True))


def _handler(fn: Handler, root: bool = False) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            if root and os.geteuid() != 0:
                raise LabError(f"`trellis lab {args.lab_command}` needs root "
                               "(it manages network namespaces)")
            return fn(args, LabDir.from_env())
        except LabError as exc:
            print(f"trellis: error: {exc}", file=sys.stderr)
            for line in exc.details:
                print(f"    {line}", file=sys.stderr)
            return exc.exit_code
    return run


def _print(line: str) -> None:
    print(line, flush=True)


def _up(args: argparse.Namespace, labdir: LabDir) -> int:
    description = lifecycle.read_description(args.file)
    lifecycle.up(labdir, description, None if args.no_mesh else lifecycle.MESH, _print,
                 redirect=args.redirect, cert_ttl=args.cert_ttl)
    return 0


def _down(args: argparse.Namespace, labdir: LabDir) -> int:
    lifecycle.down(labdir, _print)
    return 0


def _apply(args: argparse.Namespace, labdir: LabDir) -> int:
    changes.apply(labdir, args.file, _print)
    return 0


def _delete(args: argparse.Namespace, labdir: LabDir) -> int:
    changes.delete(labdir, args.file, _print)
    return 0


def _demo(args: argparse.Namespace, labdir: LabDir) -> int:
    return demo.demo(labdir, _print)


def _status(args: argparse.Namespace, labdir: LabDir) -> int:
    record = load_record(labdir)
    if record is None:
        raise LabNotUp(f"no lab is up (no {labdir.record}); start one with `trellis lab up`")
    if args.json:
        print(json.dumps(status_json(record.plan), indent=2))
        return 0
    if record.mesh:
        pid = supervisor.running_pid(labdir, CA_NAME)
        mesh = f"on, CA {f'running, pid {pid}' if pid else 'NOT RUNNING'}"
    else:
        mesh = "off (--no-mesh)"
    print(f"lab from {record.source}; mesh {mesh}; state in {labdir.root}\n")
    print(status_table(record.plan, _process_states(labdir, record), record.mesh))
    return 0


def _process_states(labdir: LabDir, record: LabRecord) -> dict[str, str]:
    def state(name: str) -> str:
        pid = supervisor.running_pid(labdir, name)
        return f"running, pid {pid}" if pid else "NOT RUNNING"
    plan = record.plan
    states = {n.name: f"agent {state(agent_name(n))}; proxy {state(proxy_name(n))}"
              for n in plan.nodes}
    states.update({p.key: state(app_name(plan, p)) for p in plan.pods})
    return states


def _exec(args: argparse.Namespace, labdir: LabDir) -> int:
    record = load_record(labdir)
    if record is None:
        raise LabNotUp(f"no lab is up (no {labdir.record}); start one with `trellis lab up`")
    matches = record.plan.find_pods(args.pod)
    if not matches:
        known = ", ".join(p.name for p in record.plan.pods)
        raise LabError(f"unknown pod {args.pod!r}; the lab's pods: {known}")
    if len(matches) > 1:
        raise LabError(f"pod {args.pod!r} is in several namespaces ("
                       f"{', '.join(p.key for p in matches)}); name it as namespace/name")
    if not args.cmd:
        raise LabError(f"lab exec: give the command after --, e.g. "
                       f"`trellis lab exec {args.pod} -- ip addr`")
    # In eBPF mode the command joins the pod's cgroup, where the pod's programs are.
    cgroup = redirect_mode.cgroups_for(labdir, record.plan).get(matches[0].key, "")
    child = subprocess.Popen(redirect_mode.in_cgroup(
        cgroup, ["ip", "netns", "exec", matches[0].netns, *args.cmd]))
    # Ctrl-C belongs to the command (say, an interactive shell), not to us: ignored
    # here only after the child started, so the child keeps the default handling.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        status = child.wait()
    finally:
        signal.signal(signal.SIGINT, previous)
    # A command killed by a signal: the shell's convention, 128 + signal number.
    return status if status >= 0 else 128 - status
