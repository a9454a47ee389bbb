"""A local HTTP server speaking the KFP v2beta1 REST calls that kfp.Client makes for submit and
schedule; it records every request so tests can assert what was sent."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse


class JsonHandler(BaseHTTPRequestHandler):
    """A quiet request handler that answers JSON (the local fakes of cluster APIs share it)."""

    def log_message(self, *args):
        pass

    def _reply(self, body: dict, status: int = 200):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class FakeKfp:
    def __init__(self):
        self.requests: list[dict] = []
        self.experiments: dict[str, dict] = {}
        self.pipelines: dict[str, dict] = {}
        self.versions: dict[str, list[dict]] = {}
        outer = self

        class Handler(JsonHandler):
            def _record(self):
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw
                url = urlparse(self.path)
                outer.requests.append(
                    {"method": self.command, "path": url.path, "query": parse_qs(url.query), "body": body}
                )
                return url.path, parse_qs(url.query), body

            def do_GET(self):
                path, query, _ = self._record()
                if path.endswith("/healthz"):
                    return self._reply({"multi_user": False})
                if path == "/apis/v2beta1/experiments":
                    flt = json.dumps(query)
                    hits = [e for n, e in outer.experiments.items() if n in flt]
                    return self._reply({"experiments": hits, "total_size": len(hits)})
                if path.startswith("/apis/v2beta1/experiments/"):
                    eid = path.rsplit("/", 1)[1]
                    return self._reply(next(e for e in outer.experiments.values() if e["experiment_id"] == eid))
                if path == "/apis/v2beta1/pipelines":
                    hits = [p for n, p in outer.pipelines.items() if n in json.dumps(query)]
                    return self._reply({"pipelines": hits, "total_size": len(hits)})
                if path.startswith("/apis/v2beta1/pipelines/") and path.endswith("/versions"):
                    pid = path.split("/")[4]
                    return self._reply(
                        {
                            "pipeline_versions": outer.versions.get(pid, []),
                            "total_size": len(outer.versions.get(pid, [])),
                        }
                    )
                if path.startswith("/apis/v2beta1/runs/"):
                    return self._reply({"run_id": path.rsplit("/", 1)[1], "state": "SUCCEEDED", "display_name": "r"})
                return self._reply({}, 404)

            def do_POST(self):
                path, query, body = self._record()
                if path == "/apis/v2beta1/experiments":
                    exp = {"experiment_id": f"exp-{len(outer.experiments) + 1}", "display_name": body["display_name"]}
                    outer.experiments[body["display_name"]] = exp
                    return self._reply(exp)
                if path == "/apis/v2beta1/pipelines/upload":
                    name = query["name"][0]
                    pipe = outer.pipelines[name] = {
                        "pipeline_id": f"p-{len(outer.pipelines) + 1}",
                        "display_name": name,
                    }
                    outer.versions[pipe["pipeline_id"]] = [
                        {"pipeline_id": pipe["pipeline_id"], "pipeline_version_id": "v-1", "display_name": name}
                    ]
                    return self._reply(pipe)
                if path == "/apis/v2beta1/pipelines/upload_version":
                    pid = query["pipelineid"][0]
                    v = {
                        "pipeline_id": pid,
                        "pipeline_version_id": f"v-{len(outer.versions[pid]) + 1}",
                        "display_name": query["name"][0],
                    }
                    outer.versions[pid].append(v)
                    return self._reply(v)
                if path == "/apis/v2beta1/runs":
                    return self._reply(
                        {
                            "run_id": "run-123",
                            "display_name": body.get("display_name"),
                            "state": "PENDING",
                            "experiment_id": body.get("experiment_id"),
                        }
                    )
                if path == "/apis/v2beta1/recurringruns":
                    return self._reply(
                        {"recurring_run_id": "rr-7", "display_name": body.get("display_name"), "status": "ENABLED"}
                    )
                return self._reply({}, 404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
