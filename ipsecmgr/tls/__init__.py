"""TACACS+ over TLS 1.3 (RFC 9887) as a second protection, next to ESP.

``[tls_map.NAME]`` selects flows with an access list, as a crypto map does; the
gateway terminates the client's TCP connection locally (transparently, by a
``local`` route for the protected server addresses, or on an explicit
``listen`` address), removes the client's TACACS+ obfuscation and carries the
packets over mutually authenticated TLS 1.3 to the first reachable upstream
server. See docs/tls.md.

Modules: :mod:`.config` (the section's parser), :mod:`.files` (key file
permissions), :mod:`.upstream` (server pool: priority order, hold-down,
sessions), :mod:`.tlsconn` (TLS over asyncio streams with session reuse),
:mod:`.proxy` (listeners and the per-connection relay), :mod:`.capture`
(``local`` routes and transparent listeners), :mod:`.service` (what the daemon
starts), :mod:`.show` (``show tacacs tls``).
"""
