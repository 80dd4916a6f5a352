"""Run a server in a child process, for tests, benchmarks and examples: start, wait until it answers, read its
memory, stop. Listens on loopback only unless told otherwise by the command."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from .. import machine


def serve_command(*args: str) -> list[str]:
    """``python -m sinkcache serve --host 127.0.0.1 --port 0 ARGS...`` with this interpreter (any free port)."""
    return [sys.executable, "-m", "sinkcache", "serve", "--host", "127.0.0.1", "--port", "0", *args]


class Server:
    """A server process. ``url`` is its base (``http://host:port``): given, or read from sinkcache's start line.

    Args:
        command: the command line (``serve_command(...)``, or another server's).
        url: the server's base URL when the command does not print sinkcache's start line.
        health: the path polled until it answers 200.
        timeout_s: seconds to wait for it to answer (loading a model takes a while).
    """

    def __init__(self, command: list[str], url: str | None = None, health: str = "/health", timeout_s: float = 300,
                 env: dict[str, str] | None = None):
        self.command, self.url, self.health, self.timeout_s, self.env = command, url, health, timeout_s, env
        self.lines: collections.deque[str] = collections.deque(maxlen=200)  # its last output, for diagnostics
        self.process: subprocess.Popen[str] | None = None
        self._found = threading.Event()

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env=self.env, bufsize=1)
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"The server exited with status {self.process.returncode}:\n{self.output()}")
            if self.url is not None and self._answers():
                return
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"The server did not answer within {self.timeout_s:.0f} s:\n{self.output()}")

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            if self.url is None and line.startswith("sinkcache serve:") and " on http://" in line:
                self.url = line.rsplit(" on ", 1)[1].strip().removesuffix("/v1")

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + self.health, timeout=2) as response:  # type: ignore[operator]
                return response.status == 200
        except OSError:
            return False

    def output(self) -> str:
        return "\n".join(self.lines)

    def get(self, path: str) -> Any:
        """The decoded JSON of ``GET path``."""
        with urllib.request.urlopen(f"{self.url}{path}", timeout=30) as response:
            return json.loads(response.read())

    def rss_bytes(self) -> int:
        """The server process's resident memory in bytes (Linux ``/proc``; 0 elsewhere)."""
        assert self.process is not None
        return machine.status_bytes("VmRSS", self.process.pid) or 0

    def tree_pss_bytes(self) -> int:
        """The proportional set size (PSS) of the server and every process it started, in bytes (Linux; 0
        elsewhere). This is the measure that compares servers: some run the model in a child process (``transformers
        serve`` does), and summing RSS would count the libraries they share once per process."""
        assert self.process is not None
        if self.process.poll() is not None:  # its children may live on, re-parented: there is no tree to measure
            raise RuntimeError(f"The server exited with status {self.process.returncode}:\n{self.output()}")
        children: dict[int, list[int]] = collections.defaultdict(list)
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:  # the parent pid is the second field after the parenthesised command name
                children[int(stat.read_text().rsplit(")", 1)[1].split()[1])].append(int(stat.parent.name))
            except (OSError, ValueError, IndexError):
                continue  # a process that ended while we looked
        total, pending, seen = 0, [self.process.pid], set()
        while pending:
            pid = pending.pop()
            if pid in seen:  # a pid reused while we scanned
                continue
            seen.add(pid)
            pending.extend(children.get(pid, ()))
            total += machine.status_bytes("Pss", pid, "smaps_rollup") or 0  # 0 for one that ended meanwhile
        return total

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
