"""A local HTTP server speaking the KFP v2beta1 REST calls that kfp.Client makes for submit and
schedule; it records every request so tests can assert what was sent. Request bodies are read
with the kfp_server_api models (V2beta1Experiment, V2beta1Run, V2beta1RecurringRun) the real API
server's are: a body the model does not hold (an unknown key, a value of another type, an enum
value it does not allow, a required field missing) is answered 400 and fails the test on exit.
A run answers the states given (e.g. RUNNING then FAILED); the health check can ask for a login."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from urllib.parse import parse_qs, urlparse

import kfp_server_api
from kfp_server_api import ApiClient


class JsonHandler(BaseHTTPRequestHandler):
    """A quiet request handler that answers JSON (the local fakes of cluster APIs share it)."""

    def log_message(self, *args):
        pass

    def _send(self, data: bytes, kind: str, status: int):
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _reply(self, body: dict, status: int = 200):
        self._send(json.dumps(body).encode(), "application/json", status)

    def _html(self, text: str, status: int = 200):
        self._send(text.encode(), "text/html; charset=utf-8", status)

    def _redirect(self, location: str, status: int = 302):
        self.send_response(status)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()


def _differences(sent, back, where: str):
    """Where the body as sent and as the model gives it back differ: what the model dropped or read
    as another value. An integer sent for an int64 field (a string in the models) is what grpc-gateway takes."""
    if isinstance(sent, dict) and isinstance(back, dict):
        for key, value in sent.items():
            if key not in back:
                if value is not None:
                    yield f"{where}.{key}: not a field of the model"
            else:
                yield from _differences(value, back[key], f"{where}.{key}")
    elif isinstance(sent, list) and isinstance(back, list) and len(sent) == len(back):
        for i, (a, b) in enumerate(zip(sent, back)):
            yield from _differences(a, b, f"{where}[{i}]")
    elif sent != back and not (type(sent) is int and back == str(sent)):
        yield f"{where}: {sent!r} is read as {back!r}"


def _bad_enums(model, where: str):
    for attr, kind in getattr(model, "openapi_types", {}).items():
        value = getattr(model, attr)
        enum = getattr(kfp_server_api.models, kind, None)
        if value is not None and getattr(enum, "allowable_values", None) and value not in enum.allowable_values:
            yield f"{where}.{attr}: {value!r} is not one of {enum.allowable_values}"
        elif hasattr(value, "openapi_types"):
            yield from _bad_enums(value, f"{where}.{attr}")


# what the API server requires of a created object beyond its model's types
REQUIRED = {
    "V2beta1Experiment": ("display_name",),
    "V2beta1Run": ("display_name", "experiment_id"),
    "V2beta1RecurringRun": ("display_name", "experiment_id", "trigger", "mode"),
}


def parse_body(api: ApiClient, raw: bytes, klass: str):
    """The request body as the kfp_server_api model `klass`, through ApiClient.deserialize as the
    client reads the server's answers; ValueError naming every way the body is malformed."""
    body = json.loads(raw)
    if not isinstance(body, dict):
        raise ValueError(f"{klass}: the body is not a JSON object")
    model = api.deserialize(SimpleNamespace(data=raw), klass)
    problems = list(_differences(body, api.sanitize_for_serialization(model), klass))
    problems += list(_bad_enums(model, klass))
    problems += [f"{klass}.{f}: required" for f in REQUIRED.get(klass, ()) if not getattr(model, f)]
    if klass != "V2beta1Experiment":  # a run or recurring run names its pipeline one way
        ref = model.pipeline_version_reference
        if (model.pipeline_spec is None) == (ref is None):
            problems.append(f"{klass}: give pipeline_spec or pipeline_version_reference, one of them")
        elif ref is not None and not (ref.pipeline_id and ref.pipeline_version_id):
            problems.append(f"{klass}.pipeline_version_reference: pipeline_id and pipeline_version_id required")
    if problems:
        raise ValueError("; ".join(problems))
    return model


BODIES = {
    "/apis/v2beta1/experiments": "V2beta1Experiment",
    "/apis/v2beta1/runs": "V2beta1Run",
    "/apis/v2beta1/recurringruns": "V2beta1RecurringRun",
}
LOGIN = "<!DOCTYPE html><html><body><form action='/dex/auth/local'>Log in to Your Account</form></body></html>"


