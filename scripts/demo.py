#!/usr/bin/env python3
"""`make demo`: the whole LLMChain loop on one machine, with the real binaries and the real gRPC API.

Steps (each printed as it runs, with the elapsed time):
  1. build coordinator, cloud-trainer, edge-agent and llmchainctl (cargo, debug profile by default);
  2. start a Mosquitto broker and a coordinator (embedded store) on free loopback ports, in a
     fresh work directory (default llmchain-data/demo, git-ignored);
  3. import the SmolLM2-135M-Instruct GGUF as version 1 and generate task data: a training set,
     a fixed held-out set and a shifted held-out set (shared/TASK.md);
  4. evaluate v1 zero-shot on the shifted set, fine-tune v1 (the fixed set is evaluated before
     and after) and publish the delta as v2;
  5. start three agents on v1 (edge-1 reads a Mosquitto topic this script feeds with records,
     edge-2 and edge-3 use the built-in simulator), let them decide, then roll v2 out canary
     first (one agent, then all) with health gates;
  6. shift the record distribution, let v2 decide on it, stop the agents (summaries stay in
     their spools and reach the coordinator on restart) and run one `cloud-trainer incremental`
     round on the hard examples from the summaries; when it is better, roll the new version out;
  7. print a report and write it as report.md and report.json into the work directory.

With --serve everything keeps running (agents deciding, coordinator answering) until Ctrl-C.
Every child process runs in its own process group and is terminated (then killed) on exit,
error or Ctrl-C. Uses only the Python standard library.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m"
AGENT_LABEL = "demo=llmchain"


@dataclass(frozen=True)
class Settings:
    """Sizes and durations of one variant."""

    name: str
    train_n: int
    held_n: int
    mode: str
    epochs: int
    lr: str
    batch_size: int
    replay_n: int
    inc_epochs: int
    base_s: int  # agents deciding on v1 before the rollout
    soak: str  # rollout soak per step
    v2_s: int  # deciding on v2 (fixed distribution) after the rollout
    shift_s: int  # deciding on v2 under the shifted distribution
    v3_s: int  # deciding on v3 after its rollout
    mqtt_rate: float  # records/s the feeder publishes to edge-1
    window_s: int  # an agent's summary window: rollout gates and hard examples wait for one to close
    min_decisions: int  # decisions on the new version before the rollout gates are judged
    hard_summaries: int  # newest summaries the incremental round reads hard examples from


FULL = Settings(
    name="full",
    train_n=480,
    held_n=60,
    mode="last-layers:2",
    epochs=6,
    lr="5e-4",
    batch_size=8,
    replay_n=120,
    inc_epochs=3,
    base_s=20,
    soak="10s",
    v2_s=20,
    shift_s=45,
    v3_s=20,
    mqtt_rate=0.5,
    window_s=20,
    min_decisions=10,
    hard_summaries=25,
)
QUICK = Settings(
    name="quick",
    train_n=112,
    held_n=32,
    mode="last-layers:2",
    epochs=10,
    lr="5e-4",
    batch_size=8,
    replay_n=24,
    inc_epochs=3,
    base_s=4,
    soak="1s",
    v2_s=4,
    shift_s=10,
    v3_s=4,
    mqtt_rate=1.0,
    window_s=6,
    min_decisions=3,
    hard_summaries=12,
)

# --- output ----------------------------------------------------------------------------------

T0 = time.monotonic()
COLOR = sys.stdout.isatty() and os.environ.get("NO_COLOR") is None


def _c(code: str, s: str) -> str:
    return f"\033[{code}m{s}\033[0m" if COLOR else s


def clock() -> str:
    s = int(time.monotonic() - T0)
    return f"{s // 60:02d}:{s % 60:02d}"


def step(msg: str) -> None:
    print(f"{_c('2', clock())} {_c('1;36', '==>')} {_c('1', msg)}", flush=True)


def info(msg: str) -> None:
    print(f"{_c('2', clock())}     {msg}", flush=True)


def warn(msg: str) -> None:
    print(f"{_c('2', clock())}     {_c('33', 'warning:')} {msg}", flush=True)


class DemoError(Exception):
    """A step failed; the message says which and where its log is."""


# --- processes -------------------------------------------------------------------------------


class Procs:
    """Every child process, each in its own process group, stopped on exit."""

    def __init__(self) -> None:
        self.children: list[tuple[str, subprocess.Popen]] = []
        self.lock = threading.Lock()

    def spawn(self, name: str, argv: list[str], log: Path, env: dict | None = None, stdout=None) -> subprocess.Popen:
        log.parent.mkdir(parents=True, exist_ok=True)
        err = open(log, "ab")
        p = subprocess.Popen(
            argv,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=stdout if stdout is not None else err,
            stderr=err,
            env=env or child_env(),
            start_new_session=True,
        )
        err.close()
        with self.lock:
            self.children.append((name, p))
        return p

    def stop(self, p: subprocess.Popen, grace: float = 10.0) -> None:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
        with self.lock:
            self.children = [(n, c) for n, c in self.children if c is not p]

    def stop_all(self) -> None:
        with self.lock:
            children = list(reversed(self.children))
        for _, p in children:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        for _, p in children:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
        with self.lock:
            self.children.clear()


PROCS = Procs()


def child_env() -> dict:
    env = dict(os.environ)
    env.setdefault("RUST_LOG", "info")
    # The binaries read LLMCHAIN_* variables; the demo passes everything as flags.
    for k in list(env):
        if k.startswith("LLMCHAIN_") and k not in ("LLMCHAIN_FONT", "LLMCHAIN_CACHE"):
            del env[k]
    return env


def run(name: str, argv: list[str], log: Path, progress: bool = False) -> str:
    """Runs a command to completion, its stderr into `log`; returns its stdout."""
    out_path = log.with_suffix(".out")
    with open(out_path, "wb") as out:
        p = PROCS.spawn(name, argv, log, stdout=out)
        last_shown, last_line, t = time.monotonic(), "", time.monotonic()
        while p.poll() is None:
            time.sleep(0.5)
            if progress and time.monotonic() - last_shown >= 20:
                line = tail_line(log)
                if line and line != last_line:
                    info(f"{name}: {line}")
                    last_line = line
                else:
                    info(f"{name}: working ({int(time.monotonic() - t)} s)")
                last_shown = time.monotonic()
    with PROCS.lock:
        PROCS.children = [(n, c) for n, c in PROCS.children if c is not p]
    if p.returncode != 0:
        raise DemoError(f"{name} failed (exit {p.returncode}); see {log}:\n{tail(log, 15)}")
    return out_path.read_text()


def tail(path: Path, n: int) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def tail_line(path: Path) -> str:
    """The last log line, shortened, without ANSI colours and timestamps."""
    import re

    lines = [x for x in tail(path, 5).splitlines() if x.strip()]
    line = lines[-1].strip() if lines else ""
    line = re.sub(r"\x1b\[[0-9;]*m", "", line)
    line = re.sub(r"^\S+Z\s+", "", line)
    return line[:140]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check, timeout: float, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = check()
        if v:
            return v
        time.sleep(interval)
    raise DemoError(f"timed out after {timeout:.0f} s waiting for {what}")


# --- MQTT feeder: a minimal MQTT 3.1.1 publisher (QoS 0), standing in for a plant gateway -----


def _mqtt_str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("!H", len(b)) + b


def _mqtt_packet(kind: int, body: bytes) -> bytes:
    n, rem = len(body), bytearray()
    while True:
        byte, n = n % 128, n // 128
        rem.append(byte | (0x80 if n else 0))
        if not n:
            break
    return bytes([kind]) + bytes(rem) + body


class Feeder(threading.Thread):
    """Publishes task records to `plant/<device>/telemetry` at a fixed rate, from a labelled
    pool that can be switched (the shift); remembers each record's rule label by (device, ts)
    so the agent's decisions can be scored."""

    def __init__(self, port: int, rate: float):
        super().__init__(daemon=True)
        self.port, self.rate = port, rate
        self.pool: list[dict] = []
        self.labels: dict[tuple[str, str], str] = {}
        self.sent = 0
        self.stop_flag = threading.Event()
        self.lock = threading.Lock()
        self.error: str | None = None

    def set_pool(self, records: list[dict]) -> None:
        with self.lock:
            self.pool = records

    def run(self) -> None:
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
            connect = _mqtt_str("MQTT") + bytes([4, 0x02]) + struct.pack("!H", 0) + _mqtt_str("llmchain-demo-feeder")
            sock.sendall(_mqtt_packet(0x10, connect))
            ack = sock.recv(4)
            if len(ack) < 4 or ack[0] != 0x20 or ack[3] != 0:
                raise OSError(f"connection refused by the broker: {ack!r}")
            base = time.time()
            start, i = time.monotonic(), 0
            while not self.stop_flag.is_set():
                with self.lock:
                    pool = self.pool
                if pool:
                    rec = dict(pool[i % len(pool)])
                    label = rec.pop("label")
                    # A unique timestamp per message, so a decision names its record.
                    ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(base + i)) + "Z"
                    rec["ts"] = ts
                    with self.lock:
                        self.labels[(rec["device_id"], ts)] = label
                    topic = f"plant/{rec['device_id']}/telemetry"
                    sock.sendall(_mqtt_packet(0x30, _mqtt_str(topic) + json.dumps(rec).encode()))
                    i += 1
                    self.sent = i
                self.stop_flag.wait(max(0.0, start + i / self.rate - time.monotonic()) if pool else 0.2)
            sock.sendall(_mqtt_packet(0xE0, b""))
            sock.close()
        except OSError as e:
            self.error = str(e)


