"""``ipsecmgr demo esp``: one TCP SYN through ESP tunnel mode, shown by scapy.

A self-contained look at step 7 and step 10 of the reference's packet flow,
without namespaces or root: the SYN a TACACS+ client sends to port 49 is
encapsulated by :class:`esp.OutboundSA`, dissected by scapy as it would appear
on the wire, and decapsulated again by :class:`esp.InboundSA`. scapy's own
``SecurityAssociation`` decrypts our packet too, an independent check.
"""

from __future__ import annotations

import os

import esp

SERVER = "203.0.113.49"  # TACACS+ server behind the responder
SRC_IP = "192.0.2.1"  # the reserved tunnel-mode source (src_ip)
LOCAL = "198.51.100.1"  # our gateway's outer address
PEER = "198.51.100.2"  # the responder


def run_esp_demo() -> int:
    from scapy.layers.inet import IP, TCP
    from scapy.layers.ipsec import ESP, SecurityAssociation

    spi = 0xC0DE0001
    key = os.urandom(36)  # AES-256 key ‖ 4-byte salt, as IKEv2 would derive it
    syn = IP(src=SRC_IP, dst=SERVER) / TCP(sport=40000, dport=49, flags="S", seq=1000)
    inner = bytes(syn)

    print("== step 2: the SYN as read from the TUN ==")
    syn.show2()

    out = esp.OutboundSA(spi, key, mode="tunnel")
    wire = IP(src=LOCAL, dst=PEER, proto=50) / out.encapsulate(inner, 4)
    print("\n== step 7: on the wire (ESP, AES-GCM-16/256, tunnel mode) ==")
    IP(bytes(wire)).show2()

    print("\n== scapy's SecurityAssociation decrypts it (independent check) ==")
    sa = SecurityAssociation(ESP, spi=spi, crypt_algo="AES-GCM", crypt_key=key)  # type: ignore[no-untyped-call]
    print(sa.decrypt(IP(bytes(wire))).summary())  # type: ignore[no-untyped-call]

    inb = esp.InboundSA(spi, key, mode="tunnel")
    payload, next_header = inb.decapsulate(bytes(wire)[20:])
    print(f"\n== step 10: decapsulated by our InboundSA (next header {next_header}) ==")
    IP(payload).show2()
    assert payload == inner, "decapsulated packet differs from the original"
    print(f"\nround trip OK: {len(inner)}-byte SYN → {len(wire)}-byte ESP packet → same SYN")
    return 0
