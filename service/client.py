"""A small synchronous Python client for ssf-serve (httpx).

    from service.client import Client
    with Client("http://127.0.0.1:8000", token=os.environ.get("SSF_ADMIN_TOKEN")) as c:
        c.upload("runs/cats/delta.safetensors")
        print(c.predict("cats", ["cat.jpg"], top_k=3))

Every non-2xx answer raises ``SSFError`` with the status, the error code (docs/api.md) and message, and
``retry_after_s`` when the server sent ``Retry-After``.
"""

from __future__ import annotations

import builtins
from pathlib import Path
from typing import Any

import httpx

Source = bytes | str | Path


class SSFError(Exception):
    def __init__(self, status: int, code: str, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.retry_after_s = status, code, message, retry_after_s


def _read(source: Source) -> tuple[str, bytes]:
    if isinstance(source, bytes):
        return "data", source
    path = Path(source)
    return path.name, path.read_bytes()


class Client:
    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        token: str | None = None,
        timeout_s: float = 60.0,
        http: httpx.Client | None = None,
    ) -> None:
        """``http`` replaces the underlying httpx client (e.g. a Starlette TestClient in tests)."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = http or httpx.Client(base_url=base_url, timeout=timeout_s)
        self._auth = headers

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        r = self._http.request(method, url, **kwargs)
        if r.status_code >= 400:
            try:
                err = r.json()["error"]
                code, message = str(err["code"]), str(err["message"])
            except (ValueError, KeyError, TypeError):
                code, message = "http_error", r.text[:200] or r.reason_phrase
            retry = r.headers.get("retry-after")
            raise SSFError(r.status_code, code, message, float(retry) if retry else None)
        return r

    # ------------------------------------------------------------------------------- the API
    def health(self) -> bool:
        return self._http.get("/healthz").status_code == 200

    def ready(self) -> bool:
        return self._http.get("/readyz").status_code == 200

    def backbone(self) -> dict[str, Any]:
        out: dict[str, Any] = self._call("GET", "/backbone").json()
        return out

    def list(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = self._call("GET", "/tasks").json()["tasks"]
        return out

    def get(self, name: str) -> dict[str, Any]:
        out: dict[str, Any] = self._call("GET", f"/tasks/{name}").json()
        return out

    def upload(self, delta: Source, name: str | None = None, replace: bool = False) -> dict[str, Any]:
        filename, data = _read(delta)
        out: dict[str, Any] = self._call(
            "POST",
            "/tasks",
            params={"replace": "true"} if replace else None,
            files={"delta": (filename, data, "application/octet-stream")},
            data={"name": name} if name else None,
            headers=self._auth,
        ).json()
        return out

    def delete(self, name: str) -> None:
        self._call("DELETE", f"/tasks/{name}", headers=self._auth)

    def predict(self, name: str, images: builtins.list[Source], top_k: int = 5) -> dict[str, Any]:
        files = []
        for image in images:
            filename, data = _read(image)
            files.append(("image", (filename, data, "application/octet-stream")))
        out: dict[str, Any] = self._call(
            "POST", f"/tasks/{name}/predict", params={"top_k": top_k}, files=files
        ).json()
        return out

    def onnx_model(self, name: str) -> bytes:
        return self._call("GET", f"/tasks/{name}/model.onnx", headers=self._auth).content

    # ------------------------------------------------------------------------------ lifecycle
    def stage(self, delta: Source, name: str | None = None) -> dict[str, Any]:
        """Upload ``delta`` as the task's staged version: resident, answering no live traffic."""
        filename, data = _read(delta)
        out: dict[str, Any] = self._call(
            "POST",
            "/tasks",
            params={"stage": "true"},
            files={"delta": (filename, data, "application/octet-stream")},
            data={"name": name} if name else None,
            headers=self._auth,
        ).json()
        return out

    def versions(self, name: str) -> dict[str, Any]:
        """The task's kept versions, newest first, with ``current_version`` and ``staged_version``."""
        out: dict[str, Any] = self._call("GET", f"/tasks/{name}/versions").json()
        return out

    def version(self, name: str, version: int) -> dict[str, Any]:
        out: dict[str, Any] = self._call("GET", f"/tasks/{name}/versions/{int(version)}").json()
        return out

    def promote(
        self,
        name: str,
        version: int,
        min_accuracy: float | None = None,
        min_agreement: float | None = None,
        min_images: int | None = None,
    ) -> dict[str, Any]:
        """Make a kept version current, optionally gated (``SSFError`` 409 ``gate_failed`` when not met)."""
        gate = {"min_accuracy": min_accuracy, "min_agreement": min_agreement, "min_images": min_images}
        out: dict[str, Any] = self._call(
            "POST",
            f"/tasks/{name}/versions/{int(version)}/promote",
            params={k: v for k, v in gate.items() if v is not None},
            headers=self._auth,
        ).json()
        return out

    def rollback(self, name: str, version: int | None = None) -> dict[str, Any]:
        """Make an older kept version current: ``version``, or the newest one older than the current."""
        if version is None:
            history = self.versions(name)
            current = history["current_version"]
            older = [v["version"] for v in history["versions"] if current is None or v["version"] < current]
            if not older:
                raise SSFError(
                    404, "version_not_found", f"task {name!r} keeps no version older than {current}"
                )
            version = max(older)
        return self.promote(name, version)

    def predict_version(
        self, name: str, images: builtins.list[Source], version: int, top_k: int = 5
    ) -> dict[str, Any]:
        """Predict with the current or the staged version explicitly (admin token)."""
        files = []
        for image in images:
            filename, data = _read(image)
            files.append(("image", (filename, data, "application/octet-stream")))
        out: dict[str, Any] = self._call(
            "POST",
            f"/tasks/{name}/predict",
            params={"top_k": top_k, "version": int(version)},
            files=files,
            headers=self._auth,
        ).json()
        return out

    def evaluate(
        self,
        name: str,
        images: builtins.list[Source] | None = None,
        labels: builtins.list[str] | None = None,
        *,
        archive: Source | None = None,
        version: int | None = None,
    ) -> dict[str, Any]:
        """Score the current version (and ``version``) on labelled images, or an ImageFolder zip
        (``archive``). A long evaluation answers 202 with a job: poll ``evaluation_job``."""
        parts: list[tuple[str, tuple[str | None, bytes | str] | tuple[str, bytes, str]]] = []
        if archive is not None:
            filename, data = _read(archive)
            parts.append(("archive", (filename, data, "application/zip")))
        for image in images or []:
            filename, data = _read(image)
            parts.append(("image", (filename, data, "application/octet-stream")))
        parts += [("label", (None, label)) for label in labels or []]
        out: dict[str, Any] = self._call(
            "POST",
            f"/tasks/{name}/evaluate",
            params={"version": int(version)} if version is not None else None,
            files=parts,
            headers=self._auth,
        ).json()
        return out

    def evaluation_job(self, name: str, job_id: str) -> dict[str, Any]:
        out: dict[str, Any] = self._call(
            "GET", f"/tasks/{name}/evaluations/{job_id}", headers=self._auth
        ).json()
        return out

    def audit(self, task: str | None = None, limit: int = 100) -> builtins.list[dict[str, Any]]:
        """The audit log's newest ``limit`` records (of ``task``), oldest first (operator token)."""
        params: dict[str, Any] = {"limit": limit}
        if task is not None:
            params["task"] = task
        out: builtins.list[dict[str, Any]] = self._call(
            "GET", "/audit", params=params, headers=self._auth
        ).json()["records"]
        return out
