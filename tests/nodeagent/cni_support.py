"""Helpers for the CNI tests: a stand-in API server for "is our DaemonSet still there?"."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aiohttp import web

from nodeagent.cni.lifecycle import DaemonSetRef

OWNER = DaemonSetRef("trellis-system", "trellis-agent")


class ApiServer:
    """Answers GET of one DaemonSet as kube-apiserver does, in the state the test sets."""

    def __init__(self) -> None:
        self.state = "present"
        self.gets = 0
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def _get(self, request: web.Request) -> web.Response:
        self.gets += 1
        if request.headers.get("Authorization") != "Bearer t0ken":
            return web.json_response({"kind": "Status", "code": 401}, status=401)
        name = request.match_info["name"]
        if self.state == "gone" or name != OWNER.name:
            return web.json_response({"kind": "Status", "status": "Failure", "code": 404,
                                      "reason": "NotFound", "message": "not found",
                                      "details": {"name": name, "group": "apps",
                                                  "kind": "daemonsets"}}, status=404)
        meta: dict[str, Any] = {"name": name, "namespace": OWNER.namespace}
        if self.state == "deleting":
            meta["deletionTimestamp"] = "2026-12-08T00:00:00Z"
        return web.json_response({"kind": "DaemonSet", "apiVersion": "apps/v1",
                                  "metadata": meta})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/apis/apps/v1/namespaces/{ns}/daemonsets/{name}", self._get)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]

    async def stop(self) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


def kubeconfig(path: Path, url: str) -> Path:
    path.write_text(f"""\
apiVersion: v1
kind: Config
clusters: [{{name: c, cluster: {{server: "{url}"}}}}]
users: [{{name: u, user: {{token: t0ken}}}}]
contexts: [{{name: c, context: {{cluster: c, user: u}}}}]
current-context: c
""")
    return path
