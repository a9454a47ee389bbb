"""A local HTTP server speaking the Kubernetes calls that dseh.kube_jobs makes: create, get and
delete a TrainJob; list the pods of its first node and read that pod's log. It plays the cluster:
on create it runs the job's torchrun command on this machine (all nodes' processes as one local
torchrun, gloo on the CPU), serves the run's output as the node pod's log as it is written, and
reports the job's conditions from that run; deleting a job stops its run. `verbs()` reads back,
from the requests made, which verbs were used on which resources (what RBAC must grant)."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import threading
from http.server import ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from tests.kfp_fake import JsonHandler


def _stamp() -> str:
    # RFC 3339 with the fraction's trailing zeros trimmed, as the API server writes log timestamps
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f").rstrip("0").rstrip(".")
    return now + "Z"


class FakeKubernetes:
    """run_jobs: run a created job's command here. Otherwise a job stays as created, or, with
    `finish_after` N, ends at the N-th read of a job as `finish_as` (condition type, message); a
    created one's node logs `log_lines`."""

    def __init__(
        self,
        run_jobs: bool = True,
        env: dict | None = None,
        finish_after: int = 0,
        finish_as: tuple[str, str] = ("Complete", "job completed"),
        log_lines: tuple = (),
    ):
        self.requests: list[dict] = []
        self.jobs: dict[str, dict] = {}
        self.logs: dict[str, list[str]] = {}  # pod name -> "timestamp line" rows
        self.procs: dict[str, subprocess.Popen] = {}
        self.run_jobs, self.env = run_jobs, env or {}
        self.finish_after, self.finish_as, self.log_lines, self.reads = finish_after, finish_as, log_lines, 0
        outer = self

        class Handler(JsonHandler):
            def _path(self) -> tuple[list[str], dict]:
                url = urlparse(self.path)
                outer.requests.append({"method": self.command, "path": url.path, "query": parse_qs(url.query)})
                return url.path.strip("/").split("/"), parse_qs(url.query)

            def do_POST(self):
                self._path()
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n))
                outer.requests[-1]["body"] = body
                name = body["metadata"]["name"]
                if name in outer.jobs:
                    return self._reply({"kind": "Status", "code": 409, "reason": "AlreadyExists"}, 409)
                outer.jobs[name] = {**body, "status": {"conditions": []}}
                outer.start(name)
                self._reply(outer.jobs[name], 201)

            def do_GET(self):
                parts, query = self._path()
                if parts[:2] == ["api", "v1"] and parts[-1] == "pods":
                    return self._reply({"kind": "PodList", "apiVersion": "v1", "items": outer.pods(query)})
                if parts[:2] == ["api", "v1"] and parts[-1] == "log":
                    pod = parts[-2]
                    if pod not in outer.logs:
                        return self._reply({"kind": "Status", "code": 404, "reason": "NotFound"}, 404)
                    return self._send("".join(r + "\n" for r in outer.logs[pod]).encode(), "text/plain", 200)
                name = parts[-1]
                if name not in outer.jobs:
                    return self._reply({"kind": "Status", "code": 404, "reason": "NotFound"}, 404)
                outer.reads += 1
                if outer.finish_after and outer.reads >= outer.finish_after and not outer.run_jobs:
                    outer.finish(name, *outer.finish_as)
                self._reply(outer.jobs[name])

            def do_DELETE(self):
                parts, _ = self._path()
                name = parts[-1]
                if outer.jobs.pop(name, None) is None:
                    return self._reply({"kind": "Status", "code": 404, "reason": "NotFound"}, 404)
                if name in outer.procs:
                    outer.procs[name].kill()
                self._reply({"kind": "Status", "status": "Success"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    @staticmethod
    def node_pod(name: str) -> str:
        return f"{name}-node-0-0-x7k2p"

    def pods(self, query: dict) -> list[dict]:
        """The node pods whose labels match the selector (equality terms only)."""
        terms = dict(t.split("=", 1) for t in query.get("labelSelector", [""])[0].split(",") if t)
        items = []
        for name in self.jobs:
            labels = {
                "jobset.sigs.k8s.io/jobset-name": name,
                "jobset.sigs.k8s.io/replicatedjob-name": "node",
                "batch.kubernetes.io/job-completion-index": "0",
            }
            pod = self.node_pod(name)
            if pod in self.logs and all(labels.get(k) == v for k, v in terms.items()):
                meta = {"name": pod, "labels": labels, "creationTimestamp": "2026-01-01T00:00:00Z"}
                items.append({"metadata": meta})
        return items

    def log(self, name: str, line: str) -> None:
        self.logs.setdefault(self.node_pod(name), []).append(f"{_stamp()} {line}")

    def finish(self, name: str, kind: str, message: str) -> None:
        if name in self.jobs:
            cond = {"type": kind, "status": "True", "message": message}
            self.jobs[name]["status"] = {"conditions": [{"type": "Created", "status": "True"}, cond]}

    def start(self, name: str) -> None:
        if self.run_jobs:
            threading.Thread(target=self._run, args=(name,), daemon=True).start()
            return
        for line in self.log_lines:
            self.log(name, line)

    @staticmethod
    def command(job: dict) -> list[str]:
        return job["spec"]["trainer"]["command"]

    def _run(self, name: str) -> None:
        cmd = self.command(self.jobs[name])
        assert cmd[0] == "torchrun"
        nnodes = int(next(a for a in cmd if a.startswith("--nnodes=")).split("=")[1])
        nproc = int(next(a for a in cmd if a.startswith("--nproc-per-node=")).split("=")[1])
        module_at = cmd.index("-m")
        # every node's processes on this one machine: one torchrun over nnodes x nproc processes
        local = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nnodes * nproc}"]
        env = {**os.environ, **self.env, "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(
            local + cmd[module_at:], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.procs[name] = proc
        self.logs[self.node_pod(name)] = []
        errors = []
        for line in proc.stdout:
            self.log(name, line.rstrip("\n"))
            errors += [line.strip()] if "error" in line.lower() else []
        if proc.wait() == 0:
            self.finish(name, "Complete", "job completed")
        else:
            self.finish(name, "Failed", (errors[-1:] or ["exit code"])[0])

    def verbs(self) -> dict[tuple[str, str], set[str]]:
        """(API group, resource) -> the verbs the requests made used, read from their method and path."""
        used: dict[tuple[str, str], set[str]] = {}
        for r in self.requests:
            parts = r["path"].strip("/").split("/")
            if parts[0] == "api":  # /api/v1/namespaces/NS/pods[/NAME[/log]]
                group, rest = "", parts[4:]
            else:  # /apis/GROUP/VERSION/namespaces/NS/PLURAL[/NAME]
                group, rest = parts[1], parts[5:]
            resource = rest[0] + ("/" + rest[2] if len(rest) > 2 else "")
            named = len(rest) > 1
            verb = {"POST": "create", "DELETE": "delete"}.get(r["method"], "get" if named else "list")
            used.setdefault((group, resource), set()).add(verb)
        return used

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        for proc in self.procs.values():
            proc.kill()
        self.server.shutdown()
        self.server.server_close()
