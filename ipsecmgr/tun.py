"""TUN devices: where the kernel hands us the TACACS+ traffic (step 2) and
where decrypted packets go back (step 12).

python-pytun opens ``/dev/net/tun``; ``IFF_NO_PI`` matters, or every packet
carries a 4-byte packet-information header. The fd is non-blocking so the
data path can drain it in batches.

With ``offload`` the device is opened with ``IFF_VNET_HDR`` and told (ioctl
``TUNSETOFFLOAD``) that we take partial checksums and TCP segmentation
(TSO4/TSO6): the local TCP stack then hands us one up to 64 KiB TCP
"super-packet" per read, and we may write one back. From then on EVERY read
and write on the fd starts with the 10-byte ``struct virtio_net_hdr``
(linux/virtio_net.h; drivers/net/tun.c ``tun_get_user``/``tun_put_user``):
:attr:`Tun.vnet_hdr` says which framing the fd uses, and
:mod:`ipsecmgr.offload` builds and takes it apart.
"""

from __future__ import annotations

import fcntl
import logging
import os

import pytun

from ipsecmgr.offload import TUN_OFFLOADS

log = logging.getLogger("ipsecmgr.tun")

# linux/if_tun.h: #define TUNSETOFFLOAD _IOW('T', 208, unsigned int)
TUNSETOFFLOAD = 0x400454D0


class Tun:
    """One TUN device, up, with its fd non-blocking."""

    def __init__(
        self, name: str, mtu: int = 1400, *, multi_queue: bool = False, offload: bool = False
    ) -> None:
        flags = pytun.IFF_TUN | pytun.IFF_NO_PI
        if multi_queue:
            flags |= pytun.IFF_MULTI_QUEUE
        #: Every read and write on :attr:`fd` carries a virtio_net_hdr (offload on).
        self.vnet_hdr = False
        dev = self._open_offload(name, flags) if offload else None
        self._dev = dev if dev is not None else pytun.TunTapDevice(name=name, flags=flags)
        self.name: str = self._dev.name
        self._dev.mtu = mtu
        self._dev.up()
        self.fd: int = self._dev.fileno()
        os.set_blocking(self.fd, False)

    def _open_offload(self, name: str, flags: int) -> pytun.TunTapDevice | None:
        """The device with IFF_VNET_HDR and TSO, or None (one warning) if the kernel refuses."""
        try:
            dev = pytun.TunTapDevice(name=name, flags=flags | pytun.IFF_VNET_HDR)
        except pytun.Error as exc:
            log.warning("TUN %s: IFF_VNET_HDR refused (%s); running without TUN offload", name, exc)
            return None
        try:
            fcntl.ioctl(dev.fileno(), TUNSETOFFLOAD, TUN_OFFLOADS)
        except OSError as exc:
            log.warning("TUN %s: TUNSETOFFLOAD refused (%s); running without TUN offload",
                        name, exc)  # fmt: skip
            dev.close()  # non-persistent: the device goes, and is opened again without
            return None
        self.vnet_hdr = True
        return dev

    @property
    def mtu(self) -> int:
        return int(self._dev.mtu)

    def close(self) -> None:
        # Closing the last fd of a non-persistent TUN removes the device and its routes.
        self._dev.close()