# --- the demo --------------------------------------------------------------------------------


@dataclass
class Ctx:
    args: argparse.Namespace
    s: Settings
    work: Path
    bins: Path
    insecure: dict[str, bool] = field(default_factory=dict)
    coord_url: str = ""
    dashboard_url: str | None = None
    agents: dict[str, subprocess.Popen] = field(default_factory=dict)
    feeder: Feeder | None = None
    mqtt_port: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    report: dict = field(default_factory=dict)

    def bin(self, name: str) -> str:
        return str(self.bins / name)

    def sec(self, name: str) -> list[str]:
        """`--insecure` when this binary (or subcommand) knows the flag."""
        return ["--insecure"] if self.insecure.get(name) else []

    def ctl(self, *argv: str, check: bool = True) -> dict | None:
        cmd = [self.bin("llmchainctl"), *self.sec("llmchainctl"), "--coordinator", self.coord_url, "-o", "json", *argv]
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=child_env(), timeout=60)
        if p.returncode != 0:
            if check:
                raise DemoError(f"llmchainctl {' '.join(argv)} failed: {p.stderr.strip()}")
            return None
        return json.loads(p.stdout) if p.stdout.strip() else {}

    def trainer(self, *argv: str) -> list[str]:
        return [self.bin("cloud-trainer"), *argv]


def has_flag(binary: str, sub: list[str], flag: str) -> bool:
    p = subprocess.run([binary, *sub, "--help"], capture_output=True, text=True, env=child_env())
    return flag in p.stdout


