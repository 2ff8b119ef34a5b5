"""A small typed client of the controller's operator API (what ``margoctl`` speaks).

httpx errors and HTTP error answers are mapped to our exceptions at this boundary; every
message names the URL and, for an HTTP error, the problem details' title and detail. Network
failures raise ``ApiConnectionError``; 401/403 ``Unauthorized``; 404 ``ApiNotFound`` (also a
``NotFound``); 400/422 ``ApiInvalid`` (also a ``ConfigError``); 503 ``ApiUnavailable``; other
statuses ``ApiError``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import quote

import httpx

from margo_stream.errors import ConfigError, MargoError, NotFound, StoreError

JsonDict = dict[str, Any]


class ApiError(MargoError):
    """The API answered with an error or could not be reached."""

    def __init__(
        self, message: str, *, url: str, status: int | None = None, problem: JsonDict | None = None
    ) -> None:
        super().__init__(message)
        self.url = url
        self.status = status
        self.problem = problem or {}


class ApiConnectionError(ApiError):
    """No HTTP answer: refused, unreachable, TLS failure, timeout."""


class Unauthorized(ApiError):
    """The token was missing, wrong, or not allowed to do this (401/403)."""


class ApiNotFound(ApiError, NotFound):
    """404: no such resource in this tenant."""


class ApiInvalid(ApiError, ConfigError):
    """400/422: the request or a document in it was invalid."""


class ApiUnavailable(ApiError, StoreError):
    """503: the controller's store failed."""


def _error_class(status: int) -> type[ApiError]:
    if status in (401, 403):
        return Unauthorized
    if status == 404:
        return ApiNotFound
    if status in (400, 409, 422):
        return ApiInvalid
    if status == 503:
        return ApiUnavailable
    return ApiError


def normalize_base_url(api: str) -> str:
    """``host:port`` or a URL -> a URL without a trailing slash."""
    api = api.strip()
    if not api:
        raise ConfigError("empty API address")
    if "://" not in api:
        api = "http://" + api
    return api.rstrip("/")


def _device_path(device_id: str) -> str:
    # Margo device ids may contain '/', which the API routes as part of the id.
    return quote(device_id, safe="/")


