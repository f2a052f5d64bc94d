"""A small Python client of the serving API (standard library only).

Example:
    >>> c = Client("http://127.0.0.1:8000", api_key=os.environ.get("RAYLINE_API_KEY"))  # doctest: +SKIP
    >>> answer = c.predict("flights_arr_delay", [{"dep_delay": 12, "carrier": "UA", ...}])  # doctest: +SKIP
    >>> answer["version"], answer["predictions"][0]["prediction"]  # doctest: +SKIP
    (3, 17.2)
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

__all__ = ["Client", "ServeError"]


class ServeError(RuntimeError):
    """The endpoint answered an error.

    Attributes:
        status: The HTTP status (0 when the endpoint could not be reached).
        detail: The answer's ``detail`` (a message, or the list of problems for 413/422).
    """

    def __init__(self, status: int, detail: Any) -> None:
        self.status = status
        self.detail = detail
        if isinstance(detail, list):
            shown = "; ".join(
                f"row {d.get('row')} {d.get('field') or ''}: {d.get('msg')}".replace(" :", ":")
                for d in detail[:5]
                if isinstance(d, dict)
            )
            more = f" (+{len(detail) - 5} more)" if len(detail) > 5 else ""
            text = shown + more
        else:
            text = str(detail)
        super().__init__(f"HTTP {status}: {text}" if status else text)


class Client:
    """Calls a Rayline serving endpoint.

    Args:
        url: The endpoint's base URL, e.g. ``http://127.0.0.1:8000``.
        api_key: The API key (sent as ``Authorization: Bearer``); never logged or shown.
        timeout: Seconds to wait for an answer.
        retries: Extra attempts on 503 (replica restarting) and on refused connections.
    """

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        timeout: float = 30.0,
        retries: int = 2,
    ) -> None:
        self.url = url.rstrip("/")
        self._key = api_key
        self.timeout = timeout
        self.retries = retries

    def __repr__(self) -> str:  # never the key
        return f"Client({self.url!r}, api_key={'***' if self._key else None})"

    def _request(self, method: str, path: str, body: bytes | None = None) -> Any:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    return json.loads(r.read() or b"null")
            except urllib.error.HTTPError as e:
                raw = e.read()
                try:
                    detail = json.loads(raw).get("detail", raw.decode("utf-8", "replace"))
                except (ValueError, AttributeError):
                    detail = raw.decode("utf-8", "replace")[:500]
                if e.code == 503 and attempt < self.retries:
                    time.sleep(float(e.headers.get("Retry-After") or 1))
                    continue
                raise ServeError(e.code, detail) from None
            except (urllib.error.URLError, ConnectionError) as e:
                if attempt < self.retries:
                    time.sleep(0.5 * (attempt + 1))
                    continue
                reason = getattr(e, "reason", e)
                raise ServeError(0, f"cannot reach {self.url}: {reason}") from None
        raise AssertionError("unreachable")

    def predict(
        self, model: str, rows: Mapping[str, Any] | Sequence[Mapping[str, Any]]
    ) -> dict[str, Any]:
        """Predictions for one row (a mapping) or a list of rows.

        Returns:
            ``{"model", "version", "predictions": [{"prediction", ...}, ...]}``.

        Raises:
            ServeError: 401/403 (key), 404 (model), 413/422 (``detail`` lists the problems per
                row and field), 503/504, or the endpoint unreachable (status 0).
        """
        body = json.dumps(rows if isinstance(rows, Mapping) else list(rows)).encode()
        answer: dict[str, Any] = self._request(
            "POST", f"/v1/models/{quote(model, safe='')}/predict", body
        )
        return answer

    def models(self) -> list[dict[str, Any]]:
        """The served models: the version each serves, registry versions, aliases, metrics."""
        return list(self._request("GET", "/v1/models")["models"])

    def model(self, name: str) -> dict[str, Any]:
        """The served version of a model: signature, metrics, JSON Schema of a row."""
        info: dict[str, Any] = self._request("GET", f"/v1/models/{quote(name, safe='')}")
        return info

    def ready(self) -> bool:
        """True when every served model has a replica answering."""
        try:
            return self._request("GET", "/readyz").get("status") == "ready"
        except ServeError:
            return False

    @classmethod
    def from_env(cls, url: str | None = None) -> Client:
        """A client for ``$RAYLINE_SERVE_URL`` (or ``url``) with the key in ``$RAYLINE_API_KEY``."""
        return cls(
            url or os.environ.get("RAYLINE_SERVE_URL", "http://127.0.0.1:8000"),
            api_key=os.environ.get("RAYLINE_API_KEY"),
        )
