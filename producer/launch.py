"""Bring a fleet up and down.

- :class:`FleetSpec` + :func:`supervisord_config`: the supervisord configuration of a fleet: the broker,
  one program per GPU (``CUDA_VISIBLE_DEVICES`` pinned, ``numprocs`` instances, like Triton model
  instances) or a CPU program with the numpy backend, and the node's GPU exporter (``python -m metrics``);
  every program serves Prometheus metrics on a port of its own (:func:`metrics_ports`).
- ``trackfleet up`` / ``status`` / ``down`` (this module's :func:`run_up`, :func:`run_status`,
  :func:`run_down`; the subcommand modules :mod:`producer.up` etc. are thin wrappers).
- :class:`LocalFleet`: broker and workers as plain subprocesses, for ``trackfleet demo``, tests and
  benchmarks (no supervisord needed).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_RUN_DIR = Path(".trackfleet")
DEFAULT_FRONTEND = "tcp://127.0.0.1:5555"
DEFAULT_BACKEND = "tcp://127.0.0.1:5556"
#: First Prometheus port of a node: broker +0, GPU exporter +1, workers from +10 (see :func:`metrics_ports`).
DEFAULT_METRICS_PORT = 9500


def bundled_data_dir() -> Path:
    """The bundled events (``data/generic-mu20``) next to the package, else in the current directory."""
    here = Path(__file__).resolve().parent.parent / "data" / "generic-mu20"
    return here if here.is_dir() else Path("data/generic-mu20").resolve()


def connect_endpoint(bind_endpoint: str) -> str:
    """The endpoint a local peer connects to for a bound endpoint (wildcards become loopback)."""
    for wildcard in ("tcp://*:", "tcp://0.0.0.0:"):
        if bind_endpoint.startswith(wildcard):
            return "tcp://127.0.0.1:" + bind_endpoint[len(wildcard) :]
    return bind_endpoint


def parse_gpus(text: str | None) -> tuple[int, ...]:
    """``"0,1"`` -> (0, 1); empty / None / "none" -> ().

    Raises:
        ConfigError: not a comma-separated list of non-negative integers.
    """
    if not text or text.strip().lower() in ("none", "cpu"):
        return ()
    try:
        gpus = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"--gpus must look like 0,1,2 (got {text!r})") from None
    if any(g < 0 for g in gpus) or len(set(gpus)) != len(gpus):
        raise ConfigError(f"--gpus must list distinct non-negative ids (got {text!r})")
    return gpus


# --- supervisord ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FleetSpec:
    """What ``trackfleet up`` starts.

    Attributes:
        run_dir: holds supervisord.conf, its socket, pid file, logs and the broker's endpoints file.
        gpus: GPU ids; one supervisord program per GPU with ``instances_per_gpu`` cupy workers.
        instances_per_gpu: worker processes per GPU [processes].
        cpu_workers: numpy worker processes (used when no GPU is given) [processes].
        frontend / backend: the broker's bind endpoints.
        connect: workers connect here instead of the local broker's backend (multi-node: workers only).
        run_broker: start a broker (False on worker-only nodes).
        detector: detector directory for the workers.
        python: interpreter that runs broker and workers.
        broker_args / worker_args: extra command-line arguments.
        curve_dir: CURVE keys (broker.key, broker.key_secret, worker.key_secret, authorized/).
        metrics_port: first Prometheus port of the node (0: no metrics and no exporter); see
            :func:`metrics_ports`.
        mps: run the GPU workers under the CUDA Multi-Process Service (default False): an ``mps``
            program (``nvidia-cuda-mps-control -f``, pipes and logs in ``run_dir``) starts first and
            the kernels of a GPU's workers then run side by side instead of time-slicing the GPU
            (x1.7 events/s at mu=200 on an H200, bench/RESULTS.md). Under MPS the workers select
            their GPU with ``--device`` (its position in ``gpus``), not CUDA_VISIBLE_DEVICES.
    """

    run_dir: Path = DEFAULT_RUN_DIR
    gpus: tuple[int, ...] = ()
    instances_per_gpu: int = 4
    cpu_workers: int = 0
    frontend: str = DEFAULT_FRONTEND
    backend: str = DEFAULT_BACKEND
    connect: str | None = None
    run_broker: bool = True
    detector: Path = field(default_factory=bundled_data_dir)
    python: str = sys.executable
    broker_args: tuple[str, ...] = ()
    worker_args: tuple[str, ...] = ()
    curve_dir: Path | None = None
    metrics_port: int = DEFAULT_METRICS_PORT
    mps: bool = False

    def __post_init__(self) -> None:
        if self.mps and not self.gpus:
            raise ConfigError("--mps needs --gpus: MPS serves GPU workers")
        if self.instances_per_gpu < 1 or self.cpu_workers < 0:
            raise ConfigError("instances_per_gpu must be >= 1 and cpu_workers >= 0")
        if not 0 <= self.metrics_port <= 65535 - 10 - self.n_workers:
            raise ConfigError(
                f"metrics_port must be 0 (off) or a port leaving room for the workers, got {self.metrics_port}"
            )
        if not self.run_broker and self.connect is None:
            raise ConfigError("a worker-only node needs --connect (the broker's worker endpoint)")

    @property
    def conf_path(self) -> Path:
        return self.run_dir / "supervisord.conf"

    @property
    def endpoints_file(self) -> Path:
        return self.run_dir / "endpoints.json"

    @property
    def worker_connect(self) -> str:
        return self.connect or connect_endpoint(self.backend)

    @property
    def n_workers(self) -> int:
        return len(self.gpus) * self.instances_per_gpu + self.cpu_workers


def _q(args: Sequence[str]) -> str:
    # supervisord expands %(name)s in values: escape literal percent signs
    return " ".join(shlex.quote(str(a)) for a in args).replace("%", "%%")


def metrics_ports(spec: FleetSpec) -> dict[str, int]:
    """Prometheus ports of a node's programs: ``broker``, ``exporter`` and, per worker program, its first
    port (instance N of that program serves first + N, through supervisord's ``%(process_num)d``).

    Layout from ``spec.metrics_port`` = B: broker B, GPU exporter B+1, ``worker-gpuG`` (the k-th GPU of
    ``spec.gpus``) B+10+k*instances_per_gpu, ``worker-cpu`` after the GPU programs. {} when metrics are off.
    """
    base = spec.metrics_port
    if base <= 0:
        return {}
    ports = {"exporter": base + 1}
    if spec.run_broker:
        ports["broker"] = base
    for k, gpu in enumerate(spec.gpus):
        ports[f"worker-gpu{gpu}"] = base + 10 + k * spec.instances_per_gpu
    if spec.cpu_workers:
        ports["worker-cpu"] = base + 10 + len(spec.gpus) * spec.instances_per_gpu
    return ports


def metrics_targets(spec: FleetSpec, host: str = "127.0.0.1") -> list[dict[str, Any]]:
    """Prometheus ``file_sd_configs`` entries for every metrics port of the node (one group per program)."""
    groups = []
    for program, port in metrics_ports(spec).items():
        n = 1
        if program.startswith("worker-gpu"):
            n = spec.instances_per_gpu
        elif program == "worker-cpu":
            n = spec.cpu_workers
        groups.append(
            {
                "targets": [f"{host}:{port + i}" for i in range(n)],
                "labels": {"program": program},
            }
        )
    return groups


def exporter_programs(spec: FleetSpec) -> list[tuple[str, list[str]]]:
    """Exporter programs to supervise: the node's GPU exporter ``python -m metrics`` (none with metrics off)."""
    ports = metrics_ports(spec)
    try:
        found = importlib.util.find_spec("metrics.__main__") is not None
    except (ImportError, ValueError):
        found = False
    if not found or "exporter" not in ports:
        return []
    return [("exporter", [spec.python, "-m", "metrics", "--port", str(ports["exporter"])])]


def _worker_command(spec: FleetSpec, backend: str, name: str, program: str = "") -> list[str]:
    cmd = [
        spec.python,
        "-m",
        "worker",
        "--connect",
        spec.worker_connect,
        "--backend",
        backend,
        "--detector",
        str(Path(spec.detector).resolve()),
        "--name",
        name,
        *spec.worker_args,
    ]
    if spec.curve_dir is not None:
        d = spec.curve_dir.resolve()
        cmd += ["--curve-secret", str(d / "worker.key_secret"), "--curve-server-key", str(d / "broker.key")]
    port = metrics_ports(spec).get(program)
    if port is not None:
        cmd += ["--metrics-port", str(port), "--metrics-port-offset", "%(process_num)d"]
    return cmd


def supervisord_config(spec: FleetSpec) -> str:
    """The supervisord configuration text of a fleet (see ``deploy/supervisord.conf`` for an example)."""
    run = spec.run_dir.resolve()
    logs = run / "logs"
    parts = [
        "; generated by `trackfleet up`; edit the command line rather than this file",
        "[unix_http_server]",
        f"file = {run / 'supervisor.sock'}",
        "chmod = 0700",
        "",
        "[supervisord]",
        f"logfile = {run / 'supervisord.log'}",
        f"pidfile = {run / 'supervisord.pid'}",
        f"childlogdir = {logs}",
        f"directory = {Path.cwd()}",
        "nodaemon = false",
        "",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
        "",
        "[supervisorctl]",
        f"serverurl = unix://{run / 'supervisor.sock'}",
        "",
    ]

    def program(
        name: str,
        command: list[str],
        *,
        numprocs: int = 1,
        env: str = "",
        priority: int = 20,
        stopwait_s: int = 20,
    ) -> None:
        parts.extend(
            [
                f"[program:{name}]",
                f"command = {_q(command)}",
                *(
                    ["process_name = %(program_name)s-%(process_num)d", f"numprocs = {numprocs}"]
                    if numprocs > 1
                    else []
                ),
                *([f"environment = {env}"] if env else []),
                f"priority = {priority}",
                "autostart = true",
                "autorestart = true",
                "startsecs = 1",
                "startretries = 10",
                "stopsignal = TERM",
                f"stopwaitsecs = {stopwait_s}",
                "stopasgroup = true",
                "killasgroup = true",
                "redirect_stderr = true",
                f"stdout_logfile = {logs}/%(program_name)s-%(process_num)d.log",
                "stdout_logfile_maxbytes = 20MB",
                "stdout_logfile_backups = 2",
                "",
            ]
        )

    if spec.run_broker:
        cmd = [
            spec.python,
            "-m",
            "broker",
            "--frontend",
            spec.frontend,
            "--backend",
            spec.backend,
            "--endpoints-file",
            str(run / "endpoints.json"),
            *spec.broker_args,
        ]
        if "broker" in metrics_ports(spec):
            cmd += ["--metrics-port", str(metrics_ports(spec)["broker"])]
        if spec.curve_dir is not None:
            d = spec.curve_dir.resolve()
            cmd += ["--curve-secret", str(d / "broker.key_secret")]
            if (d / "authorized").is_dir():
                cmd += ["--curve-authorized", str(d / "authorized")]
        program("broker", cmd, priority=10, stopwait_s=15)
    mps_env = f'CUDA_MPS_PIPE_DIRECTORY="{run / "mps-pipe"}",CUDA_MPS_LOG_DIRECTORY="{run / "mps-log"}"'
    if spec.mps:
        # the daemon sees the fleet's GPUs and renumbers them 0..n-1 for its clients
        visible = ",".join(str(g) for g in spec.gpus)
        program("mps", ["nvidia-cuda-mps-control", "-f"], env=f'{mps_env},CUDA_VISIBLE_DEVICES="{visible}"',
                priority=5, stopwait_s=10)  # fmt: skip
    for position, gpu in enumerate(spec.gpus):
        name = f"worker-gpu{gpu}"
        command = _worker_command(spec, "cupy", f"%(host_node_name)s-gpu{gpu}-%(process_num)d", name)
        program(
            name,
            [*command, "--device", str(position)] if spec.mps else command,
            numprocs=spec.instances_per_gpu,
            env=mps_env if spec.mps else f'CUDA_VISIBLE_DEVICES="{gpu}"',
        )
    if spec.cpu_workers:
        program(
            "worker-cpu",
            _worker_command(spec, "numpy", "%(host_node_name)s-cpu-%(process_num)d", "worker-cpu"),
            numprocs=spec.cpu_workers,
            env='CUDA_VISIBLE_DEVICES=""',
        )
    for name, cmd in exporter_programs(spec):
        program(name, cmd, priority=30)
    text = "\n".join(parts)
    # the %(...)s expansions in worker names were escaped by _q; restore them
    return text.replace("%%(host_node_name)s", "%(host_node_name)s").replace(
        "%%(process_num)d", "%(process_num)d"
    )


def _supervisorctl(spec_conf: Path, *args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supervisor.supervisorctl", "-c", str(spec_conf), *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def _supervisord_pid(run_dir: Path) -> int | None:
    try:
        pid = int((run_dir / "supervisord.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except OSError:
        return None
    return pid


def broker_stats(endpoint: str, timeout_s: float = 2.0, keys: Any = None) -> dict[str, Any] | None:
    """The broker's STATS, or None when it does not answer."""
    from producer.client import ClientConfig, FleetClient

    with FleetClient(ClientConfig(endpoint=endpoint, keys=keys)) as c:
        return c.stats(timeout_s)


def wait_for_workers(endpoint: str, n: int, timeout_s: float, keys: Any = None) -> dict[str, Any] | None:
    """Poll the broker until ``n`` workers are registered; the last stats (None: broker never answered)."""
    from producer.client import ClientConfig, FleetClient

    deadline = time.monotonic() + timeout_s
    stats = None
    with FleetClient(ClientConfig(endpoint=endpoint, keys=keys)) as c:
        while time.monotonic() < deadline:
            stats = c.stats(min(1.0, max(0.05, deadline - time.monotonic()))) or stats
            if stats is not None and stats.get("n_workers", 0) >= n:
                return stats
            time.sleep(0.1)
    return stats


def up(spec: FleetSpec, wait_s: float = 60.0) -> int:
    """Write the configuration, start supervisord and wait for the fleet to register.

    Returns:
        0 when every worker registered within ``wait_s`` (or ``wait_s`` is 0), 1 otherwise.

    Raises:
        ConfigError: supervisord is already running for this run directory, or failed to start.
    """
    run = spec.run_dir
    if _supervisord_pid(run) is not None:
        raise ConfigError(f"a fleet is already up in {run} (trackfleet down --run-dir {run})")
    (run / "logs").mkdir(parents=True, exist_ok=True)
    if spec.mps:
        if shutil.which("nvidia-cuda-mps-control") is None:
            raise ConfigError("--mps: nvidia-cuda-mps-control is not on PATH (NVIDIA driver utilities)")
        for d in ("mps-pipe", "mps-log"):
            (run / d).mkdir(exist_ok=True)
    spec.endpoints_file.unlink(missing_ok=True)
    spec.conf_path.write_text(supervisord_config(spec))
    targets = run / "prometheus-targets.json"
    targets.unlink(missing_ok=True)
    if spec.metrics_port:
        # for Prometheus' file_sd_configs (see deploy/prometheus.yml)
        targets.write_text(json.dumps(metrics_targets(spec), indent=1) + "\n")
    proc = subprocess.run(
        [spec.python, "-m", "supervisor.supervisord", "-c", str(spec.conf_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if proc.returncode != 0:
        raise ConfigError(f"supervisord failed to start: {proc.stderr.strip() or proc.stdout.strip()}")
    log.info("supervisord started with %s", spec.conf_path)
    if wait_s <= 0:
        return 0
    deadline = time.monotonic() + wait_s
    if spec.run_broker:
        stats = wait_for_workers(connect_endpoint(spec.frontend), spec.n_workers, wait_s)
        if stats is None or stats.get("n_workers", 0) < spec.n_workers:
            got = stats.get("n_workers", 0) if stats else "no broker"
            log.error(
                "fleet not ready after %.0f s (%s of %d workers); see %s/logs",
                wait_s,
                got,
                spec.n_workers,
                run,
            )
            return 1
    # supervisord calls a program RUNNING once it has stayed up for startsecs
    while time.monotonic() < deadline:
        lines = [ln for ln in _supervisorctl(spec.conf_path, "status").stdout.splitlines() if ln.strip()]
        if lines and all(" RUNNING " in f"{ln} " for ln in lines):
            return 0
        time.sleep(0.2)
    log.error("not every program is RUNNING after %.0f s; see %s/logs", wait_s, run)
    return 1


def down(run_dir: Path, timeout_s: float = 60.0) -> int:
    """Stop every program (SIGTERM: workers hand back their events) and supervisord itself.

    Returns:
        0 when supervisord is gone, 1 when it had to be killed, 2 when nothing was running.
    """
    conf = run_dir / "supervisord.conf"
    pid = _supervisord_pid(run_dir)
    if pid is None:
        return 2
    try:
        _supervisorctl(conf, "shutdown", timeout_s=timeout_s)
    except subprocess.TimeoutExpired:
        log.warning("supervisorctl shutdown timed out")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _supervisord_pid(run_dir) is None:
            return 0
        time.sleep(0.1)
    log.warning("supervisord %d did not exit; killing it", pid)
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)
    return 1


# --- the up / status / down subcommands -------------------------------------------------------------


def add_up_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpus", default=None, help="GPU ids, e.g. 0,1 (default: none, a CPU fleet)")
    p.add_argument("--instances-per-gpu", type=int, default=4, help="worker processes per GPU")
    p.add_argument("--cpu-workers", type=int, default=None, help="numpy workers (default 2 when no --gpus)")
    p.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR, help="config, sockets and logs")
    p.add_argument("--frontend", default=DEFAULT_FRONTEND, help="broker endpoint for producers")
    p.add_argument("--backend", default=DEFAULT_BACKEND, help="broker endpoint for workers")
    p.add_argument("--connect", help="worker-only node: the remote broker's worker endpoint")
    p.add_argument("--detector", type=Path, default=None, help="detector directory (default: bundled)")
    p.add_argument("--curve-dir", type=Path, help="CURVE keys directory (see docs/fleet.md)")
    p.add_argument("--broker-args", default="", help="extra broker arguments, quoted")
    p.add_argument("--worker-args", default="", help="extra worker arguments, quoted")
    p.add_argument("--wait-s", type=float, default=60.0, help="wait for workers to register (0: do not)")
    p.add_argument(
        "--mps",
        action="store_true",
        help="run the GPU workers under the CUDA Multi-Process Service (kernels of a GPU's workers run side by side)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=DEFAULT_METRICS_PORT,
        help="first Prometheus port: broker +0, GPU exporter +1, workers +10... (0: no metrics; default "
        "%(default)s)",
    )


def spec_from_args(args: argparse.Namespace) -> FleetSpec:
    gpus = parse_gpus(args.gpus)
    cpu = args.cpu_workers if args.cpu_workers is not None else (0 if gpus else 2)
    return FleetSpec(
        run_dir=args.run_dir,
        gpus=gpus,
        instances_per_gpu=args.instances_per_gpu,
        cpu_workers=cpu,
        frontend=args.frontend,
        backend=args.backend,
        connect=args.connect,
        run_broker=args.connect is None,
        detector=args.detector or bundled_data_dir(),
        broker_args=tuple(shlex.split(args.broker_args)),
        worker_args=tuple(shlex.split(args.worker_args)),
        curve_dir=args.curve_dir,
        metrics_port=args.metrics_port,
        mps=args.mps,
    )


def run_up(args: argparse.Namespace) -> int:
    try:
        spec = spec_from_args(args)
        code = up(spec, args.wait_s)
    except ConfigError as exc:
        sys.stderr.write(f"trackfleet up: error: {exc}\n")
        return 2
    sys.stdout.write(
        f"fleet up: {spec.n_workers} workers, producers connect to {connect_endpoint(spec.frontend)} "
        f"(config {spec.conf_path})\n"
    )
    return code


def add_status_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR, help="the fleet's run directory")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run_status(args: argparse.Namespace) -> int:
    run: Path = args.run_dir
    if _supervisord_pid(run) is None:
        sys.stdout.write(f"no fleet is up in {run}\n")
        return 3
    ctl = _supervisorctl(run / "supervisord.conf", "status")
    stats = None
    try:
        endpoints = json.loads((run / "endpoints.json").read_text())
        stats = broker_stats(endpoints["frontend"])
    except (OSError, ValueError, KeyError):
        endpoints = {}
    if args.json:
        sys.stdout.write(
            json.dumps({"programs": ctl.stdout.splitlines(), "endpoints": endpoints, "broker": stats}) + "\n"
        )
        return 0
    sys.stdout.write(ctl.stdout)
    if stats is not None:
        sys.stdout.write(
            f"broker {stats['epoch']} on {endpoints.get('frontend')}: {stats['n_workers']} workers, capacity "
            f"{stats['capacity']}, queue {stats['queue_depth']}, in flight {stats['in_flight']}, "
            f"completed {stats['counters']['completed']}, failed {stats['counters']['failed']}\n"
        )
    else:
        sys.stdout.write("broker: not answering\n")
    return 0


def add_down_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR, help="the fleet's run directory")
    p.add_argument("--timeout-s", type=float, default=60.0, help="wait this long for a clean stop")


def run_down(args: argparse.Namespace) -> int:
    code = down(args.run_dir, args.timeout_s)
    sys.stdout.write(
        {0: "fleet down\n", 1: "fleet down (supervisord killed)\n", 2: "no fleet was up\n"}[code]
    )
    return 0 if code in (0, 2) else 1


# --- local fleet of subprocesses --------------------------------------------------------------------


class LocalFleet:
    """A broker and workers as subprocesses on this machine (no supervisord).

    Args:
        run_dir: logs and the endpoints file go here.
        broker_args: extra broker arguments.
        worker_args: extra arguments for every worker.
        detector: detector directory for the workers.
        python: interpreter.
        keys: :class:`~broker.security.ClientKeys` for STATS queries when the broker requires CURVE.
        name_prefix: workers are named ``<name_prefix>-0``, ``-1``, ... (give fleets that run side by
            side different prefixes, so that replies and metrics tell their workers apart).
    """

    def __init__(
        self,
        run_dir: Path,
        broker_args: Sequence[str] = (),
        worker_args: Sequence[str] = (),
        detector: Path | None = None,
        python: str = sys.executable,
        keys: Any = None,
        name_prefix: str = "local",
    ) -> None:
        self.run_dir = Path(run_dir)
        self.name_prefix = name_prefix
        self.keys = keys  # CURVE client keys for the fleet's own STATS queries
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.broker_args = list(broker_args)
        self.worker_args = list(worker_args)
        self.detector = detector or bundled_data_dir()
        self.python = python
        self.broker: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        self.endpoints: dict[str, str] = {}
        self._n_started = 0
        self._logs: list[Any] = []

    @property
    def frontend(self) -> str:
        return self.endpoints["frontend"]

    @property
    def backend(self) -> str:
        return self.endpoints["backend"]

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        logf = (self.run_dir / f"{name}.log").open("ab")
        self._logs.append(logf)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        return subprocess.Popen([self.python, *args], stdout=logf, stderr=subprocess.STDOUT, env=env)

    def start_broker(
        self, frontend: str = "tcp://127.0.0.1:0", backend: str = "tcp://127.0.0.1:0", timeout_s: float = 20.0
    ) -> dict[str, str]:
        """Start the broker and wait until it has bound (reads its endpoints file).

        Raises:
            RuntimeError: the broker exited or did not bind in time.
        """
        ep_file = self.run_dir / "endpoints.json"
        ep_file.unlink(missing_ok=True)
        self.broker = self._spawn(
            "broker",
            [
                "-m",
                "broker",
                "--frontend",
                frontend,
                "--backend",
                backend,
                "--endpoints-file",
                str(ep_file),
                *self.broker_args,
            ],
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.broker.poll() is not None:
                raise RuntimeError(
                    f"broker exited with {self.broker.returncode}; see {self.run_dir}/broker.log"
                )
            try:
                data = json.loads(ep_file.read_text())
                if data.get("pid") == self.broker.pid:
                    self.endpoints = {"frontend": data["frontend"], "backend": data["backend"]}
                    return self.endpoints
            except (OSError, ValueError):
                pass
            time.sleep(0.02)
        raise RuntimeError(f"broker did not bind within {timeout_s} s; see {self.run_dir}/broker.log")

    def restart_broker(self, timeout_s: float = 20.0) -> dict[str, str]:
        """Kill the broker (SIGKILL) and start a new one on the same endpoints."""
        if self.broker is not None:
            self.broker.kill()
            self.broker.wait(10)
        return self.start_broker(self.frontend, self.backend, timeout_s)

    def start_workers(self, n: int, extra_args: Sequence[str] = ()) -> list[subprocess.Popen[bytes]]:
        """Start ``n`` numpy workers (they register asynchronously; see :meth:`wait_ready`)."""
        started = []
        for _ in range(n):
            i = self._n_started
            self._n_started += 1
            p = self._spawn(
                f"worker-{i}",
                [
                    "-m",
                    "worker",
                    "--connect",
                    self.backend,
                    "--detector",
                    str(self.detector),
                    "--name",
                    f"{self.name_prefix}-{i}",
                    *self.worker_args,
                    *extra_args,
                ],
            )
            self.workers.append(p)
            started.append(p)
        return started

    def wait_ready(self, n_workers: int, timeout_s: float = 30.0) -> dict[str, Any]:
        """Wait until ``n_workers`` are registered with the broker.

        Raises:
            RuntimeError: they did not register in time.
        """
        stats = wait_for_workers(self.frontend, n_workers, timeout_s, self.keys)
        if stats is None or stats.get("n_workers", 0) < n_workers:
            raise RuntimeError(
                f"only {stats.get('n_workers', 0) if stats else 0} of {n_workers} workers registered within "
                f"{timeout_s} s; see {self.run_dir}/worker-*.log"
            )
        return stats

    def stats(self, timeout_s: float = 2.0) -> dict[str, Any] | None:
        return broker_stats(self.frontend, timeout_s, self.keys)

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM the workers (they hand back their events), then the broker; SIGKILL what lingers."""
        procs = [p for p in self.workers if p.poll() is None]
        for p in procs:
            p.send_signal(signal.SIGTERM)
        _wait_all(procs, timeout_s)
        if self.broker is not None and self.broker.poll() is None:
            self.broker.send_signal(signal.SIGTERM)
            _wait_all([self.broker], timeout_s)
        for f in self._logs:
            f.close()
        self._logs.clear()

    def __enter__(self) -> LocalFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _wait_all(procs: Sequence[subprocess.Popen[bytes]], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("process %d did not stop in time; killing it", p.pid)
            p.kill()
            p.wait(5)


# --- subcommand registry hooks ----------------------------------------------------------------------
# ``producer.cli`` imports one module per subcommand; this module serves three of them (up, status, down)
# and picks by the subcommand's name (the last word of the parser's prog, ``args.command`` at run time).

_SUBCOMMANDS = {
    "up": (add_up_arguments, run_up),
    "status": (add_status_arguments, run_status),
    "down": (add_down_arguments, run_down),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``trackfleet up`` / ``status`` / ``down`` (chosen by the parser's name)."""
    name = p.prog.split()[-1]
    if name not in _SUBCOMMANDS:
        raise ConfigError(f"producer.launch serves {sorted(_SUBCOMMANDS)}, not {name!r}")
    _SUBCOMMANDS[name][0](p)


def run(args: argparse.Namespace) -> int:
    """Run ``trackfleet up`` / ``status`` / ``down`` according to ``args.command``."""
    return _SUBCOMMANDS[args.command][1](args)
