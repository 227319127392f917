"""The ``ipsecmgr`` command line.

    ipsecmgr run --config FILE [-v|-vv]        the gateway daemon (root)
    ipsecmgr check-config FILE                 validate without touching the system
    ipsecmgr import-staros FILE -o OUT.toml    convert a StarOS configuration, with a report
    ipsecmgr down [--config FILE]              remove what a stopped/crashed daemon left
    ipsecmgr show crypto map [--json]          and the reference's other show commands
    ipsecmgr clear crypto sa [--peer ADDR]     DELETE SAs (all, or one peer's)
    ipsecmgr trace [--follow] [--filter K=V]   packet-flow trace of a running daemon
    ipsecmgr lab demo                          the netns lab: a TACACS+ login through the tunnel
    ipsecmgr esp-demo                          one SYN through ESP, dissected by scapy (no root)

Pre-shared keys are never taken from the command line: the configuration
names a file or an environment variable for each.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ipsecmgr.config import DEFAULT_CONTROL_SOCKET

SHOW_HELP = """\
show commands (as in the StarOS reference):
  crypto map
  crypto ikev2-ikesa security-associations [summary]
  crypto ipsec security-associations [summary]
  crypto statistics
  tacacs tls
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ipsecmgr",
        description="Userspace IPsec gateway for TACACS+ (IKEv2 PSK, ESP AES-GCM, NAT-T).",
        epilog="Run 'ipsecmgr COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    _add_run(sub)

    check = sub.add_parser("check-config", help="validate a configuration file and exit")
    check.add_argument("config", type=Path)

    _add_show_clear(sub)

    from ipsecmgr.trace.cli import add_arguments as add_trace_arguments

    trace = sub.add_parser(
        "trace",
        help="packet-flow trace: the reference's steps per flow (live or from a file)",
        epilog="Steps 1, 6, 11 and 13 are inferred from the packets (see docs/trace.md).",
    )
    add_trace_arguments(trace)

    _add_lab(sub)

    for name in ("down", "cleanup"):
        down = sub.add_parser(
            name,
            help="remove what a stopped or crashed daemon left (the fail-closed block too)"
            if name == "down"
            else "same as down",
        )
        down.add_argument(
            "--config", "-c", type=Path, help="also remove its TUNs and stale control socket"
        )

    sub.add_parser("esp-demo", help="one SYN through ESP tunnel mode, shown by scapy (no root)")

    from ipsecmgr.staros.cli import add_arguments as add_staros_arguments

    add_staros_arguments(
        sub.add_parser(
            "import-staros",
            help="convert a StarOS configuration (the reference's) into TOML, with a report",
            description="Read a StarOS configuration and write the equivalent TOML, the "
            "plain-text pre-shared keys into 0600 files beside it, and a report of every "
            "line that has no equivalent or needs a decision.",
        )
    )
    return parser


