"""One framework's benchmark process, driven by ``bench.speed`` over stdin/stdout.

``python -m bench.worker FRAMEWORK`` reads one JSON command per line on stdin and answers one
JSON line on the original stdout (anything the libraries print goes to stderr). Running each
framework in its own process keeps MLX's BLAS preload, JAX's XLA threads and torch's OpenMP
threads from interfering with each other.

Commands: ``info``, ``gemm``, ``build``, ``check``, ``time``, ``memory``, ``quit`` (see
``handle``). ``memory`` is meant for a fresh process with one workload.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import resource
import statistics
import sys
import time
import traceback

# Protocol channel: the real stdout; fd 1 is redirected to stderr so library prints are harmless.
_PROTO = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)
sys.stdout = sys.stderr

MODULES = {"metafn": "bench.peers.metafn_impl", "jax": "bench.peers.jax_impl",
           "torch": "bench.peers.torch_impl"}


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux ``clear_refs`` 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Worker:
    def __init__(self, framework: str, threads: int | None):
        # metafn_impl imports metafn before mlx (BLAS preload); nothing else is imported yet.
        self.mod = importlib.import_module(MODULES[framework])
        self.mod.setup(threads)
        self.runners: dict[tuple[str, str], object] = {}
        self.first_call_ms: dict[str, dict[str, float]] = {}

    def handle(self, msg: dict) -> dict:
        cmd = msg["cmd"]
        if cmd == "info":
            return self.mod.info()
        if cmd == "gemm":
            n, reps = msg.get("n", 2048), msg.get("reps", 5)
            fn = self.mod.gemm(n)
            fn()
            fn()
            ts, cs = [], []
            for _ in range(reps):
                c = time.process_time()
                t = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t)
                cs.append(time.process_time() - c)
            flop = 2.0 * n**3
            return {"n": n, "gflops_median": flop / statistics.median(ts) / 1e9,
                    "gflops_best": flop / min(ts) / 1e9,
                    "gflops_cpu_median": flop / max(statistics.median(cs), 1e-9) / 1e9,
                    "gflops_cpu_best": flop / max(min(cs), 1e-9) / 1e9}
        if cmd == "build":
            return self._build(msg)
        if cmd == "check":
            import numpy as np

            loss, leaves = self.runners[(msg["workload"], msg["variant"])].result()
            np.savez(msg["out"], loss=np.float64(loss), **{f"g{i}": g for i, g in enumerate(leaves)})
            return {"path": msg["out"]}
        if cmd == "time":
            ms, cpu_ms = self._time(self.runners[(msg["workload"], msg["variant"])],
                                    msg["n"], msg.get("warm", 1))
            return {"ms": ms, "cpu_ms": cpu_ms}
        if cmd == "memory":
            return self._memory(msg)
        if cmd == "cost_flops":
            from bench.peers.workloads import WORKLOADS
            import numpy as np

            fn = getattr(self.mod, "cost_analysis_flops", None)
            data = dict(np.load(msg["data"]))
            return {"flops": fn(WORKLOADS[msg["workload"]], data) if fn else None}
        raise ValueError(f"unknown command {cmd!r}")

    def _build(self, msg: dict) -> dict:
        import numpy as np

        from bench.peers.workloads import WORKLOADS

        w = WORKLOADS[msg["workload"]]
        data = dict(np.load(msg["data"]))
        t = time.perf_counter()
        runners = self.mod.build(w, data)
        build_s = time.perf_counter() - t
        first = {}
        for name, r in runners.items():
            t = time.perf_counter()
            r.run()  # first call: traces / compiles
            first[name] = (time.perf_counter() - t) * 1e3
            self.runners[(w.id, name)] = r
        self.first_call_ms[w.id] = first
        notes = {n: r.note for n, r in runners.items() if getattr(r, "note", "")}
        return {"variants": list(runners), "build_s": build_s, "first_call_ms": first,
                "notes": notes}

    @staticmethod
    def _time(runner, n: int, warm: int) -> tuple[list[float], list[float]]:
        """Wall-clock and process CPU time (all threads) of ``n`` calls, in ms."""
        for _ in range(warm):
            runner.run()
        gc.collect()
        gc.disable()
        try:
            ts, cs = [], []
            for _ in range(n):
                c = time.process_time()
                t = time.perf_counter()
                runner.run()
                ts.append((time.perf_counter() - t) * 1e3)
                cs.append((time.process_time() - c) * 1e3)
        finally:
            gc.enable()
        return ts, cs

    def _memory(self, msg: dict) -> dict:
        """Peak RSS of building and running one workload in this (fresh) process, minus the RSS
        before building: ``ru_maxrss`` after the runs (kernel peak mark reset first when
        possible) minus ``VmRSS`` before."""
        import numpy as np

        from bench.peers.workloads import WORKLOADS

        w = WORKLOADS[msg["workload"]]
        data = dict(np.load(msg["data"]))
        gc.collect()
        reset = _reset_hwm()
        self.mod.reset_peak()
        before_kb = _rss_kb()
        before_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        runner = self.mod.build(w, data)[msg["variant"]]
        for _ in range(msg.get("reps", 4)):
            runner.run()
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        base = before_kb if reset else before_max
        out = {"peak_rss_delta_mb": (peak_kb - base) / 1024, "rss_before_mb": before_kb / 1024,
               "peak_rss_mb": peak_kb / 1024, "hwm_reset": reset}
        out.update(self.mod.framework_peak_mb())
        # steady state: peak over further calls above the RSS after compilation/first calls
        # (memory the allocators kept from earlier calls is already in the baseline)
        if reset and _reset_hwm():
            mid_kb = _rss_kb()
            for _ in range(msg.get("reps", 4)):
                runner.run()
            out["steady_peak_rss_delta_mb"] = (
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - mid_kb) / 1024
        return out


def main() -> None:
    framework = sys.argv[1]
    threads = int(sys.argv[2]) if len(sys.argv) > 2 and sys.argv[2] != "-" else None
    try:
        worker = Worker(framework, threads)
        _PROTO.write(json.dumps({"ok": True, "ready": framework}) + "\n")
    except Exception:  # noqa: BLE001
        _PROTO.write(json.dumps({"ok": False, "error": traceback.format_exc()}) + "\n")
        return
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["cmd"] == "quit":
            break
        try:
            reply = {"ok": True, **worker.handle(msg)}
        except Exception:  # noqa: BLE001
            reply = {"ok": False, "error": traceback.format_exc()}
        _PROTO.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
    main()
