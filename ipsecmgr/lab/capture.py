"""tcpdump in a lab namespace: what really crossed the wire.

The capture starts before the traffic and is read back with scapy after
tcpdump has flushed and exited, so tests assert on bytes on the wire.
"""

from __future__ import annotations

import select
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from ipsecmgr.netns import Netns


class Capture:
    """``with Capture(ns, ifname, path) as cap: ...`` then ``cap.packets()``."""

    def __init__(
        self, ns: Netns, ifname: str, path: Path, bpf: str = "", *, buffer_kib: int = 0
    ) -> None:
        self.ns = ns
        # tcpdump -B: a bulk transfer overruns the default 2 MiB ring (drops, uncounted).
        self.buffer_kib = buffer_kib
        self.ifname = ifname
        self.path = path
        self.bpf = bpf
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> Capture:
        # --immediate-mode: hand each packet over at once (TPACKET_V3 otherwise
        # batches them in blocks that a stop can leave unwritten).
        cmd = ["tcpdump", "-i", self.ifname, "--immediate-mode", "-U", "-n", "-s", "0",
               "-w", str(self.path)]  # fmt: skip
        if self.buffer_kib:
            cmd += ["-B", str(self.buffer_kib)]
        if self.bpf:
            cmd.append(self.bpf)
        self.proc = self.ns.popen(cmd, stdout=subprocess.DEVNULL)
        # tcpdump says "listening on IF" on stderr once the socket is open.
        assert self.proc.stderr is not None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if select.select([self.proc.stderr], [], [], 0.5)[0]:
                line = self.proc.stderr.readline()
                if "listening on" in line:
                    return self
                if not line:
                    break
        raise RuntimeError(f"tcpdump did not start on {self.ns.name}/{self.ifname}")

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self._settle()
            self.proc.send_signal(signal.SIGINT)  # flushes the file
            self.proc.wait(timeout=10)

    def _settle(self, quiet: float = 0.2, limit: float = 5.0) -> None:
        """Wait until the file has stopped growing for ``quiet`` seconds: the
        last packets of an exchange that just ended are written by then."""
        deadline = time.monotonic() + limit
        size, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            now_size = self.path.stat().st_size if self.path.exists() else 0
            if now_size != size:
                size, since = now_size, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return
            time.sleep(0.02)

    def packets(self) -> list[Any]:
        # Loading the layers registers the link types and protocols rdpcap decodes.
        import scapy.layers.inet
        import scapy.layers.inet6
        import scapy.layers.l2  # noqa: F401
        from scapy.utils import rdpcap

        self.stop()
        return list(rdpcap(str(self.path)))
