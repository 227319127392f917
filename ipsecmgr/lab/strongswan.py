"""strongSwan as an independent IKEv2/ESP peer, one ``charon`` per network namespace.

The reference implementation for interop tests and benchmarks. It does what
the shell launcher of the interop notes does, in Python and with PIDs tracked:

- this kernel has no ESP xfrm, so ESP is done in user space by the
  ``kernel-libipsec`` plugin (a TUN ``ipsec0`` and routing table 220);
- each charon reads its own ``strongswan.conf`` (``STRONGSWAN_CONF``) with an
  explicit plugin ``load`` list, so nothing in /etc/strongswan.d applies;
- charon's pid file is hard-coded as /var/run/charon.pid, so each instance runs
  in its own mount namespace (``unshare --mount``) with ``<dir>/run`` bound on
  /run; every step ``exec``s, so the PID we hold is charon's own;
- the vici socket is ``<dir>/charon.vici`` (a path on the shared filesystem:
  swanctl works from any namespace with ``--uri``);
- IKE and ESP-in-UDP packets carry fwmark 0x4500 and skip table 220, so the
  traffic selectors may include the peer's own address (transport-like TS);
- the PSK goes into swanctl.conf as hex (any bytes), in a 0600 file in a 0700
  directory, and never on a command line.

Bookworm's strongSwan 5.9.8 sends ESP only inside UDP 4500 (it fakes a NAT);
with ``root=`` pointing at a newer strongSwan in a chroot, ``raw_esp=True``
gives IP protocol 50. Transport mode is refused by libipsec.

Usage::

    peer = StrongSwanPeer(ns, state_dir)
    peer.start(local="198.51.100.2", remote="198.51.100.1", psk=Secret(b"..."),
               local_ts="203.0.113.0/24", remote_ts="192.0.2.0/24")
    peer.initiate(); peer.list_sas(); peer.stop()
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ipsecmgr.netns import Netns, NetnsPool
from ipsecmgr.secret import Secret, SecretError, read_secret_file

CHARON = "/usr/lib/ipsec/charon"
PLUGINS = (
    "random nonce openssl aes gcm sha1 sha2 hmac kdf curve25519 gmp pem pkcs1 x509 pubkey "
    "kernel-libipsec kernel-netlink socket-default vici"
)
# Runs inside `ip netns exec NS unshare --mount --propagation private`: $1 is the
# state dir, $2 an optional chroot. /run becomes <dir>/run (private pid file).
_LAUNCH = r"""
d=$1 r=$2
if [ -n "$r" ]; then
  mkdir -p "$r$d" && mount --bind "$d" "$r$d" && mount --bind /dev "$r/dev" &&
    mount --bind /sys "$r/sys" && mount -t proc proc "$r/proc" || exit 1
fi
mount --bind "$d/run" "$r/run" || exit 1
export STRONGSWAN_CONF="$d/strongswan.conf"
if [ -n "$r" ]; then exec chroot "$r" "$3"; else exec "$3"; fi
"""


def pid_alive(pid: int) -> bool:
    """True if ``pid`` runs and is not a zombie."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    state = next((ln.split()[1] for ln in status.splitlines() if ln.startswith("State:")), "Z")
    return state != "Z"


class StrongSwanError(RuntimeError):
    """charon did not start, swanctl failed, or an initiate did not complete."""


@dataclass
class PeerOptions:
    """The launcher's ``start`` options (defaults as there)."""

    ike: str = "aes256gcm16-prfsha256-modp2048"
    esp: str = "aes256gcm16"
    mode: str = "tunnel"
    local_ts: str | None = None  # default: the local address
    remote_ts: str | None = None  # default: the remote address
    local_id: str | None = None
    remote_id: str | None = None  # "%any" suppresses INITIAL_CONTACT
    dpd_delay: str = "0"
    dpd_action: str = "clear"
    ike_rekey: str = "4h"
    esp_rekey: str = "1h"
    retransmit_tries: int = 5
    retransmit_timeout: float = 4.0
    retransmit_base: float = 1.8
    charon_opts: Sequence[str] = ()  # verbatim lines in charon { }
    conn_opts: Sequence[str] = ()  # verbatim lines in the connection
    child_opts: Sequence[str] = ()  # verbatim lines in the child
    # PSKs bound to identities (one per direction). strongSwan signs with the key
    # whose id is the *peer's* and verifies with any that matches (see the interop tests).
    psks_by_id: Sequence[tuple[str, Secret]] = field(default=(), repr=False)
    raw_esp: bool = False
    root: Path | None = None  # chroot with a newer strongSwan
    # charon.log: None = the lab's debug levels (default 1; ike, cfg, knl 2), which the
    # tests read; a number sets every subsystem to it (-1 silent, 0 basic: a benchmark)
    log_level: int | None = None