def _add_run(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = sub.add_parser("run", help="run the gateway daemon (as root)")
    run.add_argument("--config", "-c", required=True, type=Path, help="TOML configuration file")
    run.add_argument(
        "-v", "--verbose", action="count", default=0, help="-v: IKE exchanges, -vv: debug"
    )


def _add_show_clear(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    for name, helptext in (("show", "show state of a running daemon"), ("clear", "clear SAs")):
        p = sub.add_parser(
            name,
            help=helptext,
            epilog=SHOW_HELP if name == "show" else None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument(
            "words", nargs="+", help="e.g. 'crypto map'" if name == "show" else "crypto sa"
        )
        p.add_argument(
            "--socket", type=Path, default=DEFAULT_CONTROL_SOCKET, help="daemon control socket"
        )
        if name == "show":
            p.add_argument("--json", action="store_true", help="machine-readable output")
        else:
            p.add_argument("--peer", help="only the SAs with this peer address")


def _add_lab(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    lab = sub.add_parser("lab", help="network-namespace lab (root)")
    lab.add_argument(
        "action",
        choices=["demo", "up", "down"],
        help="demo: build, run a TACACS+ login, tear down; up: build and leave it; down: remove",
    )
    lab.add_argument(
        "--state", type=Path, default=Path("/run/ipsecmgr-lab"), help="state directory (up/down)"
    )
    lab.add_argument(
        "--mode", choices=["tunnel", "transport", "tls"], default="tunnel",
        help="tls: the client's gateway protects the server by TLS 1.3 (RFC 9887), not ESP",
    )  # fmt: skip
    lab.add_argument(
        "--tls-pki", type=Path, default=None,
        help="--mode tls: use this PKI (ca.crt server.crt server.key client.crt client.key)",
    )  # fmt: skip
    lab.add_argument("--first-packet", choices=["drop", "queue"], default="drop")


def _version() -> str:
    """The installed distribution's version (package metadata, not a copy in the code)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ipsecmgr")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _cmd_check_config(path: Path) -> int:
    from ipsecmgr.config import diagnose_config
    from ipsecmgr.daemon import validate_acl

    diag = diagnose_config(path, validate_acl=validate_acl)
    for w in diag.warnings:
        print(f"warning: {w}", file=sys.stderr)
    for e in diag.errors:
        print(f"error: {e}", file=sys.stderr)
    if diag.errors:
        print(f"{path}: {len(diag.errors)} error(s)", file=sys.stderr)
        return 1
    print(f"{path}: OK")
    return 0


def _cmd_show(words: Sequence[str], socket_path: Path, as_json: bool) -> int:
    from ipsecmgr.control import ControlError
    from ipsecmgr.show import show
    from ipsecmgr.tls.show import COMMAND as TLS_COMMAND
    from ipsecmgr.tls.show import show_tls

    try:
        if " ".join(words) == TLS_COMMAND:
            print(show_tls(socket_path, as_json=as_json))
        else:
            print(show(socket_path, " ".join(words), as_json=as_json))
    except ValueError as exc:
        print(f"ipsecmgr show: {exc}", file=sys.stderr)
        return 2
    except ControlError as exc:
        print(f"ipsecmgr show: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_clear(words: Sequence[str], socket_path: Path, peer: str | None) -> int:
    from ipsecmgr.control import ControlError, request

    if " ".join(words) != "crypto sa":
        print("ipsecmgr clear: only 'clear crypto sa [--peer ADDR]' exists", file=sys.stderr)
        return 2
    try:
        response = request(socket_path, {"command": "clear", "peer": peer})
    except ControlError as exc:
        print(f"ipsecmgr clear: {exc}", file=sys.stderr)
        return 1
    if not response.get("ok"):
        print(f"ipsecmgr clear: {response.get('error')}", file=sys.stderr)
        return 1
    print(f"deleted {response['result']['cleared']} IKE SA(s)")
    return 0


def _cmd_down(path: Path | None) -> int:
    from ipsecmgr.failclosed import down

    config = None
    if path is not None:
        from ipsecmgr.config import ConfigError, load_config
        from ipsecmgr.daemon import validate_acl

        try:
            config = load_config(path, validate_acl=validate_acl)
        except ConfigError as exc:
            print(f"ipsecmgr down: {exc}", file=sys.stderr)
            return 1
    code, lines = down(config)
    for line in lines:
        print(line, file=sys.stderr if code else sys.stdout)
    return code


def _run_profiled(run: Callable[[str], int], config: str) -> int:
    """``run(config)``, under cProfile if ``IPSECMGR_PROFILE=PATH`` is set: the stats go
    to ``PATH.<pid>`` when the daemon exits (tools/bench/tunnel.py --profile uses it)."""
    path = os.environ.get("IPSECMGR_PROFILE")
    if not path:
        return run(config)
    import cProfile

    prof = cProfile.Profile()
    try:
        return prof.runcall(run, config)
    finally:
        prof.dump_stats(f"{path}.{os.getpid()}")


def _cmd_run(args: argparse.Namespace) -> int:
    from ipsecmgr.config import ConfigError
    from ipsecmgr.control import ControlError
    from ipsecmgr.failclosed import AlreadyRunning
    from ipsecmgr.serve import run

    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(
        level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr
    )
    try:
        return _run_profiled(run, str(args.config))
    except ConfigError as exc:
        print(f"ipsecmgr: {exc}", file=sys.stderr)
        return 1
    except ControlError as exc:
        print(f"ipsecmgr: control socket: {exc}", file=sys.stderr)
        return 1
    except PermissionError as exc:
        print(f"ipsecmgr: {exc} (the daemon needs root)", file=sys.stderr)
        return 1
    except AlreadyRunning as exc:
        print(f"ipsecmgr: {exc}", file=sys.stderr)
        return 1


def _cmd_lab(args: argparse.Namespace) -> int:
    if args.mode == "tls" and args.action in ("up", "demo"):
        from ipsecmgr.lab.tls_lab import run_tls_demo, tls_lab_up

        if args.action == "up":
            return tls_lab_up(args.state, args.tls_pki)
        return run_tls_demo(args.tls_pki)
    if args.action in ("up", "down"):
        from ipsecmgr.lab.persist import lab_down, lab_up

        return lab_up(args.mode, args.state) if args.action == "up" else lab_down(args.state)
    from ipsecmgr.lab.demo import run_lab_demo

    return run_lab_demo(mode=args.mode, first_packet=args.first_packet)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "run":
        return _cmd_run(args)
    if args.command in ("down", "cleanup"):
        return _cmd_down(args.config)
    if args.command == "check-config":
        return _cmd_check_config(args.config)
    if args.command == "show":
        return _cmd_show(args.words, args.socket, args.json)
    if args.command == "clear":
        return _cmd_clear(args.words, args.socket, args.peer)
    if args.command == "trace":
        from ipsecmgr.trace.cli import run_trace

        return run_trace(args)
    if args.command == "lab":
        return _cmd_lab(args)
    if args.command == "import-staros":
        from ipsecmgr.staros.cli import run_import

        return run_import(args)
    if args.command == "esp-demo":
        from ipsecmgr.demo import run_esp_demo

        return run_esp_demo()
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
