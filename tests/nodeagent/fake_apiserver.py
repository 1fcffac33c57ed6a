"""A stand-in for the Kubernetes API server, speaking its list/watch protocol over
real HTTP (aiohttp), for the node agent's Kubernetes source and the CA's TokenReview.

What it does as the real one does:

- one cluster-wide, increasing resourceVersion (etcd's revision), stamped on every
  object it stores and on every list;
- ``GET <collection>`` → ``{"kind": "<Kind>List", "items": [...],
  "metadata": {"resourceVersion": RV}}`` (items without kind/apiVersion, as real lists);
- ``GET <collection>?watch=1&resourceVersion=RV`` → a chunked stream of JSON lines,
  every event after RV in order, then live ones; ``BOOKMARK`` events when
  ``allowWatchBookmarks=true``; the stream ends at ``timeoutSeconds``;
- a resourceVersion older than the kept history (``compact()``) → an ``ERROR`` event
  carrying a 410 ``Status`` (``gone_as_http=True``: an HTTP 410 instead);
- ``POST /apis/authentication.k8s.io/v1/tokenreviews`` against a table of tokens;
  ``GET /api/v1/namespaces/<ns>/pods/<name>``;
- only the built-in collections and the CRDs it was given (``crds``; by default
  the chart's own, so no ``security.istio.io``) are served: any other path
  answers ``404`` with a ``NotFound`` Status, as kube-apiserver does for a group
  no CRD defines (``not_found_as_text=True``: the plain ``404 page not found`` of
  older servers). ``install_crd`` / ``uninstall_crd`` change that at run time;
  uninstalling deletes the CRD's objects (DELETED events) and ends its watches;
- ConfigMaps: the cluster-wide collection (list/watch), and per namespace
  ``POST`` (``409 AlreadyExists`` for a name taken, ``404`` for a namespace that
  does not exist, ``403`` for one being deleted), ``GET`` and ``PUT`` (``409
  Conflict`` when the body's resourceVersion is not the stored one, as an
  optimistic-concurrency update is refused);
- ``fieldSelector`` (``metadata.name``, ``metadata.namespace``; for pods also
  ``spec.nodeName``) on lists and watches: a watch sees an object that starts to
  match as ADDED and one that stops matching as DELETED; an unsupported field
  answers 400;
- ``limit``/``continue`` pagination: every page is cut from the list as of the
  first page's resourceVersion; ``compact()`` expires continue tokens (410).

Test controls: ``drop_watches()`` cuts every open watch mid-stream, and ``stop()`` /
``start()`` take the server away and bring it back on the same port with its
state (as etcd keeps it across an API server restart).
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import socket
import ssl
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

ISTIO_POLICIES = "/apis/security.istio.io/v1/authorizationpolicies"
TRELLIS_POLICIES = "/apis/security.trellis.dev/v1/authorizationpolicies"
KINDS = {
    "/api/v1/namespaces": "Namespace",
    "/api/v1/pods": "Pod",
    "/api/v1/services": "Service",
    "/api/v1/configmaps": "ConfigMap",
    "/apis/discovery.k8s.io/v1/endpointslices": "EndpointSlice",
    ISTIO_POLICIES: "AuthorizationPolicy",
    TRELLIS_POLICIES: "AuthorizationPolicy",
}
CRD_BACKED = frozenset({ISTIO_POLICIES, TRELLIS_POLICIES})
# What `helm template --include-crds` of the chart defines (checked against the
# chart by test_k8s_fake_apiserver.py): a cluster with Trellis and without Istio.
CHART_CRDS = frozenset({TRELLIS_POLICIES})
TOKENREVIEWS = "/apis/authentication.k8s.io/v1/tokenreviews"
CONFIGMAPS = "/api/v1/configmaps"
# Field selectors the real API server supports for these kinds (the rest: 400).
_FIELDS = {"metadata.name", "metadata.namespace"}
_POD_FIELDS = _FIELDS | {"spec.nodeName"}


@dataclass
class _Event:
    rv: int
    collection: str
    type: str
    obj: dict[str, Any]
    before: dict[str, Any] | None  # the object as it was (MODIFIED), for selectors


Selector = dict[str, str]  # field path → value, all must match


@dataclass
class FakeApiServer:
    token: str = "test-token"  # the bearer token every request must carry
    gone_as_http: bool = False
    bookmark_interval_s: float = 0.2
    port: int = 0
    tokens: dict[str, dict[str, Any]] = field(default_factory=dict)  # token → TokenReview status
    rv: int = 100
    requests: list[str] = field(default_factory=list)
    list_delay_s: dict[str, float] = field(default_factory=dict)  # collection → slow lists
    end_watches_at_once: bool = False  # a misbehaving proxy: every watch ends empty
    crds: frozenset[str] = CHART_CRDS  # the CRD-backed collections this cluster has
    not_found_as_text: bool = False  # 404 as "404 page not found" (older API servers)
    expire_next_continue: bool = False  # answer the next continue token 410 (expired)
    _pages: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # continue tokens
    _page_serial: int = 0
    _objects: dict[str, dict[str, dict[str, Any]]] = field(
        default_factory=lambda: {c: {} for c in KINDS})
    _history: list[_Event] = field(default_factory=list)
    _oldest: int = 100  # watches from before this RV get 410
    _wake: asyncio.Condition = field(default_factory=asyncio.Condition)
    _streams: dict[web.StreamResponse, web.Request] = field(default_factory=dict)
    _runner: web.AppRunner | None = None
    ssl_context: ssl.SSLContext | None = None  # HTTPS, as kube-apiserver (tests/cluster)

    # -- life cycle ---------------------------------------------------------
    async def start(self, sock: socket.socket | None = None) -> None:
        app = web.Application()
        app.router.add_get("/api/v1/namespaces/{ns}/pods/{name}", self._get_pod)
        app.router.add_post(TOKENREVIEWS, self._tokenreview)
        app.router.add_post("/api/v1/namespaces/{ns}/configmaps", self._create_configmap)
        app.router.add_get("/api/v1/namespaces/{ns}/configmaps/{name}", self._get_configmap)
        app.router.add_put("/api/v1/namespaces/{ns}/configmaps/{name}", self._put_configmap)
        for collection in KINDS:
            app.router.add_get(collection, self._collection)
        self.add_routes(app)
        app.router.add_route("*", "/{path:.*}", self._not_found)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
        await self._runner.setup()
        site: web.BaseSite
        if sock is not None:  # a socket the test made, e.g. inside a network namespace
            site = web.SockSite(self._runner, sock, ssl_context=self.ssl_context)
        else:
            site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True,
                               ssl_context=self.ssl_context)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def add_routes(self, app: web.Application) -> None:
        """More endpoints, for a subclass (tests/cluster/apiserver.py: workloads)."""

    async def stop(self) -> None:
        """The API server goes away: listeners closed, open watches cut."""
        self.drop_watches()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def drop_watches(self) -> None:
        for request in list(self._streams.values()):
            transport = request.transport
            if transport is not None:
                transport.abort()  # mid-stream, no final chunk: a broken connection
        self._streams.clear()

    async def watching(self, count: int, timeout: float = 10.0) -> None:
        """Wait until ``count`` watches are open (a test's "the client is watching")."""
        async with asyncio.timeout(timeout):
            while len(self._streams) < count:
                await asyncio.sleep(0.01)

    def served(self, collection: str) -> bool:
        return collection in KINDS and (collection not in CRD_BACKED or collection in self.crds)

    async def install_crd(self, collection: str) -> None:
        """The CRD is created: its collection is served from now on (empty)."""
        assert collection in CRD_BACKED, collection
        self.crds = self.crds | {collection}

    async def uninstall_crd(self, collection: str) -> None:
        """The CRD is deleted: its objects go (DELETED events), then its watches end."""
        for key in list(self._objects[collection]):
            namespace, name = key.split("/", 1)
            await self.delete(collection, namespace, name)
        self.crds = self.crds - {collection}
        for stream, request in list(self._streams.items()):
            if request.path == collection and request.transport is not None:
                request.transport.close()
                self._streams.pop(stream, None)

    async def apply(self, collection: str, obj: dict[str, Any]) -> int:
        """Create or replace ``obj``; returns its new resourceVersion."""
        if not self.served(collection):
            # kubectl: 'no matches for kind "AuthorizationPolicy" in version ...'
            raise ValueError(f"{collection} is not served: install its CRD first")
        key = _key(obj)
        objects = self._objects[collection]
        kind = "MODIFIED" if key in objects else "ADDED"
        stored = copy.deepcopy(obj)
        stored.setdefault("metadata", {})
        return await self._record(collection, kind, key, stored)

    async def delete(self, collection: str, namespace: str, name: str) -> int:
        key = f"{namespace}/{name}"
        stored = self._objects[collection][key]
        return await self._record(collection, "DELETED", key, copy.deepcopy(stored))

    async def _record(self, collection: str, kind: str, key: str, obj: dict[str, Any]) -> int:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        before = self._objects[collection].get(key)
        if kind == "DELETED":
            del self._objects[collection][key]
        else:
            self._objects[collection][key] = obj
        self._history.append(_Event(self.rv, collection, kind, obj, before))
        async with self._wake:
            self._wake.notify_all()
        return self.rv

    def compact(self) -> None:
        """Forget the history (etcd compaction): older watch versions and continue
        tokens now get 410."""
        self._history.clear()
        self._pages.clear()
        self._oldest = self.rv

    # -- handlers -----------------------------------------------------------
    def _authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {self.token}"

    async def _not_found(self, request: web.Request) -> web.Response:
        self.requests.append(f"{request.method} {request.path_qs}")
        if not self._authorized(request):
            return _status(401, "Unauthorized", "Unauthorized")
        if self.not_found_as_text:
            return web.Response(status=404, text="404 page not found\n")
        return _status(404, "NotFound", "the server could not find the requested resource")

    async def _collection(self, request: web.Request) -> web.StreamResponse:
        if not self.served(request.path):
            return await self._not_found(request)
        self.requests.append(f"{request.method} {request.path_qs}")
        if not self._authorized(request):  # authentication comes before routing
            return _status(401, "Unauthorized", "Unauthorized")
        collection = request.path
        try:
            selector = _field_selector(request.query.get("fieldSelector", ""), collection)
        except ValueError as exc:
            return _status(400, "BadRequest", str(exc))
        if request.query.get("watch") in ("1", "true"):
            return await self._watch(request, collection, selector)
        if token := request.query.get("continue"):
            items = self._pages.pop(token, None)
            if self.expire_next_continue:
                self.expire_next_continue, items = False, None
            if items is None:
                return _status(410, "Expired", "The provided continue parameter is too old "
                                              "to display a consistent list result.")
            version = _decode_token(token)
        else:
            version = str(self.rv)  # a list is one consistent read, as of its start
            items = [_without_type(o) for o in self._objects[collection].values()
                     if _matches(o, selector)]
        await asyncio.sleep(self.list_delay_s.get(collection, 0))
        metadata: dict[str, Any] = {"resourceVersion": version}
        limit = int(request.query.get("limit") or 0)
        if 0 < limit < len(items):
            items, rest = items[:limit], items[limit:]
            self._page_serial += 1
            token = _encode_token(version, self._page_serial)
            self._pages[token] = rest
            metadata.update({"continue": token, "remainingItemCount": len(rest)})
        return web.json_response({"kind": f"{KINDS[collection]}List", "apiVersion": "v1",
                                  "metadata": metadata, "items": items})

    async def _watch(self, request: web.Request, collection: str,
                     selector: Selector) -> web.StreamResponse:
        since = int(request.query.get("resourceVersion") or self.rv)
        bookmarks = request.query.get("allowWatchBookmarks") == "true"
        timeout = float(request.query.get("timeoutSeconds", "1800"))
        if since < self._oldest:
            gone = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 410,
                    "reason": "Expired", "message": f"too old resource version: {since} "
                                                    f"({self._oldest})"}
            if self.gone_as_http:
                return web.json_response(gone, status=410)
        stream = web.StreamResponse(headers={"Content-Type": "application/json"})
        stream.enable_chunked_encoding()
        await stream.prepare(request)
        if since < self._oldest:
            await _send(stream, "ERROR", gone)
            return stream
        if self.end_watches_at_once:
            await stream.write_eof()
            return stream
        self._streams[stream] = request
        deadline = asyncio.get_running_loop().time() + timeout
        sent = since
        try:
            while (left := deadline - asyncio.get_running_loop().time()) > 0:
                for event in [e for e in self._history if e.rv > sent]:
                    sent = event.rv
                    if event.collection == collection and (kind := _seen_as(event, selector)):
                        await _send(stream, kind, event.obj)
                async with self._wake:
                    if self.rv > sent:
                        continue  # recorded while we were writing
                    try:
                        await asyncio.wait_for(self._wake.wait(),
                                               min(left, self.bookmark_interval_s))
                    except TimeoutError:
                        if bookmarks and stream in self._streams:
                            await _send(stream, "BOOKMARK", {
                                "kind": KINDS[collection],
                                "metadata": {"resourceVersion": str(self.rv)}})
                            sent = max(sent, self.rv)
                if stream not in self._streams:
                    return stream  # dropped
            await stream.write_eof()
        except (ConnectionResetError, RuntimeError):
            pass  # the client went away
        finally:
            self._streams.pop(stream, None)
        return stream

    async def _get_pod(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _status(401, "Unauthorized", "Unauthorized")
        key = f"{request.match_info['ns']}/{request.match_info['name']}"
        pod = self._objects["/api/v1/pods"].get(key)
        if pod is None:
            return _status(404, "NotFound", f'pods "{request.match_info["name"]}" not found')
        return web.json_response({"kind": "Pod", "apiVersion": "v1", **pod})

    async def _create_configmap(self, request: web.Request) -> web.Response:
        self.requests.append(f"{request.method} {request.path_qs}")
        if not self._authorized(request):
            return _status(401, "Unauthorized", "Unauthorized")
        ns = request.match_info["ns"]
        body = await request.json()
        name = body.get("metadata", {}).get("name", "")
        namespace_obj = self._objects["/api/v1/namespaces"].get(f"/{ns}")
        if namespace_obj is None:
            return _status(404, "NotFound", f'namespaces "{ns}" not found')
        if namespace_obj.get("metadata", {}).get("deletionTimestamp"):
            return _status(403, "Forbidden", f"configmaps {name!r} is forbidden: unable to "
                           f"create new content in namespace {ns} because it is being "
                           "terminated")
        if f"{ns}/{name}" in self._objects[CONFIGMAPS]:
            return _status(409, "AlreadyExists", f'configmaps "{name}" already exists')
        obj = {**body, "metadata": {**body.get("metadata", {}), "namespace": ns}}
        obj["metadata"].pop("resourceVersion", None)
        await self.apply(CONFIGMAPS, obj)
        return web.json_response({"kind": "ConfigMap", "apiVersion": "v1",
                                  **self._objects[CONFIGMAPS][f"{ns}/{name}"]}, status=201)

    async def _get_configmap(self, request: web.Request) -> web.Response:
        self.requests.append(f"{request.method} {request.path_qs}")
        if not self._authorized(request):
            return _status(401, "Unauthorized", "Unauthorized")
        name = request.match_info["name"]
        stored = self._objects[CONFIGMAPS].get(f"{request.match_info['ns']}/{name}")
        if stored is None:
            return _status(404, "NotFound", f'configmaps "{name}" not found')
        return web.json_response({"kind": "ConfigMap", "apiVersion": "v1", **stored})

    async def _put_configmap(self, request: web.Request) -> web.Response:
        self.requests.append(f"{request.method} {request.path_qs}")
        if not self._authorized(request):
            return _status(401, "Unauthorized", "Unauthorized")
        ns, name = request.match_info["ns"], request.match_info["name"]
        body = await request.json()
        stored = self._objects[CONFIGMAPS].get(f"{ns}/{name}")
        if stored is None:
            return _status(404, "NotFound", f'configmaps "{name}" not found')
        wanted = body.get("metadata", {}).get("resourceVersion")
        if wanted and wanted != stored["metadata"]["resourceVersion"]:
            return _status(409, "Conflict", f'Operation cannot be fulfilled on configmaps '
                           f'"{name}": the object has been modified; please apply your '
                           "changes to the latest version and try again")
        obj = {**body, "metadata": {**body.get("metadata", {}), "namespace": ns,
                                    "name": name}}
        await self.apply(CONFIGMAPS, obj)
        return web.json_response({"kind": "ConfigMap", "apiVersion": "v1",
                                  **self._objects[CONFIGMAPS][f"{ns}/{name}"]})

    async def _tokenreview(self, request: web.Request) -> web.Response:
        self.requests.append(f"POST {TOKENREVIEWS}")
        if not self._authorized(request):
            return _status(401, "Unauthorized", "Unauthorized")
        review = await request.json()
        presented = review.get("spec", {}).get("token", "")
        status = self.tokens.get(presented, {"authenticated": False,
                                             "error": "invalid bearer token"})
        return web.json_response({**review, "status": status}, status=201)


def _field(obj: dict[str, Any], path: str) -> str:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value if isinstance(value, str) else ""


def _field_selector(text: str, collection: str) -> Selector:
    """``a=b,c==d`` → {a: b, c: d}; fields the real server does not index → ValueError."""
    selector: Selector = {}
    supported = _POD_FIELDS if KINDS[collection] == "Pod" else _FIELDS
    for term in filter(None, text.split(",")):
        name, sep, value = term.replace("==", "=").partition("=")
        if not sep or "!" in name:
            raise ValueError(f"invalid field selector {term!r} (only = is supported here)")
        if name not in supported:
            raise ValueError(f'field label not supported: {name}')
        selector[name] = value
    return selector


def _matches(obj: dict[str, Any] | None, selector: Selector) -> bool:
    return obj is not None and all(_field(obj, k) == v for k, v in selector.items())


def _seen_as(event: _Event, selector: Selector) -> str | None:
    """The event a watch with ``selector`` gets: an object entering the selection is
    ADDED, one leaving it DELETED, as the API server's watch cache sends them."""
    if event.type == "DELETED":
        return "DELETED" if _matches(event.obj, selector) else None
    now, was = _matches(event.obj, selector), _matches(event.before, selector)
    if now and was:
        return "MODIFIED"
    if now:
        return "ADDED"
    return "DELETED" if was else None


def _encode_token(version: str, serial: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"rv": version, "n": serial}).encode()).decode()


def _decode_token(token: str) -> str:
    return str(json.loads(base64.urlsafe_b64decode(token))["rv"])


def _key(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata", {})
    return f"{meta.get('namespace') or ''}/{meta['name']}"


def _without_type(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in ("kind", "apiVersion")}


def _status(code: int, reason: str, message: str) -> web.Response:
    return web.json_response({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                              "code": code, "reason": reason, "message": message},
                             status=code)


async def _send(stream: web.StreamResponse, kind: str, obj: dict[str, Any]) -> None:
    await stream.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")
