"""A minimal Kubeflow Pipelines API server (REST v2beta1) on 127.0.0.1, recording every request.

It answers exactly the calls ``kfp.Client`` makes for ``submit`` and ``schedule``: healthz, pipeline lookup /
upload / upload_version / versions, experiments, runs and recurring runs. State is kept in memory so a second
upload of the same pipeline sees the first.
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import json
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    json: Any = None
    form: dict[str, Any] = field(default_factory=dict)


@dataclass
class State:
    requests: list[Request] = field(default_factory=list)
    pipelines: dict[str, dict[str, Any]] = field(default_factory=dict)
    versions: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    experiments: dict[str, dict[str, Any]] = field(default_factory=dict)
    recurring: list[dict[str, Any]] = field(default_factory=list)
    token: str | None = None  # when set, requests without "Authorization: Bearer <token>" get 401

    def calls(self, method: str, path: str) -> list[Request]:
        return [r for r in self.requests if r.method == method and r.path == path]


def _display_name_filter(query: dict[str, list[str]]) -> str | None:
    raw = query.get("filter", [None])[0]
    if not raw:
        return None
    for p in json.loads(raw).get("predicates", []):
        if p.get("key") == "display_name":
            return str(p.get("stringValue") or p.get("string_value"))
    return None


def _handler(state: State) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # keep pytest output clean
            return None

        def _send(self, body: Any, status: int = 200) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _record(self) -> Request:
            parts = urlsplit(self.path)
            req = Request(self.command, parts.path, parse_qs(parts.query), dict(self.headers.items()))
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            ctype = self.headers.get("Content-Type", "")
            if ctype.startswith("multipart/form-data"):
                msg = email.message_from_bytes(
                    f"Content-Type: {ctype}\r\n\r\n".encode() + body, policy=email.policy.HTTP
                )
                for part in msg.iter_parts():
                    name = part.get_param("name", header="content-disposition")
                    req.form[str(name)] = part.get_payload(decode=True)
                    if part.get_filename():
                        req.form.setdefault("_filenames", {})[str(name)] = part.get_filename()
            elif body:
                req.json = json.loads(body)
            state.requests.append(req)
            return req

        def _authorised(self, req: Request) -> bool:
            auth = {k.lower(): v for k, v in req.headers.items()}.get("authorization")
            if state.token is None or auth == f"Bearer {state.token}":
                return True
            self._send({"error": "missing or invalid token", "code": 16}, 401)
            return False

        def do_GET(self) -> None:
            req = self._record()
            if not self._authorised(req):
                return None
            if req.path == "/apis/v2beta1/healthz":
                return self._send({"multi_user": False})
            if req.path == "/apis/v2beta1/pipelines":
                name = _display_name_filter(req.query)
                found = [p for p in state.pipelines.values() if name is None or p["display_name"] == name]
                return self._send({"pipelines": found, "total_size": len(found)} if found else {})
            if req.path.startswith("/apis/v2beta1/pipelines/") and req.path.endswith("/versions"):
                pid = req.path.split("/")[4]
                name = _display_name_filter(req.query)
                found = [v for v in state.versions.get(pid, []) if name is None or v["display_name"] == name]
                found = sorted(found, key=lambda v: v["created_at"], reverse=True)
                found = [{k: v for k, v in f.items() if k != "package"} for f in found]
                return self._send({"pipeline_versions": found, "total_size": len(found)} if found else {})
            if req.path == "/apis/v2beta1/experiments":
                name = _display_name_filter(req.query)
                found = [e for e in state.experiments.values() if name is None or e["display_name"] == name]
                return self._send({"experiments": found, "total_size": len(found)} if found else {})
            if req.path == "/apis/v2beta1/recurringruns":
                name = _display_name_filter(req.query)
                exp = req.query.get("experiment_id", [None])[0]
                found = [
                    r
                    for r in state.recurring
                    if (name is None or r["display_name"] == name)
                    and (exp is None or r["experiment_id"] == exp)
                ]
                return self._send({"recurringRuns": found, "total_size": len(found)} if found else {})
            return self._send({"error": f"unexpected GET {req.path}"}, 404)

        def _new_version(self, pid: str, name: str, req: Request) -> dict[str, Any]:
            version = {
                "pipeline_id": pid,
                "pipeline_version_id": f"ver-{uuid.uuid4().hex[:8]}",
                "display_name": name,
                "created_at": f"2030-01-01T00:00:{len(state.requests):02d}Z",
                "package": req.form.get("uploadfile"),
            }
            state.versions.setdefault(pid, []).append(version)
            return version

        def do_POST(self) -> None:
            req = self._record()
            if not self._authorised(req):
                return None
            if req.path == "/apis/v2beta1/pipelines/upload":
                name = req.query["name"][0]
                pid = f"pipe-{uuid.uuid4().hex[:8]}"
                state.pipelines[pid] = {"pipeline_id": pid, "display_name": name}
                self._new_version(pid, name, req)
                return self._send(state.pipelines[pid])
            if req.path == "/apis/v2beta1/pipelines/upload_version":
                pid = req.query["pipelineid"][0]
                version = self._new_version(pid, req.query["name"][0], req)
                return self._send({k: v for k, v in version.items() if k != "package"})
            if req.path == "/apis/v2beta1/experiments":
                eid = f"exp-{uuid.uuid4().hex[:8]}"
                state.experiments[eid] = {**req.json, "experiment_id": eid}
                return self._send(state.experiments[eid])
            if req.path == "/apis/v2beta1/runs":
                return self._send({**req.json, "run_id": f"run-{uuid.uuid4().hex[:8]}", "state": "PENDING"})
            if req.path == "/apis/v2beta1/recurringruns":
                job = {**req.json, "recurring_run_id": f"rr-{uuid.uuid4().hex[:8]}", "status": "ENABLED"}
                state.recurring.append(job)
                return self._send(job)
            return self._send({"error": f"unexpected POST {req.path}"}, 404)

    return Handler


@contextlib.contextmanager
def fake_kfp_server(token: str | None = None) -> Iterator[tuple[str, State]]:
    """Yield ``(host URL, recorded state)`` of a KFP API server running in a thread."""
    state = State(token=token)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
