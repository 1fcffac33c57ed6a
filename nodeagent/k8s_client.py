"""Talking to the Kubernetes API server through ``kubernetes_asyncio``.

The generated typed models are not used: every object goes on to
``nodeagent.objects`` as the same dict a YAML file would give, so one parser serves
both sources. The client library still does what matters: kubeconfig and
in-cluster config (service-account token, CA bundle, token refresh), TLS, auth
headers, and the aiohttp connection pool.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
from kubernetes_asyncio import client, config

from nodeagent.k8s_watch import WatchFailed, WatchGone, status_error

WATCH_IDLE_LIMIT_S = 90


async def load_configuration(kubeconfig: Path | None = None) -> client.Configuration:
    """``kubeconfig`` if given; in a pod, the in-cluster service account; else the
    default kubeconfig (``$KUBECONFIG`` or ``~/.kube/config``). Raises ``ValueError``
    naming what was tried."""
    configuration = client.Configuration()
    try:
        if kubeconfig is not None:
            await config.load_kube_config(config_file=str(kubeconfig),
                                          client_configuration=configuration)
        elif os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(  # type: ignore[no-untyped-call]
                client_configuration=configuration)
        else:
            await config.load_kube_config(client_configuration=configuration)
    except (config.ConfigException, OSError) as exc:
        where = str(kubeconfig) if kubeconfig else "in-cluster config or default kubeconfig"
        raise ValueError(f"--kubeconfig: cannot load {where}: {exc}") from exc
    return configuration


def api_client(configuration: client.Configuration) -> client.ApiClient:
    return client.ApiClient(configuration)


async def _request(api: client.ApiClient, method: str, path: str, *,
                   query: list[tuple[str, str]] | None = None, body: object = None,
                   timeout: aiohttp.ClientTimeout | None = None) -> aiohttp.ClientResponse:
    headers = {"Accept": "application/json"}
    if body is not None:
        headers["Content-Type"] = "application/json"
    response: aiohttp.ClientResponse = await api.call_api(
        path, method, query_params=query or [], header_params=headers, body=body,
        auth_settings=["BearerToken"], _preload_content=False,
        _request_timeout=timeout or aiohttp.ClientTimeout(total=60))
    return response


async def _json_body(response: aiohttp.ClientResponse, what: str) -> dict[str, Any]:
    try:
        data = json.loads(await response.read())
    except ValueError as exc:
        # Still carries the status: an older API server answers a path no CRD
        # defines with a plain-text "404 page not found".
        raise WatchFailed(f"{what}: HTTP {response.status}, body is not JSON",
                          response.status) from exc
    finally:
        response.release()
    if not isinstance(data, dict):
        raise WatchFailed(f"{what}: HTTP {response.status}, expected a JSON object")
    if response.status == 410:
        raise WatchGone(str(data.get("message", "resource version too old")))
    if not 200 <= response.status < 300:
        raise status_error({"code": response.status, **data})
    return data


async def get_json(api: client.ApiClient, path: str,
                   query: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    return await _json_body(await _request(api, "GET", path, query=query), f"GET {path}")


async def post_json(api: client.ApiClient, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
    return await _json_body(await _request(api, "POST", path, body=dict(body)), f"POST {path}")


async def put_json(api: client.ApiClient, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
    """Replace an object; with ``metadata.resourceVersion`` set, a 409 if it changed since."""
    return await _json_body(await _request(api, "PUT", path, body=dict(body)), f"PUT {path}")


async def open_watch(api: client.ApiClient, path: str, version: str, timeout_s: int,
                     selection: list[tuple[str, str]] | None = None) -> aiohttp.ClientResponse:
    """Start a watch after ``version``; the caller reads and releases the stream.
    ``selection``: the same selector parameters as the list that gave ``version``."""
    query = [*(selection or []), ("watch", "1"), ("resourceVersion", version),
             ("allowWatchBookmarks", "true"), ("timeoutSeconds", str(timeout_s))]
    # No total timeout (a watch is long). The API server sends a bookmark about
    # once a minute, so a read timeout past that ends a connection that died
    # silently (a vanished API server, a dropped NAT entry).
    timeout = aiohttp.ClientTimeout(sock_connect=10, sock_read=WATCH_IDLE_LIMIT_S)
    response = await _request(api, "GET", path, query=query, timeout=timeout)
    if response.status != 200:
        await _json_body(response, f"watch {path}")  # raises the server's error
        raise WatchFailed(f"watch {path}: HTTP {response.status}")
    return response
