"""The server and client as programs (what the lab runs inside namespaces), on loopback."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from ipsecmgr.lab.topology import LabProcess, python_env


def test_server_and_client_programs(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"prog-secret\n")
    secret.chmod(0o644)  # too open: the server warns (and still runs)
    users = tmp_path / "users.json"
    users.write_text(json.dumps({"carol": {"password": "carol-pw", "avps": ["priv-lvl=7"]}}))
    cmd = [sys.executable, "-m", "ipsecmgr.lab.tacacs_server", "--listen", "127.0.0.1",
           "--listen", "::1", "--port", "0", "--secret-file", str(secret),
           "--users-file", str(users)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    server = LabProcess(proc, "tacacs-server")
    try:
        ports = {}
        for addr in ("127.0.0.1", "::1"):
            ev = server.wait_for(
                lambda e, a=addr: e.get("event") == "listening" and e["address"] == a
            )
            ports[addr] = ev["port"]
        assert "mode 0644" in server.events("warning")[0]["message"]

        def client(*args: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, object]]:
            r = subprocess.run(
                [sys.executable, "-m", "ipsecmgr.lab.tacacs_client", "--secret-file", str(secret),
                 *args], env=python_env(env), capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            return r.returncode, json.loads(r.stdout)

        code, out = client("--server", "::1", "--port", str(ports["::1"]), "--user", "carol",
                           "--password-env", "PW", "--authen-type", "ascii",
                           env={"PW": "carol-pw"})  # fmt: skip
        assert (code, out["status"]) == (0, "PASS")
        code, out = client("--server", "127.0.0.1", "--port", str(ports["127.0.0.1"]), "--user",
                           "carol", "--password-env", "PW", env={"PW": "nope"})  # fmt: skip
        assert (code, out["status"]) == (1, "FAIL")
        code, out = client("--server", "127.0.0.1", "--port", str(ports["127.0.0.1"]), "--user",
                           "carol", "--action", "authorize", "--arg", "service=shell")  # fmt: skip
        assert (code, out["args"]) == (0, ["priv-lvl=7"])
        code, out = client("--server", "127.0.0.1", "--port", str(ports["127.0.0.1"]), "--user",
                           "carol", "--password-env", "UNSET_VAR_X")  # fmt: skip
        assert code == 2 and "UNSET_VAR_X is not set" in str(out["error"])
        seen = [(t["kind"], t["method"], t["result"]) for t in server.transactions()]
        assert seen == [("authen", "ascii", "PASS"), ("authen", "pap", "FAIL"),
                        ("author", "", "PASS_ADD")]  # fmt: skip
        assert "carol-pw" not in json.dumps(server.events())
        proc.send_signal(signal.SIGTERM)
        server.wait_for(lambda e: e.get("event") == "stopped")
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
