"""Real livekit-agents worker processes for the tests: each runs tests/agents/echo_worker.py in .venv-agents
(created by scripts/ensure-agents-venv.sh, which `make test` runs; the first use here runs it too)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
AGENTS_VENV = ROOT / os.environ.get("AGENTS_VENV", ".venv-agents")
WORKER_SCRIPT = Path(__file__).resolve().parent / "echo_worker.py"


def agents_python() -> Path:
    python = AGENTS_VENV / "bin" / "python"
    if not (AGENTS_VENV / ".installed-1.8").exists():
        subprocess.run(["bash", str(ROOT / "scripts" / "ensure-agents-venv.sh")], cwd=ROOT, check=True)
    return python


@dataclass
class AgentWorker:
    proc: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    @property
    def registered(self) -> bool:
        return "REGISTERED " in self.log()

    def wait_registered(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.registered:
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent worker exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            time.sleep(0.2)
        raise RuntimeError(f"agent worker did not register within {timeout}s:\n{self.log()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL the worker and whatever it started, as a crash would."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


def start_worker(tmp: Path, url: str, api_key: str, api_secret: str, agent_name: str = "",
                 worker_type: str = "room") -> AgentWorker:
    log_path = tmp / f"agent-worker-{agent_name or 'default'}-{time.monotonic_ns()}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIVEKIT_")}
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [str(agents_python()), str(WORKER_SCRIPT), url, api_key, api_secret, agent_name, worker_type],
            stdout=log_file, stderr=subprocess.STDOUT, env={**env, "PYTHONUNBUFFERED": "1"},
            cwd=tmp, start_new_session=True,
        )
    return AgentWorker(proc, log_path)
