"""A local HTTP server speaking the Kubernetes custom-object calls that dseh.kube makes (create and
get a TrainJob or PyTorchJob; delete one that overran). It plays the cluster: on create it runs the
job's torchrun command on this machine (all nodes' processes as one local torchrun, gloo on the
CPU) and reports the job's conditions from that run, so the staged inputs and the command are
exercised for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import ThreadingHTTPServer

from tests.kfp_fake import JsonHandler


class FakeKubernetes:
    def __init__(self, run_jobs: bool = True, env: dict | None = None):
        self.requests: list[dict] = []
        self.jobs: dict[str, dict] = {}
        self.run_jobs = run_jobs
        self.env = env or {}
        outer = self

        class Handler(JsonHandler):
            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n))
                outer.requests.append({"method": "POST", "path": self.path, "body": body})
                name = body["metadata"]["name"]
                if name in outer.jobs:
                    return self._reply({"kind": "Status", "code": 409, "reason": "AlreadyExists"}, 409)
                outer.jobs[name] = {**body, "status": {"conditions": []}}
                if outer.run_jobs:
                    threading.Thread(target=outer._run, args=(name,), daemon=True).start()
                self._reply(outer.jobs[name], 201)

            def do_GET(self):
                outer.requests.append({"method": "GET", "path": self.path})
                name = self.path.rstrip("/").rsplit("/", 1)[-1]
                if name not in outer.jobs:
                    return self._reply({"kind": "Status", "code": 404, "reason": "NotFound"}, 404)
                self._reply(outer.jobs[name])

            def do_DELETE(self):
                outer.requests.append({"method": "DELETE", "path": self.path})
                name = self.path.rstrip("/").rsplit("/", 1)[-1]
                if outer.jobs.pop(name, None) is None:
                    return self._reply({"kind": "Status", "code": 404, "reason": "NotFound"}, 404)
                self._reply({"kind": "Status", "status": "Success"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    @staticmethod
    def command(job: dict) -> list[str]:
        spec = job["spec"]
        if job["kind"] == "TrainJob":
            return spec["trainer"]["command"]
        return spec["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["command"]

    def _run(self, name: str) -> None:
        job = self.jobs[name]
        cmd = self.command(job)
        assert cmd[0] == "torchrun"
        nnodes = int(next(a for a in cmd if a.startswith("--nnodes=")).split("=")[1])
        nproc = int(next(a for a in cmd if a.startswith("--nproc-per-node=")).split("=")[1])
        module_at = cmd.index("-m")
        # every node's processes on this one machine: one torchrun over nnodes x nproc processes
        local = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nnodes * nproc}"]
        env = {**os.environ, **self.env, "OMP_NUM_THREADS": "1"}
        res = subprocess.run(local + cmd[module_at:], env=env, capture_output=True, text=True)
        done = "Complete" if job["kind"] == "TrainJob" else "Succeeded"
        if res.returncode == 0:
            cond = {"type": done, "status": "True", "message": "job completed"}
        else:
            tail = [ln for ln in res.stderr.splitlines() if "error" in ln.lower()][-1:] or ["exit code"]
            cond = {"type": "Failed", "status": "True", "message": tail[0]}
        job["status"] = {"conditions": [{"type": "Created", "status": "True"}, cond]}

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
