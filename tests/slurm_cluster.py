"""A throwaway single-node SLURM cluster for the tests (Debian `slurm-wlm` + `munge`, run as root).

Everything lives in one temporary folder: a generated munge key, munged with its own socket, pid and log; a
generated ``slurm.conf`` (the machine's real hostname, CPUs and memory from ``slurmd -C``; free ports;
``ProctrackType=proctrack/linuxproc``, ``TaskPlugin=task/none``; no accounting, no cgroups, no GRES), and the
state, spool, pid and log files of slurmctld and slurmd. Clients find the cluster through ``SLURM_CONF`` (see
:attr:`SlurmCluster.env`); the system's own SLURM/munge configuration, if any, is neither read nor touched.

``start()`` raises :class:`SlurmUnavailable` with a reason when the cluster cannot be started (not root, binaries
missing, daemons not up within the timeout); the pytest fixture turns that into a skip. ``stop()`` cancels the
cluster's jobs and ends the three daemons it started, by their pids (SIGTERM, then SIGKILL after a grace period).

By hand (as root)::

    python tests/slurm_cluster.py /tmp/myslurm     # starts the cluster, prints `export SLURM_CONF=... PATH=...`
    # in another shell: paste that export line; sinfo; srun hostname
    # Ctrl-C stops the daemons
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sinfo", "squeue", "sbatch", "srun", "scancel", "scontrol")
PARTITION = "wsss"


class SlurmUnavailable(RuntimeError):
    """SLURM cannot be started here; the message says why."""


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _which(name: str) -> str | None:
    """The real binary (never one of the wrappers that a SlurmCluster puts first on PATH)."""
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if not Path(p, ".wsss-slurm-wrappers").exists())
    return shutil.which(name, path=path) or next((p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.access(p, os.X_OK)),
                                      None)


def missing_reason() -> str | None:
    """Why a cluster cannot be started here (None when it can be tried)."""
    if sys.platform != "linux":
        return "SLURM test cluster needs Linux"
    if os.geteuid() != 0:
        return "SLURM test cluster needs root (slurmd runs jobs as root; run the tests as root)"
    missing = [b for b in DAEMONS + CLIENTS if _which(b) is None]
    if missing:
        return (f"SLURM/munge binaries missing: {', '.join(missing)} "
                "(apt-get install slurm-wlm munge; .ci/run does this where apt and root are available)")
    return None


class SlurmCluster:
    """One slurmctld + one slurmd (this host) + one munged, all state under ``root``."""

    def __init__(self, root: Path | str | None = None, partition: str = PARTITION):
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="wsss-slurm-"))
        self.partition = partition
        self.conf = self.root / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self.hostname = socket.gethostname().split(".")[0]

    # -- setup ---------------------------------------------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        """Environment variables that point SLURM's clients (and the jobs' srun) at this cluster.

        ``SLURM_CONF`` alone is not enough: inside a job, snakemake-executor-plugin-slurm-jobstep drops every
        ``SLURM_*`` variable but the job's identity before calling ``srun``, which then looks for
        /etc/slurm/slurm.conf. So ``PATH`` starts with a folder of wrappers (``<root>/bin/srun`` etc.) that set
        ``SLURM_CONF`` and exec the real client.
        """
        return {"SLURM_CONF": str(self.conf), "PATH": f"{self.root / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}

    def _node_line(self) -> str:
        """The NodeName line of ``slurmd -C`` (real CPUs, sockets, cores, memory), for this host."""
        out = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, timeout=30).stdout
        line = next((x for x in out.splitlines() if x.startswith("NodeName=")), None)
        if line is None:
            raise SlurmUnavailable(f"`slurmd -C` printed no NodeName line: {out!r}")
        line = re.sub(r"^NodeName=\S+", f"NodeName={self.hostname}", line)
        # RealMemory a little below what slurmd measures, so the node never registers as having less than declared
        mem = int(re.search(r"RealMemory=(\d+)", line).group(1))
        line = re.sub(r"RealMemory=\d+", f"RealMemory={max(mem - 256, 256)}", line)
        return f"{line} NodeAddr=127.0.0.1 State=UNKNOWN"

    def write_config(self) -> None:
        r = self.root
        for d in ("ctld", "spool", "log", "munge"):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o700)
        key = r / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            os.chmod(key, 0o600)
        (r / "bin").mkdir(exist_ok=True)
        (r / "bin" / ".wsss-slurm-wrappers").touch()
        for client in CLIENTS + ("sacct", "sacctmgr", "sshare", "salloc", "sstat"):
            real = _which(client)
            if real:
                w = r / "bin" / client
                w.write_text(f"#!/bin/sh\nSLURM_CONF={self.conf}; export SLURM_CONF\nexec {real} \"$@\"\n")
                os.chmod(w, 0o755)
        ctld_port, d_port = _free_ports(2)
        self.conf.write_text("\n".join([
            "# generated by tests/slurm_cluster.py: single-node test cluster",
            "ClusterName=wsss-test",
            f"SlurmctldHost={self.hostname}(127.0.0.1)",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={d_port}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={r}/munge/munge.sock",
            f"StateSaveLocation={r}/ctld",
            f"SlurmdSpoolDir={r}/spool",
            f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmdPidFile={r}/slurmd.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "ReturnToService=2",
            # squeue must still see finished jobs when Snakemake polls (the slurm plugin falls back to sacct,
            # which needs accounting, when MinJobAge < 3 x its first status-check interval)
            "MinJobAge=600",
            "KillWait=5",
            "InactiveLimit=0",
            "SlurmdTimeout=60",
            self._node_line(),
            f"PartitionName={self.partition} Nodes={self.hostname} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))

    # -- daemons -------------------------------------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")
        self.procs[name] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True, env={**os.environ, **self.env})
        log.close()

    def _client(self, *argv: str, timeout: float = 20) -> subprocess.CompletedProcess:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **self.env})

    def _wait(self, what: str, ok, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise SlurmUnavailable(f"{name} exited ({p.returncode}) while waiting for {what}:\n"
                                           + self.logs_tail())
            try:
                if ok():
                    return
            except (subprocess.SubprocessError, OSError):
                pass
            time.sleep(0.5)
        raise SlurmUnavailable(f"{what} not within {timeout:.0f} s:\n" + self.logs_tail())

    def start(self, timeout: float = 60) -> "SlurmCluster":
        reason = missing_reason()
        if reason:
            raise SlurmUnavailable(reason)
        try:
            self.write_config()
            m = self.root / "munge"
            self._spawn("munged", [_which("munged"), "--foreground", "--force", f"--key-file={m}/munge.key",
                                   f"--socket={m}/munge.sock", f"--pid-file={m}/munged.pid",
                                   f"--log-file={self.root}/log/munged.log", f"--seed-file={m}/munged.seed"])
            self._wait("munged", lambda: (m / "munge.sock").exists(), timeout)
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
            self._wait("slurmctld", lambda: self._client("scontrol", "ping").returncode == 0
                       and "UP" in self._client("scontrol", "ping").stdout, timeout)
            self._spawn("slurmd", [_which("slurmd"), "-D", "-f", str(self.conf)])
            self._wait(f"node {self.hostname} idle", self._node_idle, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _node_idle(self) -> bool:
        out = self._client("sinfo", "-h", "-N", "-p", self.partition, "-o", "%N %t").stdout.split()
        return out[:1] == [self.hostname] and out[1].rstrip("*") in ("idle", "mix", "alloc")

    def stop(self, grace: float = 15) -> None:
        """Cancel this cluster's jobs, then end the daemons started here, by pid (SIGTERM, SIGKILL after grace)."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            try:
                self._client("scancel", "--full", "--partition", self.partition, timeout=10)
                deadline = time.time() + grace
                while time.time() < deadline and self._client("squeue", "-h", "-t", "R,CG,PD", timeout=10).stdout.strip():
                    time.sleep(0.5)
            except (subprocess.SubprocessError, OSError):
                pass
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.pop(name, None)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)

    def logs_tail(self, n: int = 3000) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*")):
            text = f.read_text(errors="replace")
            if text.strip():
                out.append(f"--- {f.name}\n{text[-n:]}")
        return "\n".join(out)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


if __name__ == "__main__":
    c = SlurmCluster(sys.argv[1] if len(sys.argv) > 1 else None)
    try:
        c.start()
    except SlurmUnavailable as e:
        sys.exit(f"cannot start SLURM: {e}")
    print(f"export SLURM_CONF={c.conf} PATH={c.root / 'bin'}:$PATH   # partition {c.partition}; "
          "Ctrl-C (or SIGTERM) stops the daemons", flush=True)

    def _interrupt(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        c.stop()