@dataclass
class StrongSwanPeer:
    """One charon in one namespace; state (configs, log, vici socket) in ``state_dir``."""

    ns: Netns
    state_dir: Path
    proc: subprocess.Popen[str] | None = field(default=None, repr=False)

    @property
    def uri(self) -> str:
        return f"unix://{self.state_dir}/charon.vici"

    @property
    def log_path(self) -> Path:
        return self.state_dir / "charon.log"

    @property
    def pid(self) -> int | None:
        """Our charon's PID: the process we started, or (from another process, e.g.
        the command line) the one the pid file names, if it is really ours."""
        if self.proc is not None:
            return self.proc.pid if self.proc.poll() is None else None
        return self.find_pid()

    def find_pid(self) -> int | None:
        """PID from ``run/charon.pid``, checked: comm is charon, environment names our config."""
        try:
            pid = int((self.state_dir / "run" / "charon.pid").read_text().strip())
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return None
        want = f"STRONGSWAN_CONF={self.state_dir}/strongswan.conf".encode()
        if comm != "charon" or want not in environ or not pid_alive(pid):
            return None
        return pid

    # ------------------------------------------------------------ config

    def write_config(self, local: str, remote: str, psk: Secret, o: PeerOptions) -> None:
        d = self.state_dir
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o700)
        (d / "run").mkdir(exist_ok=True)
        strongswan_conf = self._strongswan_conf(o)
        swanctl_conf = self._swanctl_conf(local, remote, psk, o)
        (d / "strongswan.conf").write_text(strongswan_conf)
        fd = os.open(d / "swanctl.conf", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(swanctl_conf)

    def _strongswan_conf(self, o: PeerOptions) -> str:
        """charon's settings: plugins, retransmission, the vici socket, the log."""
        copts = "".join(f"  {line}\n" for line in o.charon_opts)
        levels = (
            "default = 1\n          ike = 2\n          cfg = 2\n          knl = 2"
            if o.log_level is None
            else f"default = {o.log_level}"
        )
        return f"""charon {{
  load = {PLUGINS}
  retransmit_tries = {o.retransmit_tries}
  retransmit_timeout = {o.retransmit_timeout}
  retransmit_base = {o.retransmit_base}
{copts}  plugins {{
    vici {{ socket = {self.uri} }}
    # IKE/ESP-in-UDP packets carry mark 0x4500 and skip routing table 220 (the
    # TUN routes), so traffic selectors may include the peer's own address
    socket-default {{ fwmark = 0x4500 }}
    kernel-netlink {{ fwmark = !0x4500 }}
    kernel-libipsec {{ allow_peer_ts = yes
                      raw_esp = {"yes" if o.raw_esp else "no"} }}
  }}
  filelog {{
    log {{ path = {self.log_path}
          time_format = %H:%M:%S
          time_add_ms = yes
          flush_line = yes
          {levels} }}
  }}
  syslog {{ daemon {{ default = -1 }} }}
}}
"""

    def _swanctl_conf(self, local: str, remote: str, psk: Secret, o: PeerOptions) -> str:
        """The connection, its child and the pre-shared key(s) (written 0600)."""
        kopts = "".join(f"    {line}\n" for line in o.conn_opts)
        chopts = "".join(f"        {line}\n" for line in o.child_opts)
        secrets = f"  ike-psk {{ secret = 0x{psk.reveal().hex()} }}\n"
        if o.psks_by_id:
            secrets = "".join(
                f"  ike-{i} {{ id = {ident}\n           secret = 0x{key.reveal().hex()} }}\n"
                for i, (ident, key) in enumerate(o.psks_by_id)
            )
        return f"""connections {{
  peer {{
    version = 2
    local_addrs = {local}
    remote_addrs = {remote}
    proposals = {o.ike}
    dpd_delay = {o.dpd_delay}
    rekey_time = {o.ike_rekey}
{kopts}    local {{ auth = psk
            id = {o.local_id or local} }}
    remote {{ auth = psk
             id = {o.remote_id or remote} }}
    children {{
      child {{
        mode = {o.mode}
        local_ts = {o.local_ts or local}
        remote_ts = {o.remote_ts or remote}
        esp_proposals = {o.esp}
        rekey_time = {o.esp_rekey}
        dpd_action = {o.dpd_action}
{chopts}      }}
    }}
  }}
}}
secrets {{
{secrets}}}
"""

    # ------------------------------------------------------------ lifecycle

    def start(
        self,
        *,
        local: str,
        remote: str,
        psk: Secret,
        options: PeerOptions | None = None,
        initiate: bool = False,
        timeout: float = 10.0,
    ) -> None:
        """Write the configs, start charon, load the connection; optionally initiate."""
        if self.pid is not None:
            raise StrongSwanError(f"a charon already runs for {self.ns.name} (pid {self.pid})")
        o = options or PeerOptions()
        self.write_config(local, remote, psk, o)
        out = open(self.state_dir / "charon.out", "wb")  # noqa: SIM115 (handed to the child)
        try:
            self.proc = self.ns.popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c", _LAUNCH, "sh",
                 str(self.state_dir), str(o.root or ""), CHARON],
                stdout=out.fileno(), stderr=subprocess.STDOUT,
            )  # fmt: skip
        finally:
            out.close()
        deadline = time.monotonic() + timeout
        while self.swanctl("--stats", check=False).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = (self.state_dir / "charon.out").read_text(errors="replace")[-2000:]
                self.stop()
                raise StrongSwanError(f"charon for {self.ns.name} did not come up: {tail}")
            time.sleep(0.05)  # polling the vici socket: charon has no readiness signal
        self.swanctl("--load-all", "--file", str(self.state_dir / "swanctl.conf"))
        if initiate:
            self.initiate()

    def swanctl(
        self, *args: str, check: bool = True, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """Any swanctl command against this instance (the vici socket is a file path)."""
        proc = subprocess.run(
            ["swanctl", *args, "--uri", self.uri], capture_output=True, text=True,
            timeout=timeout, check=False,
        )  # fmt: skip
        if check and proc.returncode != 0:
            raise StrongSwanError(
                f"swanctl {' '.join(args)}: exit {proc.returncode}: "
                f"{proc.stdout[-1500:]}{proc.stderr}"
            )
        return proc

    def initiate(self, timeout: int = 20) -> None:
        """(Re)initiate the child SA ``child`` of connection ``peer``."""
        r = self.swanctl(
            "--initiate",
            "--child",
            "child",
            "--timeout",
            str(timeout),
            check=False,
            timeout=timeout + 10,
        )
        if r.returncode != 0:
            raise StrongSwanError(f"initiate failed (log: {self.log_path}): {r.stdout[-1500:]}")

    def list_sas(self) -> str:
        return self.swanctl("--list-sas").stdout

    def stop(self, *, kill: bool = False, grace: float = 5.0) -> None:
        """SIGTERM (or SIGKILL, a crash for DPD tests) our charon by PID, then clean up."""
        sig = signal.SIGKILL if kill else signal.SIGTERM
        p = self.proc
        if p is not None and p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, sig)
            try:
                p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
                p.wait(timeout=5)
        elif p is None and (pid := self.find_pid()) is not None:
            # Started by another process (the command line): not our child, so
            # poll /proc until it is gone (its parent, init, reaps it).
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            deadline = time.monotonic() + grace
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        # A killed charon leaves its policy rule to table 220 behind (its TUN goes away).
        for fam in ("-4", "-6"):
            subprocess.run(["ip", "-n", self.ns.name, fam, "rule", "del", "table", "220"],
                           capture_output=True, check=False)  # fmt: skip
        with contextlib.suppress(FileNotFoundError):
            (self.state_dir / "run" / "charon.pid").unlink()