class ApiClient:
    """Synchronous client. ``transport`` is for tests; ``verify`` is passed to httpx (a CA
    bundle path for an API served over TLS with a private CA)."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout: float = 10.0,
        verify: bool | str = True,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = normalize_base_url(base_url)
        self.token = token  # the WebSocket routes (margoctl terminal/exec) authenticate with it
        self.verify = verify
        self._timeout = timeout
        self._http = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
            timeout=timeout,
            verify=verify,
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- plumbing ------------------------------------------------------------------------

    def _url(self, path: str) -> str:
        return self.base_url + path

    def _raise_for(self, method: str, resp: httpx.Response) -> None:
        if resp.status_code < 400:
            return
        url = str(resp.request.url)
        problem: JsonDict = {}
        try:
            body = resp.json()
            if isinstance(body, dict):
                problem = body
        except ValueError:
            pass
        title = problem.get("title") or resp.reason_phrase
        detail = problem.get("detail") or resp.text.strip()[:200] or "no detail"
        raise _error_class(resp.status_code)(
            f"{method} {url}: {resp.status_code} {title}: {detail}",
            url=url,
            status=resp.status_code,
            problem=problem,
        )

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        body: Any = None,
    ) -> httpx.Response:
        clean = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            resp = self._http.request(method, path, params=clean, json=body)
        except httpx.TimeoutException as exc:
            raise ApiConnectionError(
                f"{method} {self._url(path)}: no answer within {self._timeout:g}s ({exc})",
                url=self._url(path),
            ) from None
        except httpx.HTTPError as exc:
            raise ApiConnectionError(
                f"cannot reach {self._url(path)}: {exc or type(exc).__name__}", url=self._url(path)
            ) from None
        self._raise_for(method, resp)
        return resp

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        resp = self._request(method, path, **kwargs)
        try:
            return resp.json()
        except ValueError:
            raise ApiError(
                f"{method} {resp.request.url}: the answer is not JSON",
                url=str(resp.request.url),
                status=resp.status_code,
            ) from None

    def _object(self, method: str, path: str, **kwargs: Any) -> JsonDict:
        """The answer's JSON, which must be an object."""
        body = self._json(method, path, **kwargs)
        if not isinstance(body, dict):
            raise ApiError(
                f"{method} {self._url(path)}: the answer is not a JSON object",
                url=self._url(path),
            )
        return body

    def _items(self, path: str, params: Mapping[str, Any] | None = None) -> list[JsonDict]:
        body = self._json("GET", path, params=params)
        items = body.get("items") if isinstance(body, dict) else None
        if not isinstance(items, list):
            raise ApiError(
                f"GET {self._url(path)}: answer has no 'items' list", url=self._url(path)
            )
        return items

    # -- the API -------------------------------------------------------------------------

    def health(self) -> JsonDict:
        return self._object("GET", "/healthz")

    def openapi(self) -> JsonDict:
        return self._object("GET", "/api/v1/openapi.json")

    def list_devices(self) -> list[JsonDict]:
        return self._items("/api/v1/devices")

    def get_device(self, device_id: str) -> JsonDict:
        return self._object("GET", f"/api/v1/devices/{_device_path(device_id)}")

    def label_device(self, device_id: str, changes: Mapping[str, str | None]) -> JsonDict:
        """Merge ``changes`` into the device's operator labels (None removes a key); returns
        the device as the API shows it afterwards."""
        return self._object(
            "PATCH",
            f"/api/v1/devices/{_device_path(device_id)}/labels",
            body={"labels": dict(changes)},
        )

    def revoke_device(self, device_id: str) -> JsonDict:
        """Revoke the device's identity (admin); returns ``{"id", "state", "not_after"}``."""
        return self._object("POST", f"/api/v1/devices/{_device_path(device_id)}/revoke")

    def allow_device(self, device_id: str) -> JsonDict:
        """Allow the device's identity (admin); a revoked one is refused (409)."""
        return self._object("POST", f"/api/v1/devices/{_device_path(device_id)}/allow")

    def reload(self) -> JsonDict:
        """Make the controller re-read its bundles, operators and allow files (admin)."""
        return self._object("POST", "/api/v1/admin/reload")

    def apply(
        self,
        documents: Sequence[str],
        *,
        devices: Sequence[str] = (),
        selector: Mapping[str, str] | None = None,
        blobs: Sequence[str] = (),
        signatures: Mapping[str, JsonDict] | None = None,
        certificate: JsonDict | None = None,
    ) -> JsonDict:
        """Store deployment documents (YAML texts) and assign them; ``blobs`` are base64
        contents of extra files the documents reference; ``signatures`` (document digest ->
        the operator's signature envelope) and ``certificate`` (the operator's certificate)
        say who authored them."""
        body: JsonDict = {"documents": list(documents)}
        if signatures is not None:
            body["signatures"] = dict(signatures)
        if certificate is not None:
            body["certificate"] = certificate
        if devices:
            body["devices"] = list(devices)
        if selector:
            body["selector"] = dict(selector)
        if blobs:
            body["blobs"] = list(blobs)
        return self._object("POST", "/api/v1/deployments", body=body)

    def list_deployments(self, device: str | None = None) -> list[JsonDict]:
        return self._items("/api/v1/deployments", {"device": device})

    def delete_deployment(self, device_id: str, deployment_id: str) -> None:
        self._request(
            "DELETE",
            f"/api/v1/devices/{_device_path(device_id)}/deployments/{quote(deployment_id, safe='')}",
        )

    def list_events(self, after: int = 0, limit: int | None = None) -> list[JsonDict]:
        return self._items("/api/v1/events", {"after": after, "limit": limit})

    def telemetry(
        self,
        device_id: str,
        *,
        stream: str | None = None,
        since: str | None = None,
        after: int | None = None,
        limit: int | None = None,
    ) -> list[JsonDict]:
        return self._items(
            f"/api/v1/devices/{_device_path(device_id)}/telemetry",
            {"stream": stream, "since": since, "after": after, "limit": limit},
        )

    def list_sessions(self, limit: int | None = None) -> list[JsonDict]:
        return self._items("/api/v1/sessions", {"limit": limit})

    def list_operators(self) -> list[JsonDict]:
        """The tenant's operators: name, roles, certificate expiry (never tokens)."""
        return self._items("/api/v1/operators")

    def stream_events(
        self, after: int = 0, limit: int | None = None, *, idle_timeout: float = 60.0
    ) -> Iterator[JsonDict]:
        """The event feed as it happens (Server-Sent Events). Ends after ``limit`` events when
        given; raises ``ApiConnectionError`` when the server goes quiet for ``idle_timeout``
        seconds (it sends a keepalive every 15 s)."""
        path = "/api/v1/events/stream"
        params = {k: v for k, v in {"after": after, "limit": limit}.items() if v is not None}
        timeout = httpx.Timeout(self._timeout, read=idle_timeout)
        try:
            with self._http.stream(
                "GET",
                path,
                params=params,
                timeout=timeout,
                headers={"Accept": "text/event-stream"},
            ) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    self._raise_for("GET", resp)
                data: list[str] = []
                for line in resp.iter_lines():
                    if line == "":
                        if data:
                            yield json.loads("\n".join(data))
                            data = []
                    elif line.startswith("data:"):
                        data.append(line[5:].removeprefix(" "))
        except httpx.TimeoutException:
            raise ApiConnectionError(
                f"GET {self._url(path)}: no event or keepalive for {idle_timeout:g}s",
                url=self._url(path),
            ) from None
        except httpx.HTTPError as exc:
            raise ApiConnectionError(
                f"cannot reach {self._url(path)}: {exc or type(exc).__name__}", url=self._url(path)
            ) from None
