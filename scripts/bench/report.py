#!/usr/bin/env python3
"""`make bench`: runs the benchmarks and writes bench/REPORT.md, each figure next to its peer.

    python scripts/bench/report.py [--only model,transfer,agent,train,fleet] [--out bench/REPORT.md]

`BENCH=model,transfer` (environment) selects a subset like `--only`. Each benchmark is run as its
own make target would run it, its output is shown as it goes and kept under bench/logs/, and its
figures are read from the machine-readable lines it prints (model.py, agent.py and train.py print
JSON; the fleet bench writes JSON with `--json`; the transfer bench's MB/s lines are parsed).
Peers are measured in the same run by the same benchmark; the ratio is ours / peer (for sizes,
latencies and memory, lower is better: the column says which way is better). Environment knobs
(BENCH_BLOB_MIB, FLEET_AGENTS, FLEET_SECONDS, …) pass through to the benchmarks and are recorded
in the report. Benchmarks not selected are listed as not run; a benchmark that fails is reported
as failed with its exit code, and the others still run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTHON = os.path.join(ROOT, ".llmchain", "venv", "bin", "python")
ALL = ["model", "transfer", "agent", "train", "fleet"]
KNOBS = ("FLEET_COORDINATOR", "BENCH_BLOB_MIB", "BENCH_ROUNDS", "BENCH_CHUNK_KIB", "FLEET_AGENTS", "FLEET_SECONDS", "FLEET_RAMP_PER_S",
         "FLEET_HEARTBEAT_S", "FLEET_SUMMARY_S", "FLEET_AGENTS_PER_CONN", "FLEET_AGENTS_PER_WORKER")


def run(name: str, cmd: list[str], logs: str) -> tuple[int, str, float]:
    """Runs `cmd` from the repo root, echoing and capturing stdout + stderr."""
    print(f"bench: {name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    t = time.monotonic()
    lines = []
    with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace") as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stderr.write(line)
            lines.append(line)
        code = proc.wait()
    out = "".join(lines)
    with open(os.path.join(logs, f"{name}.log"), "w") as f:
        f.write(out)
    return code, out, time.monotonic() - t


def json_lines(out: str) -> list[dict]:
    found = []
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                v = json.loads(line)
            except ValueError:
                continue
            if isinstance(v, dict):
                found.append(v)
    return found


def row(figure: str, ours, peer_name: str, peer, better: str = "higher", unit: str = "") -> dict:
    ratio = ours / peer if isinstance(ours, (int, float)) and isinstance(peer, (int, float)) and peer else None
    return {"figure": figure, "ours": ours, "peer_name": peer_name, "peer": peer, "ratio": ratio,
            "better": better, "unit": unit}


# ---- each benchmark: command and figures -------------------------------------------------------

def bench_model(logs: str) -> dict:
    code, out, secs = run("model", [PYTHON, "scripts/bench/model.py"], logs)
    res = next((j for j in json_lines(out) if "ours" in j), None)
    rows = []
    if res and res.get("ours"):
        ours = res["ours"]
        for peer in ("hf", "llama.cpp"):
            theirs = res.get(peer)
            if not theirs:
                continue
            for key, label in (("prefill_512_tok_s", "prefill 1×512 tokens/s"),
                               ("prefill_8x128_tok_s", "prefill 8×128 tokens/s"),
                               ("decode_tok_s", "decode tokens/s (batch 1)")):
                rows.append(row(label, ours.get(key), peer, theirs.get(key)))
            rows.append(row("peak RSS", ours.get("peak_rss_mib"), peer, theirs.get("peak_rss_mib"), "lower", "MiB"))
    return {"code": code, "seconds": secs, "rows": rows, "raw": res}


def bench_transfer(logs: str) -> dict:
    code, out, secs = run("transfer", ["cargo", "bench", "-p", "llmchain-coordinator", "--bench", "transfer"], logs)
    grpc = re.search(r"grpc FetchBlob, verified \(cached\):\s+([\d.]+) MB/s", out)
    first = re.search(r"grpc FetchBlob, first pass \(hashing while streaming\):\s+([\d.]+) MB/s", out)
    tcp = re.search(r"raw tcp copy:\s+([\d.]+) MB/s", out)
    blob = re.search(r"blob: (\d+) MiB", out)
    rows = []
    if grpc and tcp:
        size = f" ({blob.group(1)} MiB blob)" if blob else ""
        rows.append(row(f"FetchBlob on loopback{size}, verified blob", float(grpc.group(1)), "raw TCP copy",
                        float(tcp.group(1)), unit="MB/s"))
        if first:
            rows.append(row("… first pass (the coordinator hashes while streaming)", float(first.group(1)),
                            "raw TCP copy", float(tcp.group(1)), unit="MB/s"))
    return {"code": code, "seconds": secs, "rows": rows,
            "raw": {"grpc_mb_s": grpc and float(grpc.group(1)), "first_pass_mb_s": first and float(first.group(1)),
                    "tcp_mb_s": tcp and float(tcp.group(1))}}


def bench_agent(logs: str) -> dict:
    code, out, secs = run("agent", [PYTHON, "scripts/bench/agent.py"], logs)
    found = json_lines(out)
    ours = next((j for j in found if "bandwidth" in j and "batches" in j), None)
    theirs = next((j for j in found if "batches" in j and "bandwidth" not in j), None)
    rows = []
    if ours:
        for b, o in sorted(ours["batches"].items(), key=lambda kv: int(kv[0])):
            t = (theirs or {}).get("batches", {}).get(b, {})
            rows.append(row(f"decisions/s, batch {b}", o.get("decisions_per_s"), "llama.cpp", t.get("decisions_per_s")))
            rows.append(row(f"decision p99 latency, batch {b}", o.get("p99_ms"), "llama.cpp", t.get("p99_ms"), "lower", "ms"))
        bw = ours.get("bandwidth") or {}
        if bw:
            rows.append(row(f"bytes sent for {bw.get('records')} records (summaries)", bw.get("summary_bytes"),
                            "raw record bytes", bw.get("raw_bytes"), "lower", "bytes"))
    return {"code": code, "seconds": secs, "rows": rows, "raw": {"ours": ours, "llama.cpp": theirs}}


def bench_train(logs: str) -> dict:
    code, out, secs = run("train", [PYTHON, "scripts/bench/train.py"], logs)
    res = next((j for j in json_lines(out) if "pytorch_tokens_per_s" in j), None)
    rows = []
    if res:
        pt = res["pytorch_tokens_per_s"]
        rows.append(row("last-layers:2 training tokens/s, activation cache", res.get("ours_cache_tokens_per_s"),
                        "HF transformers + PyTorch", pt))
        rows.append(row("… cache, trunk pass included", res.get("ours_cache_amortised_tokens_per_s"),
                        "HF transformers + PyTorch", pt))
        rows.append(row("… no activation cache", res.get("ours_nocache_tokens_per_s"), "HF transformers + PyTorch", pt))
    return {"code": code, "seconds": secs, "rows": rows, "raw": res}


def bench_fleet(logs: str) -> dict:
    code, secs = 0, 0.0
    if "FLEET_COORDINATOR" not in os.environ:  # the bench's default coordinator: a release build
        code, _, secs = run("fleet-build", ["cargo", "build", "--release", "-p", "llmchain-coordinator",
                                            "--bin", "coordinator"], logs)
    res = None
    if code == 0:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "fleet.json")
            code, out, more = run("fleet", ["cargo", "bench", "-p", "llmchain-tests", "--bench", "fleet",
                                            "--profile", "dev", "--", "--json", path], logs)
            secs += more
            if os.path.exists(path):
                with open(path) as f:
                    res = json.load(f)
    rows = []
    if res:
        target = res["agents_target"]
        rows.append(row("agents held connected at the end", res["agents_connected_end"], "target", target))
        rows.append(row("agents the coordinator lists online", res["agents_online_end"], "target", target))
        rows.append(row("heartbeat send → handled p50", res["heartbeat_p50_ms"], "target p99", 100.0, "lower", "ms"))
        rows.append(row("heartbeat send → handled p99", res["heartbeat_p99_ms"], "target p99", 100.0, "lower", "ms"))
        if res.get("heartbeat_steady_p99_ms") is not None:
            rows.append(row("heartbeat p99, sent after the ramp (all agents held)", res["heartbeat_steady_p99_ms"],
                            "target p99", 100.0, "lower", "ms"))
        rows.append(row("ReportSummaries RTT p99", res["summary_p99_ms"], "target p99", 100.0, "lower", "ms"))
        rows.append(row("summaries acknowledged", res["summaries_acked"], "summaries sent", res["summaries_sent"]))
        rows.append(row("coordinator RSS (peak)", res["coordinator_rss_mib_peak"], "target", 1024.0, "lower", "MiB"))
        rows.append(row("coordinator CPU (steady state, % of one core)", res["coordinator_cpu_pct"],
                        f"cores on the machine ×100", 100.0 * res.get("machine_cpus", 0) or None, "lower", "%"))
        if res.get("client_cpu_pct") is not None:
            rows.append(row("simulated agents' CPU (same machine, % of one core)", res["client_cpu_pct"],
                            "coordinator CPU", res["coordinator_cpu_pct"], "lower", "%"))
        if res.get("connections") is not None:
            rows.append(row("HTTP/2 connections (agents share them: fd limit)", res["connections"],
                            "agents", target, "lower"))
    return {"code": code, "seconds": secs, "rows": rows, "raw": res}


BENCHES = {"model": bench_model, "transfer": bench_transfer, "agent": bench_agent, "train": bench_train,
           "fleet": bench_fleet}
TITLES = {"model": "Model speed (`make bench-model`)", "transfer": "Transfer (`make bench-transfer`)",
          "agent": "Agent decisions (`make bench-agent`)", "train": "Training (`make bench-train`)",
          "fleet": "Fleet scale (`make bench-fleet`)"}
NOTES = {
    "fleet": "The peer of a fleet figure is the issue's target, not another system: no other fleet runs in the "
             "same process. Heartbeat latency is send → handled (the coordinator sends nothing back on a "
             "heartbeat; the bench matches each agent's `last_heartbeat` stamp from `ListAgents` with the send "
             "time), see tests/benches/fleet.rs. Simulated agents share HTTP/2 connections (100 per connection "
             "by default, each agent on its own session stream with its own id) because one process may open at "
             "most 20,000 files here; the raw JSON has the machine's load average at start and end (2 shared "
             "cores).",
    "agent": "Bytes row: summary bytes next to the raw record bytes they stand for (their ratio is the bandwidth "
             "saving; lower is better).",
}


# ---- the report --------------------------------------------------------------------------------

def machine() -> str:
    model, cpus = "unknown CPU", 0
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown CPU":
                    model = line.split(":", 1)[1].strip()
                if line.startswith("processor"):
                    cpus += 1
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kib = int(next(l for l in f if l.startswith("MemTotal")).split()[1])
            mem = f", {kib / 1024 / 1024:.0f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    return f"{model}, {cpus} logical CPUs{mem}"


def fmt(v, unit: str = "") -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        s = f"{v:,.2f}" if abs(v) < 100 else f"{v:,.0f}"
    else:
        s = f"{v:,}"
    return f"{s} {unit}".strip()


def render(results: dict, selected: list[str], started: dt.datetime) -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = ""
    out = ["# Benchmark report", ""]
    out.append(f"- date: {started.strftime('%Y-%m-%d %H:%M UTC')}")
    out.append(f"- machine: {machine()}")
    if commit:
        out.append(f"- commit: {commit} (plus uncommitted changes in the work tree, if any)")
    knobs = [f"{k}={os.environ[k]}" for k in KNOBS if k in os.environ]
    out.append(f"- settings: {', '.join(knobs) if knobs else 'defaults'}")
    not_run = [n for n in ALL if n not in selected]
    out.append(f"- run in this invocation: {', '.join(selected) or 'none'}")
    out.append(f"- **not run in this invocation: {', '.join(not_run) if not_run else 'none'}**")
    out.append("")
    out.append("Ratio = ours / peer, both measured in the same run; the *better* column says whether a "
               "higher or a lower figure is better. Figures depend on machine load (2 shared cores here).")
    out.append("")
    for name in ALL:
        out.append(f"## {TITLES[name]}")
        out.append("")
        if name not in results:
            out.append("**Not run in this invocation.**")
            out.append("")
            continue
        r = results[name]
        status = "ok" if r["code"] == 0 else f"**failed (exit {r['code']})**, see bench/logs/{name}.log"
        out.append(f"Run took {r['seconds']:.0f} s; status {status}.")
        out.append("")
        if r["rows"]:
            out.append("| figure | ours | peer | peer figure | ratio | better |")
            out.append("|---|---:|---|---:|---:|---|")
            for x in r["rows"]:
                ratio = f"{x['ratio']:.2f}×" if x["ratio"] is not None else "—"
                out.append(f"| {x['figure']} | {fmt(x['ours'], x['unit'])} | {x['peer_name']} | "
                           f"{fmt(x['peer'], x['unit'])} | {ratio} | {x['better']} |")
        else:
            out.append("No figures could be read from its output.")
        if name in NOTES:
            out.append("")
            out.append(NOTES[name])
        out.append("")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=os.environ.get("BENCH", ""), help="comma-separated subset of " + ",".join(ALL))
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "REPORT.md"))
    args = ap.parse_args()
    selected = [s.strip() for s in args.only.split(",") if s.strip()] or ALL
    unknown = [s for s in selected if s not in ALL]
    if unknown:
        sys.exit(f"bench: unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(ALL)}")
    selected = [n for n in ALL if n in selected]
    started = dt.datetime.now(dt.timezone.utc)
    logs = os.path.join(os.path.dirname(os.path.abspath(args.out)), "logs")
    os.makedirs(logs, exist_ok=True)
    results = {}
    for name in selected:
        results[name] = BENCHES[name](logs)
    with open(os.path.join(logs, "results.json"), "w") as f:
        json.dump({"date": started.isoformat(), "machine": machine(), "results": results}, f, indent=2, default=str)
    report = render(results, selected, started)
    with open(args.out, "w") as f:
        f.write(report + "\n")
    print(report)
    print(f"bench: wrote {os.path.relpath(args.out, ROOT)} (logs in {os.path.relpath(logs, ROOT)}/)", file=sys.stderr)
    failed = [n for n in selected if results[n]["code"] != 0]
    if failed:
        sys.exit(f"bench: failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