class KfpHandler(JsonHandler):
    """Answers as the KFP API server would, from the state of the FakeKfp that serves it."""

    @property
    def fake(self) -> "FakeKfp":
        return self.server.fake

    def _record(self):
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw
        url = urlparse(self.path)
        self.fake.requests.append(
            {
                "method": self.command,
                "path": url.path,
                "query": parse_qs(url.query),
                "body": body,
                "headers": {k.lower(): v for k, v in self.headers.items()},
            }  # fmt: skip
        )
        if self.command == "POST" and url.path in BODIES:
            try:
                parse_body(self.fake.api, raw, BODIES[url.path])
            except ValueError as exc:
                self.fake.errors.append(str(exc))
                self._reply({"code": 3, "message": str(exc)}, 400)
                return None, None, None
        return url.path, parse_qs(url.query), body

    def do_GET(self):
        path, query, _ = self._record()
        if path.endswith("/healthz"):
            return self._health(path)
        if path == "/dex/auth":
            return self._html(LOGIN)
        if path == "/apis/v2beta1/experiments":
            flt = json.dumps(query)
            hits = [e for n, e in self.fake.experiments.items() if n in flt]
            return self._reply({"experiments": hits, "total_size": len(hits)})
        if path.startswith("/apis/v2beta1/experiments/"):
            eid = path.rsplit("/", 1)[1]
            return self._reply(next(e for e in self.fake.experiments.values() if e["experiment_id"] == eid))
        if path == "/apis/v2beta1/pipelines":
            hits = [p for n, p in self.fake.pipelines.items() if n in json.dumps(query)]
            return self._reply({"pipelines": hits, "total_size": len(hits)})
        if path.startswith("/apis/v2beta1/pipelines/") and path.endswith("/versions"):
            versions = self.fake.versions.get(path.split("/")[4], [])
            return self._reply({"pipeline_versions": versions, "total_size": len(versions)})
        if path.startswith("/apis/v2beta1/runs/"):
            return self._reply(self.fake.advance(path.rsplit("/", 1)[1]))
        return self._reply({}, 404)

    def _health(self, path: str):
        if self.fake.auth == "redirect":
            return self._redirect("/dex/auth?client_id=kubeflow-oidc-authservice&state=x")
        if self.fake.auth == "login-page":
            return self._html(LOGIN)
        if self.fake.auth == "unauthorized":
            return self._reply({"code": 16, "message": "Unauthenticated"}, 401)
        if self.fake.auth == "moved" and not path.startswith("/moved/"):
            return self._redirect("/moved" + path, 301)
        return self._reply({"multi_user": False})

    def do_POST(self):
        path, query, body = self._record()
        if path is None:  # a malformed body, answered already
            return None
        if path == "/apis/v2beta1/experiments":
            exp = {
                "experiment_id": f"exp-{len(self.fake.experiments) + 1}",
                "display_name": body["display_name"],
            }
            self.fake.experiments[body["display_name"]] = exp
            return self._reply(exp)
        if path == "/apis/v2beta1/pipelines/upload":
            name = query["name"][0]
            pipe = self.fake.pipelines[name] = {
                "pipeline_id": f"p-{len(self.fake.pipelines) + 1}",
                "display_name": name,
            }
            self.fake.versions[pipe["pipeline_id"]] = [
                {"pipeline_id": pipe["pipeline_id"], "pipeline_version_id": "v-1", "display_name": name}
            ]
            return self._reply(pipe)
        if path == "/apis/v2beta1/pipelines/upload_version":
            pid = query["pipelineid"][0]
            v = {
                "pipeline_id": pid,
                "pipeline_version_id": f"v-{len(self.fake.versions[pid]) + 1}",
                "display_name": query["name"][0],
            }
            self.fake.versions[pid].append(v)
            return self._reply(v)
        if path == "/apis/v2beta1/runs":
            run_id = f"run-{123 + len(self.fake.runs)}"
            self.fake.runs[run_id] = {**body, "run_id": run_id, "state": "PENDING"}
            return self._reply(self.fake.runs[run_id])
        if path == "/apis/v2beta1/recurringruns":
            return self._reply({**body, "recurring_run_id": "rr-7", "status": "ENABLED"})
        return self._reply({}, 404)


class FakeKfp:
    """run_states: the states a run answers in turn (the last one stays). auth: "" (none), "redirect"
    (the health check is redirected to a login page), "login-page" (answers one, HTTP 200),
    "unauthorized" (HTTP 401), or "moved" (redirected to the API elsewhere on this server: healthy)."""

    def __init__(self, run_states: tuple[str, ...] = ("SUCCEEDED",), auth: str = ""):
        self.requests: list[dict] = []
        self.errors: list[str] = []
        self.experiments: dict[str, dict] = {}
        self.pipelines: dict[str, dict] = {}
        self.versions: dict[str, list[dict]] = {}
        self.runs: dict[str, dict] = {}
        self.run_states = list(run_states)
        self.api = ApiClient()
        self.auth = auth
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), KfpHandler)
        self.server.fake = self
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def advance(self, run_id: str) -> dict:
        """The run with its next state; a failed one with the error the backend reports."""
        state = self.run_states.pop(0) if len(self.run_states) > 1 else self.run_states[0]
        run = {**self.runs[run_id], "state": state}
        if state in ("FAILED", "ERROR"):
            run["error"] = {"code": 2, "message": "task train-imgnet failed: OOMKilled"}
        return run

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        if self.errors and exc[0] is None:
            raise AssertionError("malformed request bodies: " + " | ".join(self.errors))