def build(ctx: Ctx) -> None:
    if ctx.args.no_build:
        step("using the binaries already built in " + str(ctx.bins))
    else:
        step(f"building the binaries ({ctx.args.profile} profile)")
        cmd = ["cargo", "build", "-p", "llmchain-coordinator", "-p", "llmchain-cloud-trainer", "-p",
               "llmchain-edge-agent", "-p", "llmchainctl", "--bins"]
        if ctx.args.profile == "release":
            cmd.append("--release")
        t = time.monotonic()
        p = subprocess.run(cmd, cwd=ROOT)
        if p.returncode != 0:
            raise DemoError("cargo build failed")
        ctx.timings["build_s"] = time.monotonic() - t
        info(f"built in {ctx.timings['build_s']:.0f} s")
    for b in ("coordinator", "cloud-trainer", "edge-agent", "llmchainctl"):
        if not (ctx.bins / b).is_file():
            raise DemoError(f"{ctx.bins / b} is missing; run without --no-build")
    # TLS is being added: plaintext on loopback may need an explicit --insecure per binary.
    ctx.insecure = {
        "coordinator": has_flag(ctx.bin("coordinator"), ["serve"], "--insecure"),
        "cloud-trainer": has_flag(ctx.bin("cloud-trainer"), ["train"], "--insecure"),
        "edge-agent": has_flag(ctx.bin("edge-agent"), ["run"], "--insecure"),
        "llmchainctl": has_flag(ctx.bin("llmchainctl"), [], "--insecure"),
    }


def start_services(ctx: Ctx) -> None:
    step(f"starting Mosquitto and the coordinator (work directory {ctx.work.relative_to(ROOT)})")
    mosq = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(mosq).is_file():
        raise DemoError("mosquitto is missing: run `make setup`")
    for _ in range(5):
        port = free_port()
        conf = ctx.work / "mosquitto.conf"
        conf.write_text(
            f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nlog_dest stderr\n"
            "log_type error\nlog_type warning\n"
        )
        p = PROCS.spawn("mosquitto", [mosq, "-c", str(conf)], ctx.work / "logs" / "mosquitto.log")
        try:
            wait_for("mosquitto", lambda: p.poll() is not None or _connects(port), 10, 0.1)
        except DemoError:
            pass
        if p.poll() is None and _connects(port):
            ctx.mqtt_port = port
            break
        PROCS.stop(p)
    else:
        raise DemoError("mosquitto did not start on a free port in 5 attempts")
    info(f"mosquitto on 127.0.0.1:{ctx.mqtt_port}")

    run("keygen", ctx.trainer("keygen", "--out", str(ctx.work / "trainer.key")), ctx.work / "logs" / "keygen.log")
    argv = [
        ctx.bin("coordinator"), "serve", *ctx.sec("coordinator"), "--listen", "127.0.0.1:0",
        "--store", f"embedded:{ctx.work / 'coordinator' / 'state.redb'}",
        "--blobs", str(ctx.work / "coordinator" / "blobs"),
        "--trainer-key", str(ctx.work / "trainer.key.pub"),
        "--heartbeat-interval-ms", "1000", "--lease-ttl-ms", "5000",
    ]
    if has_flag(ctx.bin("coordinator"), ["serve"], "--http-listen"):
        http_port = free_port()
        argv += ["--http-listen", f"127.0.0.1:{http_port}"]
        ctx.dashboard_url = f"http://127.0.0.1:{http_port}/"
    out = ctx.work / "logs" / "coordinator.out"
    with open(out, "wb") as f:
        p = PROCS.spawn("coordinator", argv, ctx.work / "logs" / "coordinator.log", stdout=f)

    def listening():
        if p.poll() is not None:
            raise DemoError(f"the coordinator exited; see {ctx.work / 'logs' / 'coordinator.log'}")
        for line in out.read_text().splitlines():
            if line.startswith("listening on "):
                return line.removeprefix("listening on ").strip()
        return None

    addr = wait_for("the coordinator to listen", listening, 60, 0.1)
    ctx.coord_url = f"http://{addr}"
    info(f"coordinator on {ctx.coord_url} (embedded store)")
    if ctx.dashboard_url:
        info(f"dashboard on {ctx.dashboard_url}")


