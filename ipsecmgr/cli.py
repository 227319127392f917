"""The ``ipsecmgr`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ipsecmgr",
        description="Userspace IPsec gateway for TACACS+ (IKEv2 PSK, ESP AES-GCM).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    lab = sub.add_parser("lab", help="network-namespace lab (demo, up, down)")
    lab.add_argument("action", choices=["demo"], help="demo: run the built-in demonstration")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "lab" and args.action == "demo":
        from ipsecmgr.demo import run_demo

        return run_demo()
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
