"""Side-by-side speed of metafn, JAX and PyTorch on the DESIGN.md section 6 workloads.

    python -m bench.speed                                  # everything available
    python -m bench.speed --workloads W1,W2 --repeats 20   # a subset
    python -m bench.speed --quick                          # a short smoke run

One process per framework (``bench.worker``); the data and initial parameters are generated once
with numpy and loaded by every process. Before any timing, every runner's loss and gradient are
checked against metafn's eager result (float tolerance, see ``bench.peers.workloads.compare``);
a mismatch aborts the run (``--check-only`` stops after the checks). Timings: after warm-up,
``--repeats`` timed calls per runner and workload, taken in rounds of ``--batch`` calls, round
robin over the runners (the order rotates each round), so slow drifts of a shared machine hit
every framework alike. Reports median / min / max ms, peak memory (fresh process per framework
and workload), each runner's time over metafn's (variant ``metafn``: the step as metafn runs it, see
``bench.peers.variants``), the
GEMM rate of each framework and, where a FLOP count exists, achieved GFLOP/s and its fraction of
that framework's GEMM rate (wall clock and per CPU-second). Writes ``bench/results/speed.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.peers.variants import HEADLINE, reference_variant
from bench.peers.workloads import WORKLOADS, compare, flops, make_data

BASELINE = "metafn"  # ratio reference: the step as metafn runs it (bench.peers.variants)

REPO = Path(__file__).resolve().parents[1]
FRAMEWORKS = ("metafn", "jax", "torch")
IMPORTS = {"metafn": "metafn", "jax": "jax", "torch": "torch"}


class WorkerError(RuntimeError):
    pass


class Proc:
    """A running ``bench.worker`` process."""

    def __init__(self, framework: str, env: dict[str, str], threads: int | None,
                 cpus: set[int] | None = None):
        self.framework = framework
        self.p = subprocess.Popen(
            [sys.executable, "-m", "bench.worker", framework, str(threads) if threads else "-"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO, env=env, text=True,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        )
        ready = self._read()
        if not ready.get("ok"):
            raise WorkerError(f"{framework} worker failed to start:\n{ready.get('error')}")

    def _read(self) -> dict:
        line = self.p.stdout.readline()
        if not line:
            raise WorkerError(f"{self.framework} worker exited (code {self.p.poll()})")
        return json.loads(line)

    def call(self, **msg) -> dict:
        self.p.stdin.write(json.dumps(msg) + "\n")
        self.p.stdin.flush()
        reply = self._read()
        if not reply.get("ok"):
            raise WorkerError(f"{self.framework} {msg.get('cmd')} failed:\n{reply.get('error')}")
        return reply

    def close(self) -> None:
        try:
            self.p.stdin.write('{"cmd": "quit"}\n')
            self.p.stdin.flush()
            self.p.wait(timeout=30)
        except Exception:  # noqa: BLE001
            self.p.kill()


def pinned(args: argparse.Namespace) -> set[int] | None:
    """The CPUs ``--pin`` confines every worker process to (None: no pinning)."""
    return set(args.pin) if args.pin else None


def worker_env(framework: str, threads: int | None, extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if threads:
        for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[k] = str(threads)
        if framework == "jax" and threads == 1:
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                                " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    if framework == "metafn":
        env.update(extra)
    return env


def importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def summarize(ts: list[float]) -> dict:
    return {"median_ms": statistics.median(ts), "min_ms": min(ts), "max_ms": max(ts),
            "mean_ms": statistics.fmean(ts), "n": len(ts),
            "iqr_ms": (float(np.percentile(ts, 75) - np.percentile(ts, 25)))}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.speed", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="all",
                    help="comma-separated ids (W1,W2,...) or 'all' (default: all available)")
    ap.add_argument("--frameworks", default=",".join(FRAMEWORKS),
                    help="comma-separated subset of metafn,jax,torch (default: all three)")
    ap.add_argument("--repeats", type=int, default=30,
                    help="timed calls per runner and workload (default 30)")
    ap.add_argument("--batch", type=int, default=5,
                    help="timed calls per round-robin turn (default 5)")
    ap.add_argument("--slow-repeats", type=int, default=8,
                    help="--repeats for the slow workloads W4-W7 (~1 s or more per call; default 8)")
    ap.add_argument("--slow-batch", type=int, default=2,
                    help="--batch for the slow workloads (default 2)")
    ap.add_argument("--warmup", type=int, default=3,
                    help="untimed calls after the first (compiling) call (default 3; slow "
                         "workloads: 1)")
    ap.add_argument("--threads", type=int, default=None,
                    help="set OPENBLAS/OMP/MKL_NUM_THREADS and torch threads for every framework "
                         "(JAX: only 1 is supported, through XLA_FLAGS); default: library defaults")
    ap.add_argument("--pin", default=None, metavar="CPUS",
                    help="run every framework process on these CPUs only (comma-separated ids, "
                         "e.g. 0): with --threads 1 and --pin 0 no library can use a second core "
                         "(XLA's CPU runtime starts threads of its own despite XLA_FLAGS), and "
                         "another job may use the other core")
    ap.add_argument("--metafn-env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment for the metafn process only, e.g. "
                         "OPENBLAS_NUM_THREADS=1 (repeatable)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    ap.add_argument("--check-only", action="store_true",
                    help="build and run the correctness checks, then stop (no timing, no memory)")
    ap.add_argument("--pause-ms", type=float, default=20.0,
                    help="sleep between round-robin turns so idle BLAS/OpenMP threads park")
    ap.add_argument("--quick", action="store_true", help="short run: --repeats 6 --batch 2 --warmup 1")
    ap.add_argument("--out", default=None,
                    help="results file (default bench/results/speed.json; with --check-only the "
                         "checks are written only when --out is given, so a check never "
                         "replaces the timed results)")
    args = ap.parse_args(argv)
    if args.pin is not None:
        try:
            args.pin = sorted({int(c) for c in args.pin.split(",")})
        except ValueError:
            ap.error(f"--pin: expected comma-separated CPU ids such as 0 or 0,1, got {args.pin!r}")
        available = os.sched_getaffinity(0)
        if not set(args.pin) <= available:
            ap.error(f"--pin: CPUs {args.pin} are not all available (this process may use "
                     f"{sorted(available)})")
    if args.out is None and not args.check_only:
        args.out = str(REPO / "bench" / "results" / "speed.json")
    if args.quick:
        args.repeats, args.batch, args.warmup = 6, 2, 1
        args.slow_repeats, args.slow_batch = 2, 1
    return args


def markdown_table(report: dict) -> str:
    """The README's table of a results file: per workload the metafn headline and its other
    setting, each peer, the peer / metafn ratios and the roofline (ms are medians)."""
    head = ("| workload | metafn (ms) | metafn, other setting (ms) | JAX (ms) | torch.func (ms) "
            "| JAX / metafn | torch / metafn | metafn % of GEMM (per CPU-s) | peak MB metafn / JAX / torch |")
    rows = [head, "|" + " --- |" * (head.count("|") - 1)]
    for wid, e in report["workloads"].items():
        r = e["runners"]
        if "median_ms" not in r.get("metafn", {}):
            continue
        other = next((v for v in ("metafn-eager", "metafn-compiled") if v in r), None)

        def ms(v: str | None) -> str:
            if v not in r or "median_ms" not in r[v]:
                return "-"
            x = r[v]["median_ms"]
            return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"

        def ratio(v: str) -> str:
            x = r.get(v, {}).get("ratio_vs_metafn")
            return "-" if x is None else (f"**{x:.2f}**" if x < 1 else f"{x:.2f}")

        def mb(v: str) -> str:
            m = r.get(v, {}).get("memory", {}).get("peak_rss_delta_mb")
            return "-" if m is None else f"{m:.0f}"

        roof = (f"{100 * r['metafn']['gemm_fraction_cpu']:.1f}%"
                if "gemm_fraction_cpu" in r["metafn"] else "-")
        setting = other.split("-")[1] if other else ""
        rows.append(f"| {wid} | {ms('metafn')} | {ms(other)} {setting} | {ms('jax')} | {ms('torch')} "
                    f"| {ratio('jax')} | {ratio('torch')} | {roof} | {mb('metafn')} / {mb('jax')} / {mb('torch')} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--table"]:
        if len(argv) != 2:
            sys.exit("--table: expected one results file, e.g. --table bench/results/speed.json")
        print(markdown_table(json.loads(Path(argv[1]).read_text())))
        return 0
    args = parse_args(argv)
    extra = dict(kv.split("=", 1) for kv in args.metafn_env)
    frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    if "metafn" not in frameworks:
        frameworks.insert(0, "metafn")  # the reference for checks and ratios
    for f in list(frameworks):
        if f not in FRAMEWORKS:
            sys.exit(f"unknown framework {f!r}; choose from {FRAMEWORKS}")
        if not importable(IMPORTS[f]):
            print(f"!! {f}: not installed, skipped", file=sys.stderr)
            frameworks.remove(f)
    wanted = list(WORKLOADS) if args.workloads == "all" else [w.strip() for w in args.workloads.split(",")]
    workloads = []
    skipped = {}
    for wid in wanted:
        if wid not in WORKLOADS:
            sys.exit(f"unknown workload {wid!r}; choose from {list(WORKLOADS)}")
        ok, why = WORKLOADS[wid].available()
        if ok:
            workloads.append(WORKLOADS[wid])
        else:
            skipped[wid] = why
            print(f"-- {wid}: skipped, {why}", file=sys.stderr)
    if not workloads:
        sys.exit("no workload to run")

    tmp = tempfile.TemporaryDirectory(prefix="metafn-bench-")
    data_paths = {}
    for w in workloads:
        data_paths[w.id] = os.path.join(tmp.name, f"{w.id}.npz")
        np.savez(data_paths[w.id], **make_data(w))

    load_start = os.getloadavg()
    t_start = time.time()
    procs: dict[str, Proc] = {}
    report: dict = {
        "meta": {
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": "python -m bench.speed " + " ".join(sys.argv[1:] if argv is None else argv),
            "machine": {"cpu": cpu_model(), "cpus": os.cpu_count(), "platform": platform.platform()},
            "loadavg_start": load_start,
            "options": vars(args),
            "timing": "perf_counter around one call that blocks on all outputs; per runner and "
                      "workload: build, 1 compiling call, --warmup calls, then --repeats timed "
                      "calls in round-robin turns of --batch (each turn preceded by one untimed "
                      "call); gc disabled while timing",
            "ratio": f"runner median ms / {BASELINE} median ms: > 1 means metafn is faster; "
                     f"{BASELINE} is the step compiled or not by model as metafn runs it: {HEADLINE}",
            "check_reference": "the metafn call uncompiled (metafn-eager, or metafn where that "
                               "is the eager call)",
        },
        "frameworks": {}, "workloads": {}, "skipped": skipped,
    }
    try:
        for f in frameworks:
            print(f".. starting {f} worker", file=sys.stderr)
            procs[f] = Proc(f, worker_env(f, args.threads, extra), args.threads, pinned(args))
            info = procs[f].call(cmd="info")
            info.pop("ok")
            info["gemm_2048"] = {k: v for k, v in procs[f].call(cmd="gemm", n=2048, reps=5).items()
                                 if k != "ok"}
            report["frameworks"][f] = info
        runners: dict[str, list[tuple[str, str]]] = {}
        for w in workloads:
            entry = report["workloads"][w.id] = {"spec": w.as_dict(), "runners": {}, "check": {}}
            fl = flops(w)
            if fl:
                entry["flops"] = fl
            runners[w.id] = []
            for f in frameworks:
                print(f".. {w.id}: building {f}", file=sys.stderr)
                b = procs[f].call(cmd="build", workload=w.id, data=data_paths[w.id])
                for v in b["variants"]:
                    runners[w.id].append((f, v))
                    entry["runners"][v] = {"framework": f, "first_call_ms": b["first_call_ms"][v]}
                    if b.get("notes", {}).get(v):
                        entry["runners"][v]["note"] = b["notes"][v]
                        print(f"   note {w.id} {v}: {b['notes'][v]}", file=sys.stderr)
            if "jax" in procs and fl:
                xf = procs["jax"].call(cmd="cost_flops", workload=w.id, data=data_paths[w.id])["flops"]
                if xf:
                    entry["flops"]["xla_cost_analysis_flops"] = xf
            # correctness: every runner against metafn's eager result
            ref_path = os.path.join(tmp.name, f"{w.id}-ref.npz")
            reference = reference_variant([v for f, v in runners[w.id] if f == "metafn"])
            entry["check_reference"] = reference
            procs["metafn"].call(cmd="check", workload=w.id, variant=reference, out=ref_path)
            ref = np.load(ref_path)
            ref_loss = float(ref["loss"])
            ref_leaves = [ref[f"g{i}"] for i in range(len(ref.files) - 1)]
            outputs: dict[str, tuple[float, list]] = {}
            for f, v in runners[w.id]:
                path = os.path.join(tmp.name, f"{w.id}-{v}.npz")
                procs[f].call(cmd="check", workload=w.id, variant=v, out=path)
                got = np.load(path)
                got_leaves = [got[f"g{i}"] for i in range(len(got.files) - 1)]
                ok, detail = compare(ref_loss, ref_leaves, float(got["loss"]), got_leaves,
                                     w.grad_rel_tol)
                entry["check"][v] = {"ok": ok, **detail}
                outputs[v] = (float(got["loss"]), got_leaves)
                status = "ok" if ok else "MISMATCH"
                if ok and not detail["strict_ok"]:
                    status = f"ok within the workload's bound {w.grad_rel_tol:g} (not the strict test)"
                print(f"   check {w.id} {v:16s} {status}: loss rel err {detail.get('loss_rel_err', 0):.1e}, "
                      f"grad rel err {detail.get('grad_rel_err', 0):.1e}", file=sys.stderr)
                if not ok:
                    raise SystemExit(
                        f"CORRECTNESS FAILURE: {w.id} {v} disagrees with {reference}: {detail}")
            if "jax" in outputs and "torch" in outputs:  # peer against peer, for context
                _, d = compare(*outputs["jax"], *outputs["torch"])
                entry["check"]["torch_vs_jax"] = d
                print(f"   check {w.id} torch vs jax: grad rel err {d['grad_rel_err']:.1e}",
                      file=sys.stderr)
            if args.check_only:
                continue
            for f, v in runners[w.id]:
                procs[f].call(cmd="time", workload=w.id, variant=v, n=0,
                              warm=min(args.warmup, 1) if w.slow else args.warmup)
        if args.check_only:
            report["meta"]["loadavg_end"] = os.getloadavg()
            if args.out is None:
                print("\nchecks passed")
                return 0
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=1, default=str) + "\n")
            print(f"\nchecks passed; wrote {out}")
            return 0

        # timing: round robin over runners, rotating the order each round
        times: dict[tuple[str, str], list[float]] = {(w.id, v): [] for w in workloads
                                                     for _, v in runners[w.id]}
        cpu_times: dict[tuple[str, str], list[float]] = {k: [] for k in times}
        def plan(w):  # (repeats, batch) of a workload
            return (args.slow_repeats, args.slow_batch) if w.slow else (args.repeats, args.batch)

        rounds = max(max(1, -(-rep // b)) for rep, b in map(plan, workloads))
        print(f".. timing: {rounds} rounds", file=sys.stderr)
        for r in range(rounds):
            for w in workloads:
                rep, b = plan(w)
                n = min(b, rep - r * b)
                if n <= 0:
                    continue
                rs = runners[w.id]
                for f, v in rs[r % len(rs):] + rs[:r % len(rs)]:
                    time.sleep(args.pause_ms / 1e3)
                    got = procs[f].call(cmd="time", workload=w.id, variant=v, n=n,
                                        warm=0 if w.slow else 1)
                    times[(w.id, v)] += got["ms"]
                    cpu_times[(w.id, v)] += got["cpu_ms"]
            print(f"   round {r + 1}/{rounds}", file=sys.stderr)
        for f in frameworks:  # GEMM again at the end: the roofline uses the best rate seen
            g_end = {k: v for k, v in procs[f].call(cmd="gemm", n=2048, reps=5).items() if k != "ok"}
            g = report["frameworks"][f]["gemm_2048"]
            g["end"] = g_end
            g["gflops_peak"] = max(g["gflops_best"], g_end["gflops_best"])
            g["gflops_cpu_peak"] = max(g["gflops_cpu_best"], g_end["gflops_cpu_best"])
    finally:
        for p in procs.values():
            p.close()

    # peak memory: a fresh process per framework and workload
    if not args.no_memory:
        for w in workloads:
            for f in frameworks:
                print(f".. memory {w.id} {f}", file=sys.stderr)
                for fw, v in runners[w.id]:
                    if fw != f:
                        continue
                    p = Proc(f, worker_env(f, args.threads, extra), args.threads, pinned(args))
                    try:
                        m = p.call(cmd="memory", workload=w.id, data=data_paths[w.id], variant=v,
                                   reps=2 if w.slow else 4)
                    finally:
                        p.close()
                    m.pop("ok")
                    report["workloads"][w.id]["runners"][v]["memory"] = m

    for w in workloads:
        entry = report["workloads"][w.id]
        base = statistics.median(times[(w.id, BASELINE)])
        for f, v in runners[w.id]:
            s = summarize(times[(w.id, v)])
            s["times_ms"] = [round(t, 4) for t in times[(w.id, v)]]
            s["cpu_median_ms"] = statistics.median(cpu_times[(w.id, v)])
            s["cpu_min_ms"] = min(cpu_times[(w.id, v)])
            s["cpu_ms"] = [round(t, 4) for t in cpu_times[(w.id, v)]]
            s["ratio_vs_metafn"] = s["median_ms"] / base
            if "flops" in entry:
                gemm = report["frameworks"][f]["gemm_2048"]
                g = entry["flops"]["flops"] / (s["median_ms"] / 1e3) / 1e9
                s["gflops"] = g
                s["gemm_fraction"] = g / gemm["gflops_peak"]
                # the same per CPU-second (all threads): robust to other load for 1-thread runs
                s["gflops_cpu"] = entry["flops"]["flops"] / (s["cpu_median_ms"] / 1e3) / 1e9
                s["gemm_fraction_cpu"] = s["gflops_cpu"] / gemm["gflops_cpu_peak"]
            entry["runners"][v].update(s)
    report["meta"]["loadavg_end"] = os.getloadavg()
    report["meta"]["wall_s"] = time.time() - t_start

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print_table(report)
    print(f"\nwrote {out}")
    return 0


def print_table(report: dict) -> None:
    m = report["meta"]
    print(f"\nmachine: {m['machine']['cpu']}, {m['machine']['cpus']} cpus; load average "
          f"{m['loadavg_start'][0]:.2f} at start, {m['loadavg_end'][0]:.2f} at end")
    print("\nGEMM 2048x2048 float32 (5 calls at the start and 5 at the end of the run):")
    for f, info in report["frameworks"].items():
        g = info["gemm_2048"]
        thr = {k: v for k, v in info.get("threads", {}).items()
               if v is not None and k != "openblas_config"}
        extra = f", BLAS {os.path.basename(info['blas'])}" if info.get("blas") else ""
        print(f"  {f:7s} median {g['gflops_median']:6.1f} / {g['end']['gflops_median']:6.1f} GFLOP/s, "
              f"peak {g['gflops_peak']:6.1f} (per CPU-second {g['gflops_cpu_peak']:6.1f}){extra}; "
              f"threads {thr}")
    hdr = (f"\n{'wl':3s} {'runner':16s} {'median ms':>10s} {'min':>8s} {'max':>8s} {'cpu ms':>8s} "
           f"{'peak MB':>8s} {'x metafn':>8s} {'GFLOP/s':>8s} {'%GEMM':>6s} {'%GEMMcpu':>8s}")
    print(hdr)
    print("-" * (len(hdr) - 1))
    for wid, e in report["workloads"].items():
        for v, r in e["runners"].items():
            mb = r.get("memory", {}).get("peak_rss_delta_mb")
            mb_s = f"{mb:8.1f}" if mb is not None else f"{'-':>8s}"
            gf = (f"{r['gflops']:8.2f} {100 * r['gemm_fraction']:5.1f}% "
                  f"{100 * r['gemm_fraction_cpu']:7.1f}%" if "gflops" in r else "")
            print(f"{wid:3s} {v:16s} {r['median_ms']:10.2f} {r['min_ms']:8.2f} {r['max_ms']:8.2f} "
                  f"{r['cpu_median_ms']:8.2f} {mb_s} {r['ratio_vs_metafn']:8.2f} {gf}")
        if "flops" in e:
            x = e["flops"].get("xla_cost_analysis_flops")
            xs = f" (XLA cost analysis: {x / 1e6:.1f} MFLOP)" if x else ""
            print(f"    {wid}: {e['flops']['flops'] / 1e6:.1f} MFLOP per step (analytic count){xs}")
    print("\nmedian/min/max: wall-clock ms per step; cpu ms: median process CPU time per step (all "
          "threads; robust to other load for 1 thread, includes spin-waiting for several). x metafn "
          "= median / metafn median (metafn: the step as metafn runs it, mx.compile for MLP and BERT, "
          "uncompiled for conv4 as its configs train; metafn-eager / metafn-compiled: the other "
          "setting): > 1 means metafn is faster. GFLOP/s from the median and the FLOP count; "
          "%GEMM = that over the framework's peak 2048^3 GEMM rate; %GEMMcpu = "
          "the same with CPU time for both (per CPU-second of all threads: the roofline that load "
          "from other processes does not distort when a run uses one BLAS thread). peak MB: peak "
          "RSS (getrusage) of build + 4 calls (W4-W7: 2) in a fresh process minus RSS before build (JAX: "
          "includes XLA compilation); MLX's own array peak (mx.get_peak_memory) is in the JSON.")
    for wid, why in report.get("skipped", {}).items():
        print(f"skipped {wid}: {why}")


if __name__ == "__main__":
    sys.exit(main())
