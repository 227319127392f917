"""TUN devices: where the kernel hands us the TACACS+ traffic (step 2) and
where decrypted packets go back (step 12).

python-pytun opens ``/dev/net/tun``; ``IFF_NO_PI`` matters, or every packet
carries a 4-byte packet-information header. The fd is non-blocking so the
data path can drain it in batches.
"""

from __future__ import annotations

import os

import pytun


class Tun:
    """One TUN device, up, with its fd non-blocking."""

    def __init__(self, name: str, mtu: int = 1400, *, multi_queue: bool = False) -> None:
        flags = pytun.IFF_TUN | pytun.IFF_NO_PI
        if multi_queue:
            flags |= pytun.IFF_MULTI_QUEUE
        self._dev = pytun.TunTapDevice(name=name, flags=flags)
        self.name: str = self._dev.name
        self._dev.mtu = mtu
        self._dev.up()
        self.fd: int = self._dev.fileno()
        os.set_blocking(self.fd, False)

    @property
    def mtu(self) -> int:
        return int(self._dev.mtu)

    def close(self) -> None:
        # Closing the last fd of a non-persistent TUN removes the device and its routes.
        self._dev.close()