def _connects(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def import_and_data(ctx: Ctx) -> None:
    s, w = ctx.s, ctx.work
    step("importing SmolLM2-135M-Instruct (GGUF) as version 1")
    t = time.monotonic()
    out = run("import", ctx.trainer("import", *ctx.sec("cloud-trainer"), "--gguf", ctx.args.gguf, "--key",
                                    str(w / "trainer.key"), "--coordinator", ctx.coord_url), w / "logs" / "import.log")
    ctx.timings["import_s"] = time.monotonic() - t
    imp = json.loads(out.strip().splitlines()[-1])
    ctx.report["import"] = imp
    info(f"v{imp.get('version')}: {human(imp.get('total_bytes', 0))} of bf16 tensors "
         f"({human(imp.get('uploaded_bytes', 0))} uploaded) in {ctx.timings['import_s']:.0f} s")

    step(f"generating task data: {s.train_n} training records, {s.held_n} fixed + {s.held_n} shifted held-out")
    d = w / "data"
    d.mkdir(exist_ok=True)
    sets = [
        ("train", ["--seed", "1", "--count", str(s.train_n)]),
        ("held", ["--seed", "2", "--count", str(s.held_n)]),
        ("held-shifted", ["--seed", "3", "--count", str(s.held_n), "--shift"]),
        ("stream", ["--seed", "4", "--count", "2000"]),
        ("stream-shifted", ["--seed", "5", "--count", "2000", "--shift"]),
        ("one", ["--seed", "6", "--count", "1"]),
    ]
    for name, argv in sets:
        run(f"data {name}", ctx.trainer("data", *argv, "--out", str(d / f"{name}.jsonl")), w / "logs" / f"data-{name}.log")
        info(f"{name}.jsonl: {tail(w / 'logs' / f'data-{name}.log', 1)}")


def finetune(ctx: Ctx) -> None:
    s, w, d = ctx.s, ctx.work, ctx.work / "data"
    common = ["--key", str(w / "trainer.key"), "--coordinator", ctx.coord_url,
              "--blob-cache", str(w / "coordinator" / "blobs"), "--checkpoint-every", "0", *ctx.sec("cloud-trainer")]

    step(f"zero-shot: v1 on the shifted held-out set ({s.held_n} records)")
    # `train` evaluates its starting model on --eval; with no step taken and no baseline it
    # evaluates v1 once and publishes nothing (a run stopped at step 0).
    t = time.monotonic()
    run("zero-shot", ctx.trainer("train", "--mode", "last-layers:1", "--from-version", "1", "--data",
                                 str(d / "one.jsonl"), "--eval", str(d / "held-shifted.jsonl"), "--skip-baseline",
                                 "--stop-after", "0", "--no-publish", "--out", str(w / "runs" / "zero-shot-shifted"),
                                 *common), w / "logs" / "zero-shot.log", progress=True)
    zs = eval_of(w / "runs" / "zero-shot-shifted" / "report.json", "after")
    ctx.report.setdefault("accuracy", {})["zero_shot_shifted"] = zs["accuracy"]
    ctx.timings["zero_shot_shifted_s"] = time.monotonic() - t
    info(f"v1 zero-shot on shifted: {pct(zs['accuracy'])} ({ctx.timings['zero_shot_shifted_s']:.0f} s)")

    step(f"fine-tuning v1 with {s.mode} on {s.train_n} records, {s.epochs} epochs, lr {s.lr}; "
         "zero-shot and fine-tuned evaluated on the fixed held-out set")
    t = time.monotonic()
    out = run("train", ctx.trainer("train", "--mode", s.mode, "--from-version", "1", "--data", str(d / "train.jsonl"),
                                   "--eval", str(d / "held.jsonl"), "--epochs", str(s.epochs), "--lr", s.lr,
                                   "--batch-size", str(s.batch_size), "--out", str(w / "runs" / "finetune"), *common),
              w / "logs" / "train.log", progress=True)
    ctx.timings["finetune_s"] = time.monotonic() - t
    rep = json.loads((w / "runs" / "finetune" / "report.json").read_text())
    ev = dict((n, r) for n, r in rep["eval"])
    acc = ctx.report.setdefault("accuracy", {})
    acc["zero_shot_fixed"] = ev["before"]["accuracy"]
    acc["finetuned_fixed"] = ev["after"]["accuracy"]
    pub = rep.get("published") or json.loads(out.strip().splitlines()[-1])
    ctx.report["finetune"] = {
        "mode": s.mode, "epochs": s.epochs, "lr": s.lr, "train_examples": rep["train_examples"],
        "train_seconds": rep["train"]["train_seconds"], "cache_seconds": rep["train"]["cache_seconds"],
        "run_seconds": ctx.timings["finetune_s"], "version": pub["version"],
        "delta_bytes": pub["delta_bytes"], "full_bytes": pub.get("full_bytes", pub.get("total_bytes")),
        "macro_f1": ev["after"].get("macro_f1"), "ece": ev["after"].get("ece"),
    }
    info(f"fixed held-out accuracy {pct(acc['zero_shot_fixed'])} -> {pct(acc['finetuned_fixed'])}; "
         f"training {rep['train']['train_seconds']:.0f} s (+{rep['train']['cache_seconds']:.0f} s activation cache), "
         f"run {ctx.timings['finetune_s']:.0f} s")
    f = ctx.report["finetune"]
    info(f"published v{f['version']}: delta {human(f['delta_bytes'])} of {human(f['full_bytes'])} "
         f"({100 * f['delta_bytes'] / max(1, f['full_bytes']):.1f}%)")


def eval_of(report: Path, name: str) -> dict:
    rep = json.loads(report.read_text())
    for n, r in rep["eval"]:
        if n == name:
            return r
    raise DemoError(f"{report} has no '{name}' evaluation")


def load_pool(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def start_agent(ctx: Ctx, agent_id: str, source: str) -> None:
    home = ctx.work / "agents" / agent_id
    argv = [
        ctx.bin("edge-agent"), "run", *ctx.sec("edge-agent"), "--agent-id", agent_id,
        "--label", AGENT_LABEL, "--label", f"source={'mqtt' if source.startswith('mqtt') else 'sim'}",
        "--coordinator", ctx.coord_url, "--cache-dir", str(home / "cache"), "--state-dir", str(home / "state"),
        "--trainer-key", str(ctx.work / "trainer.key.pub"), "--source", source,
        "--executor", f"jsonl:{home / 'decisions.jsonl'}", "--window-s", str(ctx.s.window_s), "--hard-examples", "4",
        "--report-interval-ms", "1000", "--max-backoff-ms", "2000", "--device", "cpu",
        # Small batches: on two shared cores a batch of 16 takes tens of seconds.
        "--batch-size", "4", "--batch-wait-ms", "20",
    ]
    env = child_env()
    # Three agents share the machine: one libtorch thread each instead of one per core each.
    env["OMP_NUM_THREADS"] = "1"
    ctx.agents[agent_id] = PROCS.spawn(agent_id, argv, ctx.work / "logs" / f"{agent_id}.log", env=env)


def agent_sources(ctx: Ctx, shifted: bool) -> dict[str, str]:
    tail_opt = ",shifted" if shifted else ""
    return {
        "edge-1": f"mqtt://127.0.0.1:{ctx.mqtt_port}/plant/+/telemetry",
        # rate=0: as fast as the agent decides, so decisions/s is the agent's throughput.
        "edge-2": f"sim:seed={12 if shifted else 2},rate=0{tail_opt}",
        "edge-3": f"sim:seed={13 if shifted else 3},rate=0{tail_opt}",
    }


def stop_agents(ctx: Ctx, ids: list[str] | None = None) -> None:
    """SIGTERM to each (they finish the batch in hand, close the window and spool it), then wait."""
    ids = list(ctx.agents) if ids is None else ids
    threads = [threading.Thread(target=PROCS.stop, args=(ctx.agents.pop(a), 30)) for a in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def fleet(ctx: Ctx) -> dict:
    return ctx.ctl("fleet", "--selector", AGENT_LABEL) or {}


def running_versions(ctx: Ctx) -> dict[str, int]:
    out = {}
    for a in fleet(ctx).get("agents", []):
        st = a.get("status") or {}
        out[a["agent_id"]] = (st.get("running") or {}).get("version", 0) if a.get("online") else -1
    return out


def wait_all_running(ctx: Ctx, version: int, timeout: float) -> None:
    def ok():
        for agent_id, p in ctx.agents.items():
            if p.poll() is not None:
                raise DemoError(f"{agent_id} exited; see {ctx.work / 'logs' / (agent_id + '.log')}")
        v = running_versions(ctx)
        return all(v.get(a) == version for a in ctx.agents)

    wait_for(f"every agent to run v{version}", ok, timeout, 1.0)


def decisions_made(ctx: Ctx) -> dict[str, int]:
    """Decisions each agent has acted on so far: lines its JSONL executor appended."""
    out = {}
    for agent_id in ("edge-1", "edge-2", "edge-3"):
        path = ctx.work / "agents" / agent_id / "decisions.jsonl"
        try:
            with open(path, "rb") as f:
                out[agent_id] = sum(1 for _ in f)
        except OSError:
            out[agent_id] = 0
    return out


def observe(ctx: Ctx, phase: str, seconds: float) -> None:
    """Lets the agents decide for `seconds`; decisions/s from what their executors wrote."""
    t0, c0 = time.monotonic(), decisions_made(ctx)
    t_end = t0 + seconds
    while time.monotonic() < t_end:
        for agent_id, p in ctx.agents.items():
            if p.poll() is not None:
                raise DemoError(f"{agent_id} exited; see {ctx.work / 'logs' / (agent_id + '.log')}")
        time.sleep(min(10.0, max(0.0, t_end - time.monotonic())))
        c, dt = decisions_made(ctx), time.monotonic() - t0
        running = running_versions(ctx)
        info(f"{phase}: " + ", ".join(f"{a} v{running.get(a, 0)} {c[a] - c0[a]} decisions" for a in sorted(c))
             + f" in {dt:.0f} s")
    c, dt = decisions_made(ctx), time.monotonic() - t0
    per = {a: (c[a] - c0[a]) / dt for a in sorted(c)}
    ctx.report.setdefault("decisions_per_second", {})[phase] = {
        "fleet_mean": sum(per.values()), "per_agent_mean": per, "seconds": dt,
    }


def rollout(ctx: Ctx, version: int) -> dict:
    step(f"rolling v{version} out: canary (1 agent), then 100%; soak {ctx.s.soak} per step under health gates "
         "(no load failure, bad records < 5%)")
    t = time.monotonic()
    # No latency or drift gate: the simulated agents run flat out on shared cores (queueing, not
    # the model, sets their latency), and fine-tuning is meant to change the decision mix.
    r = ctx.ctl("rollout", "create", "--version", f"{MODEL}:{version}", "--selector", AGENT_LABEL,
                "--steps", "1,100%", "--soak", ctx.s.soak, "--max-bad-record-rate", "0.05",
                "--max-load-failures", "0", "--min-decisions", str(ctx.s.min_decisions))
    rid = r["id"]
    info(f"rollout {rid} created")
    seen: set[str] = set()
    final = None
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        for agent_id, p in ctx.agents.items():
            if p.poll() is not None:
                raise DemoError(f"{agent_id} exited; see {ctx.work / 'logs' / (agent_id + '.log')}")
        g = ctx.ctl("rollout", "get", rid)
        for st in g.get("steps", []):
            key = f"{st['index']}:{st['state']}"
            if key not in seen and st["state"] not in ("STEP_STATE_PENDING",):
                seen.add(key)
                gates = ", ".join(f"{x['name']} {x['value']:.3g}/{x['threshold']:.3g}"
                                  for x in st.get("gates", []) if x.get("judged"))
                info(f"step {st['index'] + 1}: {st['state'].removeprefix('STEP_STATE_').lower()} "
                     f"{','.join(st.get('agent_ids', []))}" + (f" [{gates}]" if gates else ""))
        if g["state"] not in ("ROLLOUT_STATE_RUNNING", "ROLLOUT_STATE_PAUSED"):
            final = g
            break
        time.sleep(1)
    if final is None:
        raise DemoError(f"rollout {rid} did not finish in 10 minutes")
    state = final["state"].removeprefix("ROLLOUT_STATE_").lower()
    secs = time.monotonic() - t
    info(f"rollout {rid}: {state} in {secs:.0f} s")
    if state != "succeeded":
        for e in final.get("history", [])[-3:]:
            info(f"  {e['message']}")
    result = {"id": rid, "state": state, "seconds": secs}
    ctx.report.setdefault("rollouts", {})[f"v{version}"] = result
    if state != "succeeded":
        warn(f"the rollout of v{version} ended {state}")
    return result


def live_accuracy(ctx: Ctx) -> None:
    """Scores edge-1's decisions against the rule labels of the records the feeder sent."""
    path = ctx.work / "agents" / "edge-1" / "decisions.jsonl"
    if not path.is_file() or ctx.feeder is None:
        return
    with ctx.feeder.lock:
        labels = dict(ctx.feeder.labels)
    by_model: dict[str, list[int]] = {}
    for line in path.read_text().splitlines():
        try:
            d = json.loads(line)
        except json.JSONDecodeError:
            continue
        want = labels.get((d.get("device_id"), d.get("ts")))
        if want is None:
            continue
        c = by_model.setdefault(d.get("model", "?"), [0, 0])
        c[0] += d.get("label") == want
        c[1] += 1
    ctx.report["mqtt_live_accuracy"] = {m: {"correct": c, "decisions": n, "accuracy": c / n}
                                        for m, (c, n) in sorted(by_model.items())}


def agents_phase(ctx: Ctx) -> None:
    s, d = ctx.s, ctx.work / "data"
    step("starting three agents on v1: edge-1 reads Mosquitto (fed by this script), edge-2/3 the simulator")
    ctx.ctl("assign", "--version", f"{MODEL}:1", "--selector", AGENT_LABEL)
    ctx.feeder = Feeder(ctx.mqtt_port, s.mqtt_rate)
    ctx.feeder.set_pool(load_pool(d / "stream.jsonl"))
    ctx.feeder.start()
    for agent_id, source in agent_sources(ctx, shifted=False).items():
        start_agent(ctx, agent_id, source)
    t = time.monotonic()
    wait_all_running(ctx, 1, 300)
    ctx.timings["agents_v1_ready_s"] = time.monotonic() - t
    info(f"all three run v1 after {ctx.timings['agents_v1_ready_s']:.0f} s (full download + load + self-test)")
    observe(ctx, "v1 (zero-shot), fixed distribution", s.base_s)

    v2 = ctx.report["finetune"]["version"]
    if rollout(ctx, v2)["state"] == "succeeded":
        wait_all_running(ctx, v2, 120)
    else:
        v2 = 1
    observe(ctx, f"v{v2}, fixed distribution", s.v2_s)

    step("shifting the record distribution: new phrasings and label mix on every agent's stream")
    ctx.feeder.set_pool(load_pool(d / "stream-shifted.jsonl"))
    stop_agents(ctx, ["edge-2", "edge-3"])
    for agent_id, source in agent_sources(ctx, shifted=True).items():
        if agent_id != "edge-1":
            start_agent(ctx, agent_id, source)
    wait_all_running(ctx, v2, 180)
    ctx.report["running_after_rollout"] = v2
    observe(ctx, f"v{v2}, shifted distribution", s.shift_s)
    step("stopping the agents while the trainer uses the CPU (their summaries are delivered or spooled)")
    stop_agents(ctx)


def incremental(ctx: Ctx) -> int | None:
    s, w, d = ctx.s, ctx.work, ctx.work / "data"
    v2 = ctx.report["finetune"]["version"]
    hard = 0
    summ = ctx.ctl("summaries", "--model", MODEL, "--limit", str(s.hard_summaries)) or {}
    for x in summ.get("summaries", []):
        hard += len(x.get("hard_examples", []))
    step(f"incremental round from v{v2}: {hard} hard examples in the newest {s.hard_summaries} summaries + "
         f"{s.replay_n} replayed "
         f"records, {s.mode}, {s.inc_epochs} epochs; evaluated on the fixed and the shifted held-out sets")
    t = time.monotonic()
    run("incremental", ctx.trainer(
        "incremental", "--mode", s.mode, "--from-version", str(v2), "--replay", str(d / "train.jsonl"),
        "--replay-count", str(s.replay_n), "--old-eval", str(d / "held.jsonl"),
        "--shifted-eval", str(d / "held-shifted.jsonl"), "--summaries", str(s.hard_summaries), "--epochs", str(s.inc_epochs),
        "--lr", s.lr, "--batch-size", str(s.batch_size), "--key", str(w / "trainer.key"),
        "--coordinator", ctx.coord_url, "--blob-cache", str(w / "coordinator" / "blobs"),
        "--checkpoint-every", "0", "--out", str(w / "runs" / "incremental"), *ctx.sec("cloud-trainer"),
    ), w / "logs" / "incremental.log", progress=True)
    ctx.timings["incremental_s"] = time.monotonic() - t
    rep = json.loads((w / "runs" / "incremental" / "report.json").read_text())
    ev = dict((n, r) for n, r in rep["eval"])
    acc = ctx.report["accuracy"]
    acc["finetuned_fixed_recheck"] = ev["old_before"]["accuracy"]
    acc["finetuned_shifted"] = ev["shifted_before"]["accuracy"]
    acc["incremental_fixed"] = ev["old_after"]["accuracy"]
    acc["incremental_shifted"] = ev["shifted_after"]["accuracy"]
    log = (w / "logs" / "incremental.log").read_text(errors="replace")
    import re

    m = re.search(r"hard examples: (\d+) pulled, (\d+) labelled", log)
    pub = rep.get("published")
    ctx.report["incremental"] = {
        "hard_pulled": int(m.group(1)) if m else None, "hard_labelled": int(m.group(2)) if m else None,
        "train_examples": rep["train_examples"], "train_seconds": rep["train"]["train_seconds"],
        "cache_seconds": rep["train"]["cache_seconds"], "run_seconds": ctx.timings["incremental_s"],
        "published": pub is not None,
        "version": pub["version"] if pub else None,
        "delta_bytes": pub["delta_bytes"] if pub else None,
        "full_bytes": pub.get("full_bytes", pub.get("total_bytes")) if pub else None,
    }
    inc = ctx.report["incremental"]
    info(f"hard examples: {inc['hard_pulled']} pulled, {inc['hard_labelled']} labelled by the rules; "
         f"{inc['train_examples']} training examples with replay")
    info(f"fixed {pct(acc['finetuned_fixed_recheck'])} -> {pct(acc['incremental_fixed'])}, "
         f"shifted {pct(acc['finetuned_shifted'])} -> {pct(acc['incremental_shifted'])} "
         f"({ctx.timings['incremental_s']:.0f} s)")
    if pub:
        info(f"published v{pub['version']}: delta {human(inc['delta_bytes'])} of {human(inc['full_bytes'])}")
        return pub["version"]
    warn("the round was not better than the running version on the mean of both held-out sets; not published")
    return None


def final_phase(ctx: Ctx, v3: int | None) -> None:
    v2 = ctx.report.get("running_after_rollout", ctx.report["finetune"]["version"])
    step("restarting the agents (shifted streams); spooled summaries are delivered on reconnect")
    for agent_id, source in agent_sources(ctx, shifted=True).items():
        start_agent(ctx, agent_id, source)
    wait_all_running(ctx, v2, 180)
    if v3 is not None:
        if rollout(ctx, v3)["state"] == "succeeded":
            wait_all_running(ctx, v3, 120)
            observe(ctx, f"v{v3}, shifted distribution", ctx.s.v3_s)
    # Let the last windows close and reach the coordinator (reports go out every second).
    time.sleep(ctx.s.window_s + 2)


def collect(ctx: Ctx) -> None:
    f = fleet(ctx)
    stats = f.get("stats", {})
    ctx.report["bytes"] = {
        "raw_bytes": stats.get("raw_bytes", 0), "summary_bytes": stats.get("summary_bytes", 0),
        "bytes_saved": stats.get("bytes_saved", 0), "summaries": stats.get("summaries", 0),
        "per_version": [
            {"version": (v.get("model") or {}).get("version"), "records": v["records"], "raw_bytes": v["raw_bytes"],
             "summary_bytes": v["summary_bytes"], "decisions": {c["label"]: c["count"] for c in v["decisions"]}}
            for v in stats.get("versions", [])
        ],
    }
    vers = ctx.ctl("versions", MODEL) or {}
    ctx.report["versions"] = [
        {k: v.get(k) for k in ("version", "parent_version", "mode", "total_bytes", "delta_bytes")}
        for v in vers.get("versions", [])
    ]
    summ = ctx.ctl("summaries", "--model", MODEL, "--limit", "1000") or {}
    p99 = [x["latency_p99_ms"] for x in summ.get("summaries", []) if x.get("records")]
    ctx.report["latency_p99_ms_median_window"] = sorted(p99)[len(p99) // 2] if p99 else None
    live_accuracy(ctx)


def human(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def write_report(ctx: Ctx) -> str:
    r, s = ctx.report, ctx.s
    acc = r.get("accuracy", {})
    ft, inc = r.get("finetune", {}), r.get("incremental", {})
    b = r.get("bytes", {})
    lines = [
        f"# LLMChain demo report ({s.name} variant{', smaller data, fewer steps and held-out sets' if s.name == 'quick' else ''})",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPU cores, "
        f"binaries: {ctx.args.profile} profile. Demo time (without build): {r.get('demo_seconds', 0):.0f} s.",
        "",
        f"## Accuracy (held-out: {s.held_n} fixed, {s.held_n} shifted records)",
        "",
        "| model | fixed | shifted |",
        "|---|---|---|",
        f"| v1 zero-shot (SmolLM2-135M-Instruct) | {pct(acc.get('zero_shot_fixed'))} | {pct(acc.get('zero_shot_shifted'))} |",
        f"| v{ft.get('version', '?')} fine-tuned ({ft.get('mode')}, {ft.get('train_examples')} records, "
        f"{ft.get('epochs')} epochs) | {pct(acc.get('finetuned_fixed'))} | {pct(acc.get('finetuned_shifted'))} |",
        f"| {'v' + str(inc['version']) if inc.get('version') else 'candidate (not published)'} incremental round "
        f"({inc.get('hard_labelled')} hard examples + replay) | {pct(acc.get('incremental_fixed'))} | "
        f"{pct(acc.get('incremental_shifted'))} |",
        "",
        "## Bytes",
        "",
        "| version | parent | mode | full bytes | delta bytes | delta share |",
        "|---|---|---|---|---|---|",
    ]
    for v in r.get("versions", []):
        tb, db = v.get("total_bytes") or 0, v.get("delta_bytes") or 0
        lines.append(f"| v{v['version']} | {v.get('parent_version') or '-'} | {v.get('mode') or 'import'} | "
                     f"{human(tb)} | {human(db)} | {100 * db / max(1, tb):.1f}% |")
    raw, summ = b.get("raw_bytes", 0), b.get("summary_bytes", 0)
    lines += [
        "",
        f"Records seen by the agents: {human(raw)} raw (stayed on the nodes) vs {human(summ)} of summaries "
        f"sent ({b.get('summaries', 0)} summaries, {raw / max(1, summ):.1f}x smaller). A summary holds counts, "
        "a confidence histogram, latency percentiles and 4 hard examples (~375 bytes of text each) per "
        f"{s.window_s}-s window, a fixed cost per window: the ratio grows with the records a window holds, and this machine "
        "decides only a few records per second.",
        "",
        "## Decisions",
        "",
        "| phase | fleet decisions/s | per agent |",
        "|---|---|---|",
    ]
    for phase, v in r.get("decisions_per_second", {}).items():
        per = ", ".join(f"{a} {x:.1f}" for a, x in v["per_agent_mean"].items())
        lines.append(f"| {phase} | {v['fleet_mean']:.1f} | {per} |")
    lines += ["", "edge-2/3 decide as fast as they can (simulator at rate 0); edge-1 gets "
              f"{s.mqtt_rate:g} records/s over MQTT. All three share the machine's CPU cores "
              "(one libtorch thread each), so the fleet figure is this machine's capacity."]
    if r.get("latency_p99_ms_median_window") is not None:
        lines.append(f"Median of the per-window p99 decision latency: {r['latency_p99_ms_median_window']:.0f} ms "
                     "(mostly queueing: the simulators produce records faster than the agents decide).")
    live = r.get("mqtt_live_accuracy", {})
    if live:
        lines += ["", "Live accuracy of edge-1 on the MQTT stream (decisions vs the rule labels of the records sent):", ""]
        for m, v in live.items():
            lines.append(f"- {m}: {pct(v['accuracy'])} of {v['decisions']} decisions")
    per_version = b.get("per_version", [])
    if per_version:
        lines += ["", "| version | records | decisions per label |", "|---|---|---|"]
        for v in per_version:
            dec = ", ".join(f"{k} {n}" for k, n in v["decisions"].items())
            lines.append(f"| v{v['version']} | {v['records']} | {dec} |")
    lines += ["", "## Rollouts", ""]
    for v, ro in r.get("rollouts", {}).items():
        lines.append(f"- {v}: {ro['state']} in {ro['seconds']:.0f} s (canary 1 agent, then 100%)")
    lines += ["", "## Timings (seconds)", ""]
    for k, v in ctx.timings.items():
        lines.append(f"- {k}: {v:.0f}")
    if ctx.dashboard_url:
        lines += ["", f"Dashboard: {ctx.dashboard_url}"]
    lines += ["", "Training reports and plots: runs/finetune/ and runs/incremental/ "
              "(report.txt, loss.png, confusion.png); logs: logs/.", ""]
    md = "\n".join(lines)
    (ctx.work / "report.md").write_text(md)
    (ctx.work / "report.json").write_text(json.dumps({"variant": s.name, "settings": s.__dict__, **r,
                                                       "timings": ctx.timings,
                                                       "dashboard_url": ctx.dashboard_url}, indent=2))
    return md


def main() -> int:
    ap = argparse.ArgumentParser(
        description="The whole LLMChain loop on one machine: coordinator, trainer, three agents, "
        "fine-tune, canary rollout, incremental round, report.",
    )
    ap.add_argument("--quick", action="store_true", help="the short variant: smaller data and held-out sets, fewer steps")
    ap.add_argument("--serve", action="store_true", help="keep the coordinator and agents running after the report until Ctrl-C")
    ap.add_argument("--work-dir", default="llmchain-data/demo", help="work directory, emptied first (default: %(default)s)")
    ap.add_argument("--profile", choices=["debug", "release"], default="debug", help="cargo profile of the binaries (default: %(default)s)")
    ap.add_argument("--no-build", action="store_true", help="use the binaries already built")
    ap.add_argument("--gguf", default=os.environ.get("LLMCHAIN_SMOLLM2_GGUF", str(ROOT / ".llmchain" / "smollm2.gguf")),
                    help="the SmolLM2-135M-Instruct GGUF (default: .llmchain/smollm2.gguf)")
    ap.add_argument("--mode", help="override the training mode (last-layers:N, lora:R)")
    ap.add_argument("--epochs", type=int, help="override the fine-tuning epochs")
    ap.add_argument("--lr", help="override the peak learning rate")
    ap.add_argument("--train-n", type=int, help="override the training set size")
    args = ap.parse_args()

    s = QUICK if args.quick else FULL
    over = {k: v for k, v in (("mode", args.mode), ("epochs", args.epochs), ("lr", args.lr), ("train_n", args.train_n)) if v}
    if over:
        s = Settings(**{**s.__dict__, **over})
    work = (ROOT / args.work_dir).resolve()
    bins = ROOT / "target" / args.profile
    ctx = Ctx(args=args, s=s, work=work, bins=bins)

    def on_signal(signum, _frame):
        raise KeyboardInterrupt

    # Also SIGINT explicitly: a shell starting the demo in the background ignores it by default.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    try:
        build(ctx)
        global T0
        T0 = time.monotonic()
        # Only a directory this script made (it holds the marker) or an empty one is emptied.
        if work.exists() and any(work.iterdir()):
            if not (work / ".llmchain-demo").is_file():
                raise DemoError(f"{work} exists and was not made by the demo; choose another --work-dir")
            shutil.rmtree(work)
        (work / "logs").mkdir(parents=True)
        (work / ".llmchain-demo").write_text("made by scripts/demo.py; emptied by its next run\n")
        print(f"LLMChain demo, {s.name} variant: {s.train_n} training records, {s.mode}, {s.held_n}+{s.held_n} held-out",
              flush=True)
        start_services(ctx)
        import_and_data(ctx)
        finetune(ctx)
        agents_phase(ctx)
        v3 = incremental(ctx)
        final_phase(ctx, v3)
        collect(ctx)
        ctx.report["demo_seconds"] = time.monotonic() - T0
        step("report")
        md = write_report(ctx)
        print()
        print(md)
        print(f"written to {work / 'report.md'} and {work / 'report.json'}")
        if ctx.dashboard_url:
            print(f"dashboard: {ctx.dashboard_url}")
        if ctx.feeder and ctx.feeder.error:
            warn(f"the MQTT feeder stopped: {ctx.feeder.error}")
        if args.serve:
            print(f"serving: coordinator {ctx.coord_url}, agents deciding; Ctrl-C stops everything", flush=True)
            while True:
                for agent_id, p in ctx.agents.items():
                    if p.poll() is not None:
                        raise DemoError(f"{agent_id} exited; see {work / 'logs' / (agent_id + '.log')}")
                time.sleep(2)
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted; stopping every process", file=sys.stderr)
        return 130
    except DemoError as e:
        print(f"\n{_c('1;31', 'demo failed:')} {e}", file=sys.stderr)
        return 1
    finally:
        if ctx.feeder:
            ctx.feeder.stop_flag.set()
        PROCS.stop_all()


if __name__ == "__main__":
    sys.exit(main())
