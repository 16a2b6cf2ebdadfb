"""Client side of the kt-kernel driver: starts `peer_kt_kernel.py` under the peer's interpreter, talks to
it over a pipe, and keeps it SIGSTOPped while ktmoe or PyTorch are being timed (an idle thread pool that
spins would otherwise steal cycles from them)."""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
import time
from typing import Optional

DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peer_kt_kernel.py")
MARK = "@@KTMOE-PEER@@ "
PEER_ENV = "KTMOE_PEER_PYTHON"


class PeerError(RuntimeError):
    pass


class Peer:
    """One kt-kernel process holding one layer (one preset, one method)."""

    def __init__(self, python: str, config: dict, timeout_s: float = 900.0):
        self.python = python
        self.config = config
        self.timeout_s = timeout_s
        self.info: dict = {}
        self.log: list = []  # kt-kernel's own stdout/stderr lines (last few kept)
        self._q: "queue.Queue[Optional[dict]]" = queue.Queue()
        self._stopped = False
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)  # the peer's interpreter must not see this environment's packages
        self.proc = subprocess.Popen([python, DRIVER, json.dumps(config)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                     env=env)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            self.info = self._wait()
        except Exception:
            self.close()
            raise
        if "error" in self.info:
            err = self.info["error"]
            self.close()
            raise PeerError(err)
        self.pause()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(MARK):
                try:
                    self._q.put(json.loads(line[len(MARK):]))
                except ValueError:
                    self._q.put({"error": f"bad reply: {line.strip()[:200]}"})
            else:
                self.log.append(line.rstrip())
                del self.log[:-40]
        self._q.put(None)  # EOF

    def _wait(self) -> dict:
        try:
            msg = self._q.get(timeout=self.timeout_s)
        except queue.Empty:
            raise PeerError(f"kt-kernel driver did not answer within {self.timeout_s:.0f} s") from None
        if msg is None:
            rc = self.proc.wait()
            tail = " | ".join(self.log[-5:])
            raise PeerError(f"kt-kernel driver exited (rc={rc}): {tail}")
        return msg

    def _send(self, cmd: dict) -> dict:
        if self.proc.poll() is not None:
            raise PeerError(f"kt-kernel driver is not running (rc={self.proc.returncode})")
        self.resume()
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
            msg = self._wait()
        finally:
            self.pause()
        if "error" in msg:
            raise PeerError(msg["error"])
        return msg

    def step(self, T: int, n: int = 1) -> dict:
        return self._send({"cmd": "step", "T": int(T), "n": int(n)})

    def accuracy(self, inputs_path: str, out_path: str) -> dict:
        """One forward + backward on the torch.save'd inputs; kt-kernel's outputs and grads go to out_path."""
        return self._send({"cmd": "accuracy", "inputs": inputs_path, "out": out_path})

    def rss(self) -> int:
        return int(self._send({"cmd": "rss"})["rss"])

    def pause(self) -> None:
        if not self._stopped and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGSTOP)
            self._stopped = True

    def resume(self) -> None:
        if self._stopped and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            time.sleep(0.005)
        self._stopped = False

    def close(self) -> None:
        if self.proc.poll() is None:
            self.resume()
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
            except (OSError, ValueError):
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:
            pass
        self._reader.join(timeout=5)  # it ends at the driver's EOF
