"""Load test and fuzz run of the ranker's HTTP service, on loopback only.

Starts `ranker serve` (one uvicorn process, the shipped model), then
1. load: N concurrent clients post a K-class 64x64 stack each, back to back, for T seconds, ``--rounds``
   times: requests per second, p50/p99 latency, errors, and the server's memory (RSS) at the end of
   each round and again after 3 s idle (a leak grows round over round; freed memory comes back when idle);
2. fuzz: schemathesis against the server's OpenAPI schema, checking that no response is a 5xx;
3. the compute bound: the network alone on one request's classes in this process (same cores), so the
   latency that N back-to-back clients cannot beat is known: N x (network time per request).

    python benchmarks/bench_service.py                       # 16 clients, 100 classes, 30 s; fuzz 200 cases
    python benchmarks/bench_service.py --clients 4 --seconds 10 --fuzz_examples 50

The table goes to benchmarks/results/service.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _stack(k: int, box: int, path: Path) -> bytes:
    """K class-average-like images: blobs of varied size and shape plus noise."""
    from reconstruct.files import write_stack

    rng = np.random.default_rng(0)
    c = np.arange(box) - box // 2
    y, x = np.meshgrid(c, c, indexing="ij")
    imgs = []
    for _ in range(k):
        a, b = rng.uniform(4, 14, 2)
        imgs.append(np.exp(-(x ** 2 / (2 * a * a) + y ** 2 / (2 * b * b))) + rng.normal(0, 0.2, (box, box)))
    write_stack(path, np.array(imgs, np.float32), 3.0)
    return path.read_bytes()


def load_test(url: str, payload: bytes, clients: int, seconds: float) -> dict:
    """Clients posting back to back for ``seconds``: throughput, latency percentiles, errors."""
    latencies: list[float] = []
    errors: list[str] = []
    stop = time.monotonic() + seconds
    lock = threading.Lock()

    def worker() -> None:
        with httpx.Client(timeout=120) as c:
            while time.monotonic() < stop:
                t = time.perf_counter()
                try:
                    r = c.post(f"{url}/v1/score", files={"stack": ("classes.mrcs", payload)},
                               data={"particle_diameter": "150"})
                    ok = r.status_code == 200
                    why = f"{r.status_code}"
                except httpx.HTTPError as e:
                    ok, why = False, type(e).__name__
                dt = time.perf_counter() - t
                with lock:
                    (latencies.append(dt) if ok else errors.append(why))

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.monotonic() - t0
    lat = np.array(latencies) if latencies else np.array([np.nan])
    return {"requests": len(latencies), "errors": len(errors), "error_kinds": sorted(set(errors)),
            "wall_s": wall, "rps": len(latencies) / wall, "p50_s": float(np.percentile(lat, 50)),
            "p99_s": float(np.percentile(lat, 99)), "mean_s": float(lat.mean())}


def fuzz(url: str, examples: int, max_time: int) -> dict:
    """schemathesis on the OpenAPI schema, checking for server errors (5xx)."""
    st = shutil.which("st") or shutil.which("schemathesis")
    if st is None:
        return {"skipped": "schemathesis is not installed (pip install schemathesis)"}
    cmd = [st, "run", f"{url}/openapi.json", "--checks", "not_a_server_error", "--max-examples", str(examples),
           "--max-time", str(max_time), "--no-color", "--warnings", "off"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    tail = "\n".join(r.stdout.strip().splitlines()[-15:])
    return {"exit_code": r.returncode, "passed": r.returncode == 0, "summary": tail, "command": " ".join(cmd)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    ap.add_argument("--classes", type=int, default=100, help="classes per request (default 100)")
    ap.add_argument("--box", type=int, default=64, help="image size (default 64)")
    ap.add_argument("--seconds", type=float, default=30.0, help="duration of the load test (default 30)")
    ap.add_argument("--fuzz_examples", type=int, default=200, help="schemathesis examples per operation (default 200)")
    ap.add_argument("--fuzz_seconds", type=int, default=120, help="time budget of the fuzz run (default 120)")
    ap.add_argument("--rounds", type=int, default=3, help="load rounds (default 3)")
    args = ap.parse_args()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "ranker.cli", "serve", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{url}/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            raise SystemExit(f"the server did not start: {server.stderr.read() if server.stderr else ''}")
        with tempfile.TemporaryDirectory() as tmp:
            payload = _stack(args.classes, args.box, Path(tmp) / "classes.mrcs")
        httpx.post(f"{url}/v1/score", files={"stack": ("c.mrcs", payload)}, timeout=120)  # warm-up
        time.sleep(3)
        start_rss = _rss_mb(server.pid)
        rounds = []
        for _ in range(args.rounds):  # a leak would keep growing round over round
            ld = load_test(url, payload, args.clients, args.seconds)
            ld["rss_busy_mb"] = _rss_mb(server.pid)
            time.sleep(3)  # the batcher hands freed memory back after 1 s idle
            ld["rss_idle_mb"] = _rss_mb(server.pid)
            rounds.append(ld)
            print(ld, flush=True)
        fz = fuzz(url, args.fuzz_examples, args.fuzz_seconds)
        time.sleep(3)
        fuzz_rss = _rss_mb(server.pid)
        alive = httpx.get(f"{url}/v1/health", timeout=5).status_code == 200
    finally:
        server.terminate()
        server.wait(timeout=30)
    bound = network_bound(payload, args.classes)
    result = {"rounds": rounds, "rss_start_mb": start_rss, "rss_after_fuzz_mb": fuzz_rss, "fuzz": fz,
              "alive_after": alive, "network_s_per_request": bound, "args": vars(args), "cores": os.cpu_count()}
    (HERE / "out").mkdir(exist_ok=True)
    (HERE / "out" / "service.json").write_text(json.dumps(result, indent=1))
    write_table(result)


def network_bound(payload: bytes, classes: int, repeats: int = 5) -> float:
    """Median seconds the shipped network takes for one request's classes (features excluded)."""
    import torch

    from ranker.model_store import load_model
    from ranker.score import predict

    torch.set_num_threads(os.cpu_count() or 1)
    model = load_model(None)
    rng = np.random.default_rng(1)
    images = rng.normal(size=(classes, 64, 64)).astype(np.float32)
    feats = rng.normal(size=(classes, 24)).astype(np.float32)
    predict(model.net, images, feats, 512)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        predict(model.net, images, feats, 512)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def write_table(r: dict) -> None:
    """benchmarks/results/service.md."""
    a = r["args"]
    lines = [f"# Ranker HTTP service on loopback ({r['cores']} cores, one uvicorn process, shipped model)", "",
             f"Load: {a['clients']} concurrent clients posting {a['classes']}-class {a['box']}x{a['box']} stacks "
             f"back to back for {a['seconds']:.0f} s (image-only features).", "",
             "| round | requests | errors | requests/s | classes/s | p50 latency (s) | p99 latency (s) "
             "| RSS at the end (MB) | RSS after 3 s idle (MB) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for i, ld in enumerate(r["rounds"]):
        lines.append(f"| {i + 1} | {ld['requests']} | {ld['errors']} | {ld['rps']:.2f} "
                     f"| {ld['rps'] * a['classes']:.0f} | {ld['p50_s']:.2f} | {ld['p99_s']:.2f} "
                     f"| {ld['rss_busy_mb']:.0f} | {ld['rss_idle_mb']:.0f} |")
    t = r["network_s_per_request"]
    lines += ["", f"Server memory (RSS) idle before the load: {r['rss_start_mb']:.0f} MB; 3 s after the fuzz run: "
              f"{r['rss_after_fuzz_mb']:.0f} MB.", "",
              f"Compute bound: the network alone takes {t:.3f} s for one request's {a['classes']} classes on these "
              f"cores (features excluded), so the server cannot exceed {1 / t:.1f} requests/s, and "
              f"{a['clients']} clients posting back to back cannot see a mean latency below "
              f"{a['clients']} x {t:.3f} = {a['clients'] * t:.2f} s.", ""]
    fz = r["fuzz"]
    if "skipped" in fz:
        lines.append(f"Fuzz: skipped ({fz['skipped']}).")
    else:
        lines += [f"Fuzz (schemathesis, check not_a_server_error): {'no 5xx' if fz['passed'] else 'FAILURES'} "
                  f"(exit {fz['exit_code']}); server alive afterwards: {r['alive_after']}.", "", "```",
                  fz["summary"], "```"]
    flags = " ".join(f"--{k} {v}" for k, v in a.items())
    lines += ["", f"Reproduce: `python benchmarks/bench_service.py {flags}`"]
    text = "\n".join(lines) + "\n"
    print(text)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "service.md").write_text(text)


if __name__ == "__main__":
    main()
