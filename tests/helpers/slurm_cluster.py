"""A throwaway Slurm cluster on loopback: munged, slurmctld and two slurmd on this host.

Debian's slurm-wlm runs several slurmd on one host when each node has its own ``Port`` and is
started with ``slurmd -N NAME``; the node names must resolve, so they are added to /etc/hosts
(and removed again). Everything else lives in one temporary directory; ``SLURM_CONF`` points
the daemons, the client commands and the jobs at it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from typing import Optional

from megatron_ext.platform.distributed import free_port

NODES = ("gpastest1", "gpastest2")
HOSTS_MARKER = "# gpas-megatron test cluster"
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "srun", "scancel", "sinfo")
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


def why_unavailable() -> Optional[str]:
    """None if a local cluster can be started here, else the reason."""
    missing = [d for d in DAEMONS if shutil.which(d) is None]
    if missing:
        missing = ", ".join(missing)
        return f"Slurm is not installed ({missing} missing): apt-get install slurm-wlm munge"
    if os.geteuid() != 0:
        return "starting slurmd needs root"
    if not _names_resolve() and not os.access("/etc/hosts", os.W_OK):
        return f"node names {NODES} do not resolve and /etc/hosts is not writable"
    return None


def _names_resolve() -> bool:
    try:
        return all(socket.gethostbyname(n) == "127.0.0.1" for n in NODES)
    except OSError:
        return False


class LocalSlurmCluster:
    def __init__(self, root: str, cpus_per_node: int = 2):
        self.root = root
        self.cpus_per_node = cpus_per_node
        self.conf = os.path.join(root, "slurm.conf")
        self.env = {**os.environ, "SLURM_CONF": self.conf}
        for key in list(self.env):  # never inherit an enclosing allocation
            if key.startswith(("SLURM_", "SBATCH_", "SRUN_")) and key != "SLURM_CONF":
                del self.env[key]
        self._added_hosts = False

    # --- lifecycle ----------------------------------------------------------------------------
    def start(self) -> LocalSlurmCluster:
        self._add_hosts()
        for d in ("state", "spool", *(f"spool/{n}" for n in NODES)):
            os.makedirs(os.path.join(self.root, d), exist_ok=True)
        key = os.path.join(self.root, "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o600)
        self._run(
            "munged",
            "--force",
            f"--key-file={key}",
            f"--socket={self.path('munge.sock')}",
            f"--pid-file={self.path('munged.pid')}",
            f"--log-file={self.path('munged.log')}",
            f"--seed-file={self.path('munged.seed')}",
        )
        self._write_conf()
        self._run("slurmctld", "-i")
        for node in NODES:
            self._run("slurmd", "-N", node)
        self._wait_for_idle_nodes()
        return self

    def stop(self) -> None:
        subprocess.run(["scancel", "--full", "--user", "root"], env=self.env, capture_output=True)
        subprocess.run(["scontrol", "shutdown"], env=self.env, capture_output=True)
        deadline = time.time() + 20
        pidfiles = ["slurmctld.pid", *(f"slurmd-{n}.pid" for n in NODES), "munged.pid"]
        for name in pidfiles:
            pid = self._read_pid(name)
            if pid is None:
                continue
            if name == "munged.pid":
                _kill(pid)
            while _alive(pid) and time.time() < deadline:
                time.sleep(0.2)
            if _alive(pid):
                _kill(pid)
        self._remove_hosts()

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    # --- jobs ---------------------------------------------------------------------------------
    def sbatch(self, args: list[str], env: dict, cwd: str) -> str:
        out = subprocess.run(
            ["sbatch", "--parsable", *args],
            env={**self.env, **env},
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return out.strip().split(";")[0]

    def job_field(self, job_id: str, field: str) -> str:
        out = subprocess.run(
            ["scontrol", "show", "job", "-o", job_id], env=self.env, capture_output=True, text=True
        ).stdout
        for line in out.splitlines():  # an array job prints one line per task
            for item in line.split():
                if item.startswith(f"{field}="):
                    return item.split("=", 1)[1]
        return ""

    def wait(self, job_id: str, timeout: float = 300, states=TERMINAL_STATES) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = self.job_field(job_id, "JobState")
            if state in states:
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not in {sorted(states)} after {timeout:.0f} s")

    def signal_batch_script(self, job_id: str, signal: str) -> None:
        """What Slurm does before a time limit with --signal=B:SIG@T (or on preemption)."""
        subprocess.run(
            ["scancel", "--batch", f"--signal={signal}", job_id], env=self.env, check=True
        )

    def release(self, job_id: str) -> None:
        """Make a requeued job eligible now (Slurm holds requeued jobs back for ~2 minutes)."""
        subprocess.run(
            ["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=self.env, check=True
        )

    # --- internals ----------------------------------------------------------------------------
    def _run(self, *cmd: str) -> None:
        subprocess.run(list(cmd), env=self.env, check=True, capture_output=True)

    def _write_conf(self) -> None:
        p = self.path
        nodes = "\n".join(
            f"NodeName={n} NodeAddr=127.0.0.1 CPUs={self.cpus_per_node} RealMemory=2000 "
            f"Port={free_port()} State=UNKNOWN"
            for n in NODES
        )
        conf = f"""\
ClusterName=gpastest
SlurmctldHost={socket.gethostname().split(".")[0]}(127.0.0.1)
SlurmctldPort={free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={p("munge.sock")}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={p("state")}
SlurmdSpoolDir={p("spool")}/%n
SlurmctldPidFile={p("slurmctld.pid")}
SlurmdPidFile={p("slurmd-%n.pid")}
SlurmctldLogFile={p("slurmctld.log")}
SlurmdLogFile={p("slurmd-%n.log")}
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
MinJobAge=3600
{nodes}
PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""
        with open(self.conf, "w") as f:
            f.write(conf)

    def _wait_for_idle_nodes(self, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        out = ""
        while time.time() < deadline:
            out = subprocess.run(
                ["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True, text=True
            ).stdout
            states = dict(line.split() for line in out.splitlines() if line.strip())
            if all(states.get(n) == "idle" for n in NODES):
                return
            time.sleep(0.5)
        raise RuntimeError(f"Slurm nodes not idle after {timeout:.0f} s: {out!r}")

    def _add_hosts(self) -> None:
        if _names_resolve():
            return
        with open("/etc/hosts", "a") as f:
            f.write(f"127.0.0.1 {' '.join(NODES)} {HOSTS_MARKER}\n")
        self._added_hosts = True

    def _remove_hosts(self) -> None:
        if not self._added_hosts:
            return
        with open("/etc/hosts") as f:
            lines = [line for line in f if HOSTS_MARKER not in line]
        with open("/etc/hosts", "w") as f:  # in place: /etc/hosts is often a bind mount
            f.writelines(lines)

    def _read_pid(self, name: str) -> Optional[int]:
        try:
            with open(self.path(name)) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def _kill(pid: int) -> None:
    try:
        os.kill(pid, 15)
    except OSError:
        pass
