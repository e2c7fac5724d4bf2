"""Estimates under load: 20 concurrent `/estimate` calls through gradio_client, in waves, with and
without a training run beside the app.

    python bench/estimate_load.py                       # idle, then a run started from the Train tab
    python bench/estimate_load.py --train cli           # the run as `python -m lowrank.train` beside the app
    python bench/estimate_load.py --calls 20 --waves 3 --steps 1000 --scenarios idle,training

The app is served as its own process (`python app.py --port P --runs TMP`), as a user runs it. Each
wave starts `--calls` threads at once, each with its own `gradio_client.Client`, and times one
`predict(..., api_name="/estimate")` per thread. Wave "connect" is each new client's first call
(Gradio builds a session state for it, ~12 ms of the app's CPU for this page's components), waves
1, 2, 3 the same clients calling again. "training" starts `tiny-llama-20m` full training on
the CPU before the waves: through the Train tab's Start event (the page's own protocol, its live
updates read as a browser would) with `--train app`, or as a separate `python -m lowrank.train` with
`--train cli`. Besides latency, each wave reports the CPU the app process and this client process
spent per call (the client's share is gradio_client's own work: HTTP clients, threads, polling).

Target: p95 < 1 s in every wave after connecting, training or not. `--ssl-verify` measures
gradio_client's default, which builds an SSL context from the CA bundle for every request even to
a plain-HTTP app: ~25 ms of the caller's CPU per request, 20 threads serialized on its GIL.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

REPO = Path(__file__).resolve().parent.parent
METHODS = ("full", "lora", "qlora", "galore", "qgalore")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@contextlib.contextmanager
def serve_app(runs: Path):
    """`python app.py` on a free port; yields (url, process) once it answers."""
    import httpx

    port = free_port()
    log = open(runs / "app.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--runs", str(runs)], cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the app exited with status {proc.returncode}; see {runs / 'app.log'}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "config", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise SystemExit("the app did not answer within 3 minutes")
            time.sleep(0.5)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


class AppTraining:
    """A run started from the Train tab's Start event, its live updates read like a browser reads them."""

    def __init__(self, url: str, steps: int) -> None:
        import httpx

        self.url, self.steps = url, steps
        self.http = httpx.Client(timeout=None)
        self.session = f"bench{os.getpid()}"
        self.updates = 0
        self._reader: threading.Thread | None = None

    def _start_data(self) -> tuple[int, list]:
        config = self.http.get(self.url + "config").json()
        components = {c["id"]: c for c in config["components"]}
        start_button = next(c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == "train-start")
        click = next(d["id"] for d in config["dependencies"] if [start_button, "click"] in d["targets"])
        start = next(d for d in config["dependencies"] if d.get("trigger_after") == click)
        data = [components[i].get("props", {}).get("value") for i in start["inputs"]]
        data[0], data[1], data[4] = "tiny-llama-20m", ["full"], self.steps  # model, methods, steps
        return start["id"], data

    def _read(self) -> None:
        with self.http.stream("GET", self.url + "gradio_api/queue/data", params={"session_hash": self.session}) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    self.updates += 1
                    if json.loads(line[5:]).get("msg") == "close_stream":
                        return

    def __enter__(self) -> AppTraining:
        fn_index, data = self._start_data()
        response = self.http.post(self.url + "gradio_api/queue/join",
                                  json={"data": data, "fn_index": fn_index, "session_hash": self.session,
                                        "event_data": None, "trigger_id": None})
        response.raise_for_status()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def wait_until_training(self, runs: Path, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while not any(p.stat().st_size > 0 for p in runs.glob("*/metrics.jsonl")):
            if time.monotonic() > deadline:
                raise SystemExit("the training run did not write a step within 4 minutes")
            time.sleep(0.5)

    def __exit__(self, *exc) -> None:
        with contextlib.suppress(Exception):  # Stop, as the page's Stop button does
            stop = next(d["id"] for d in self.http.get(self.url + "config").json()["dependencies"]
                        if d.get("api_name") == "stop")
            self.http.post(self.url + "gradio_api/queue/join",
                           json={"data": [], "fn_index": stop, "session_hash": self.session,
                                 "event_data": None, "trigger_id": None})
        if self._reader is not None:
            self._reader.join(timeout=30)
        self.http.close()


class CliTraining:
    """`python -m lowrank.train` beside the app (the app does not follow it)."""

    def __init__(self, out: Path, steps: int) -> None:
        self.out, self.steps = out, steps
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> CliTraining:
        self.proc = subprocess.Popen([sys.executable, "-m", "lowrank.train", "--model", "tiny-llama-20m", "--method",
                                      "full", "--steps", str(self.steps), "--out", str(self.out)], cwd=REPO,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self

    def wait_until_training(self, runs: Path, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        metrics = self.out / "metrics.jsonl"
        while not (metrics.exists() and metrics.stat().st_size > 0):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the training run did not write a step")
            time.sleep(0.5)

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def wave(clients: list, index: int) -> list[float]:
    """One concurrent call per client, all released at once; seconds each."""
    latencies: list[float | None] = [None] * len(clients)
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(clients))

    def call(i: int) -> None:
        method = METHODS[i % len(METHODS)]
        barrier.wait()
        start = time.perf_counter()
        try:
            clients[i].predict(model="llama-7b", method=method, options={}, batch_size=1 + index,
                               seq_len=256, api_name="/estimate")
        except BaseException as err:  # reported below
            errors.append(err)
        latencies[i] = time.perf_counter() - start

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(clients))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(f"{len(errors)} calls failed, e.g. {errors[0]!r}")
    return sorted(latencies)


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def run_waves(url: str, app_pid: int, scenario: str, calls: int, waves: int, ssl_verify: bool) -> list[dict]:
    """Wave 0 ("connect"): the first call of `calls` new clients (Gradio builds each one's session
    state); then `waves` waves of the same clients calling again."""
    from gradio_client import Client

    clients = [Client(url, verbose=False, ssl_verify=ssl_verify) for _ in range(calls)]
    rows = []
    for index in range(waves + 1):
        app_cpu, own_cpu = cpu_seconds(app_pid), own_cpu_seconds()
        latencies = wave(clients, index)
        rows.append({"scenario": scenario, "wave": index or "connect", "p50": percentile(latencies, 50),
                     "p95": percentile(latencies, 95), "max": latencies[-1],
                     "app_cpu_ms": 1e3 * (cpu_seconds(app_pid) - app_cpu) / calls,
                     "client_cpu_ms": 1e3 * (own_cpu_seconds() - own_cpu) / calls})
        print(f"  {scenario} wave {rows[-1]['wave']}: p50 {rows[-1]['p50']:.3f} s, p95 {rows[-1]['p95']:.3f} s",
              file=sys.stderr)
        time.sleep(1)
    for client in clients:
        with contextlib.suppress(Exception):
            client.close()
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20, help="concurrent calls per wave")
    parser.add_argument("--waves", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1000, help="steps of the training run beside the app")
    parser.add_argument("--train", choices=("app", "cli"), default="app",
                        help="start the run from the Train tab (app) or as python -m lowrank.train (cli)")
    parser.add_argument("--scenarios", default="idle,training", help="comma-separated: idle, training")
    parser.add_argument("--ssl-verify", action=argparse.BooleanOptionalAction, default=False,
                        help="gradio_client's ssl_verify; the app is plain HTTP, and with it on (the client's "
                             "default) every request builds an SSL context from the CA bundle, ~25 ms of the "
                             "caller's CPU")
    args = parser.parse_args(argv)
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]

    runs = Path(tempfile.mkdtemp(prefix="estimate-load-"))
    rows = []
    try:
        with serve_app(runs) as (url, proc):
            for scenario in scenarios:
                if scenario == "idle":
                    rows += run_waves(url, proc.pid, "idle", args.calls, args.waves, args.ssl_verify)
                elif scenario == "training":
                    training = AppTraining(url, args.steps) if args.train == "app" else \
                        CliTraining(runs / "cli-run", args.steps)
                    with training:
                        training.wait_until_training(runs)
                        rows += run_waves(url, proc.pid, f"training ({args.train})", args.calls, args.waves,
                                          args.ssl_verify)
                else:
                    parser.error(f"unknown scenario {scenario!r}; use idle or training")
    finally:
        shutil.rmtree(runs, ignore_errors=True)

    print(f"\n{args.calls} concurrent /estimate calls per wave (gradio_client, one Client per thread, "
          f"ssl_verify={args.ssl_verify})\n")
    print("| scenario | wave | p50 s | p95 s | max s | app CPU ms/call | client CPU ms/call |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['scenario']} | {r['wave']} | {r['p50']:.3f} | {r['p95']:.3f} | {r['max']:.3f} | "
              f"{r['app_cpu_ms']:.1f} | {r['client_cpu_ms']:.1f} |")
    waves = [r for r in rows if r["wave"] != "connect"]
    if waves:
        worst = max(r["p95"] for r in waves)
        print(f"\nworst p95 of the waves after connecting: {worst:.3f} s (target < 1 s): "
              f"{'met' if worst < 1 else 'NOT met'}")


if __name__ == "__main__":
    main()