# ---------------------------------------------------------------- command line


def state_dir_for(netns: str) -> Path:
    """``${STRONGSWAN_PEER_DIR:-${TMPDIR:-/tmp}/strongswan-peer}/NETNS``, as the shell launcher."""
    base = os.environ.get("STRONGSWAN_PEER_DIR") or os.path.join(
        os.environ.get("TMPDIR", "/tmp"), "strongswan-peer"
    )
    return Path(base) / netns


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ipsecmgr.lab.strongswan",
        description="run an isolated strongSwan charon (IKEv2 PSK, kernel-libipsec) in a netns",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("start")
    st.add_argument("netns")
    st.add_argument("--local", required=True)
    st.add_argument("--remote", required=True)
    st.add_argument("--psk-file", type=Path, required=True)
    d = PeerOptions()
    for opt in ("ike", "esp", "mode", "local_ts", "remote_ts", "local_id", "remote_id",
                "dpd_delay", "dpd_action", "ike_rekey", "esp_rekey"):  # fmt: skip
        st.add_argument("--" + opt.replace("_", "-"), dest=opt, default=getattr(d, opt))
    st.add_argument("--retransmit-tries", type=int, default=d.retransmit_tries)
    st.add_argument("--retransmit-timeout", type=float, default=d.retransmit_timeout)
    st.add_argument("--retransmit-base", type=float, default=d.retransmit_base)
    st.add_argument("--charon-opt", action="append", default=[])
    st.add_argument("--conn-opt", action="append", default=[])
    st.add_argument("--raw-esp", action="store_true")
    st.add_argument("--root", type=Path)
    st.add_argument("--initiate", action="store_true")
    sp = sub.add_parser("stop")
    sp.add_argument("netns")
    sp.add_argument("--kill", action="store_true", help="SIGKILL (a crash, for DPD tests)")
    for name in ("status", "initiate", "dir"):
        sub.add_parser(name).add_argument("netns")
    sw = sub.add_parser("swanctl")
    sw.add_argument("netns")
    sw.add_argument("args", nargs=argparse.REMAINDER)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The shell launcher's commands: start, stop, status, initiate, swanctl, dir."""
    a = _parser().parse_args(argv)
    if not Path("/run/netns", a.netns).exists():
        print(f"strongswan: netns {a.netns} does not exist", file=sys.stderr)
        return 1
    # A throwaway pool: charon must outlive this command, which only records its PID file.
    peer = StrongSwanPeer(Netns(a.netns, NetnsPool()), state_dir_for(a.netns))
    try:
        if a.cmd == "start":
            psk, warnings = read_secret_file(a.psk_file)
            for w in warnings:
                print(f"strongswan: warning: {w}", file=sys.stderr)
            opts = PeerOptions(
                ike=a.ike, esp=a.esp, mode=a.mode, local_ts=a.local_ts, remote_ts=a.remote_ts,
                local_id=a.local_id, remote_id=a.remote_id, dpd_delay=a.dpd_delay,
                dpd_action=a.dpd_action, ike_rekey=a.ike_rekey, esp_rekey=a.esp_rekey,
                retransmit_tries=a.retransmit_tries, retransmit_timeout=a.retransmit_timeout,
                retransmit_base=a.retransmit_base, charon_opts=a.charon_opt,
                conn_opts=a.conn_opt, raw_esp=a.raw_esp, root=a.root,
            )  # fmt: skip
            if peer.find_pid() is not None:
                raise StrongSwanError(
                    f"a charon already runs for {a.netns} (pid {peer.find_pid()})"
                )
            peer.start(local=a.local, remote=a.remote, psk=psk, options=opts)
            print(f"charon for {a.netns}: pid {peer.pid}, state {peer.state_dir}")
            if a.initiate:
                peer.initiate()
                print("tunnel up")
        elif a.cmd == "stop":
            peer.stop(kill=a.kill)
        elif a.cmd == "status":
            print(peer.list_sas(), end="")
        elif a.cmd == "initiate":
            peer.initiate()
            print("tunnel up")
        elif a.cmd == "swanctl":
            r = peer.swanctl(*a.args, check=False)
            print(r.stdout, end="")
            print(r.stderr, end="", file=sys.stderr)
            return r.returncode
        else:
            print(peer.state_dir)
    except (StrongSwanError, SecretError) as e:
        print(f"strongswan: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
