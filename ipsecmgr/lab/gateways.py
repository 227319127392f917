"""Our two gateways in the lab: configs written, daemons started, stopped.

Used by ``ipsecmgr lab demo``, the integration tests and the benchmarks, so
that all three start the daemons the same way: ``ipsecmgr run`` in the
client namespace (initiator) and in the gw namespace (responder), each with
its own control socket in a private 0700 directory.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ipsecmgr.control import request
from ipsecmgr.lab.configs import lab_gateway_config
from ipsecmgr.lab.topology import Lab, python_env
from ipsecmgr.show import Snapshot, render

SIDES = ("gw", "client")


class GatewayError(RuntimeError):
    pass


@dataclass
class GatewayProcess:
    """One ``ipsecmgr run`` in a namespace; stderr (the log) is collected."""

    side: str
    proc: subprocess.Popen[str]
    config: Path
    control: Path
    log_lines: list[str] = field(default_factory=list)
    _reader: threading.Thread | None = None

    def start_log_reader(self) -> None:
        def read() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.log_lines.append(line.rstrip("\n"))

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()

    @property
    def log(self) -> str:
        return "\n".join(self.log_lines)

    def snapshot(self) -> Snapshot:
        response = request(self.control, {"command": "snapshot"})
        if not response.get("ok"):
            raise GatewayError(f"{self.side}: {response.get('error')}")
        snap: Snapshot = response["result"]
        return snap

    def show(self, command: str) -> str:
        return render(command, self.snapshot())

    def command(self, cmd: Mapping[str, Any]) -> dict[str, Any]:
        return request(self.control, cmd)

    def counter(self, group: str, name: str) -> int:
        return int(self.snapshot()["statistics"][group].get(name, 0))  # type: ignore[literal-required]

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(timeout=5)
        if self._reader is not None:
            self._reader.join(timeout=2)
        return code

    def kill(self) -> None:
        """SIGKILL: a crash, for recovery tests."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=5)


class LabGateways:
    """Starts our gateway on both sides of a built :class:`Lab`."""

    def __init__(
        self, lab: Lab, workdir: Path | None = None, *, psk: bytes = b"lab-psk-0123456789"
    ) -> None:
        self.lab = lab
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="ipsecmgr-lab-")
            workdir = Path(self._tmp.name)
        self.dir = workdir
        os.chmod(self.dir, 0o700)  # the control sockets live here
        self.psk_file = self.dir / "psk"
        self.psk_file.write_bytes(psk)
        self.psk_file.chmod(0o600)
        self.gateways: dict[str, GatewayProcess] = {}

    def write_config(self, side: str, **options: Any) -> Path:
        conf = self.dir / f"{side}.toml"
        options.setdefault("bypass_via_tun", side == "client")
        conf.write_text(
            lab_gateway_config(
                self.lab.addresses,
                side,
                psk_file=options.pop("psk_file", self.psk_file),
                management_interface=self.lab.interfaces[f"{side}.wan"],
                control_socket=self.dir / f"{side}.sock",
                **options,
            )
        )
        return conf

    def start(
        self,
        side: str,
        *,
        config: Path | None = None,
        verbose: int = 1,
        timeout: float = 20.0,
        **options: Any,
    ) -> GatewayProcess:
        conf = config or self.write_config(side, **options)
        cmd = [sys.executable, "-m", "ipsecmgr.cli", "run", "--config", str(conf)]
        if verbose:
            cmd.append("-" + "v" * verbose)
        proc = self.lab.ns(side).popen(cmd, env=python_env())
        gw = GatewayProcess(side, proc, conf, self.dir / f"{side}.sock")
        assert proc.stdout is not None
        # The daemon prints "ready" once it listens; give up after `timeout`.
        ready = ""
        if select.select([proc.stdout], [], [], timeout)[0]:
            ready = proc.stdout.readline().strip()
        gw.start_log_reader()
        if ready != "ready":
            code = gw.terminate()
            raise GatewayError(f"{side} gateway did not start (exit {code}):\n{gw.log[-3000:]}")
        self.gateways[side] = gw
        return gw

    def start_both(self, **options: Any) -> None:
        for side in SIDES:
            self.start(side, **options)

    def __getitem__(self, side: str) -> GatewayProcess:
        return self.gateways[side]

    def stop(self) -> dict[str, int]:
        """SIGTERM every gateway, then ``ipsecmgr down`` in its namespace: a stop
        leaves the fail-closed block (docs/security.md), and a lab shared by several
        cases (the interop tests) must not refuse the next case's traffic."""
        codes = {side: gw.terminate() for side, gw in self.gateways.items()}
        downs = [
            self.lab.ns(side).popen(
                [sys.executable, "-m", "ipsecmgr.cli", "down"], env=python_env()
            )
            for side in self.gateways
        ]
        for p in downs:  # in parallel: each is an interpreter start
            p.communicate(timeout=60)
        self.gateways.clear()
        return codes

    def close(self) -> None:
        try:
            self.stop()
        finally:
            if self._tmp is not None:
                self._tmp.cleanup()

    def __enter__(self) -> LabGateways:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
