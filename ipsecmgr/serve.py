"""``ipsecmgr run``: the daemon process around the :class:`~ipsecmgr.daemon.Gateway`.

Start-up order: the configuration, the instance lock (a second daemon changes
nothing), the Gateway's and the TLS service's set-up (fail-closed routes first,
then sockets, TUNs, routes; least privilege), then one asyncio loop: the control
socket, the metrics exporter, the signal handlers (SIGTERM/SIGINT stop, SIGHUP
reloads), the collector frozen and its thresholds raised, READY=1 to systemd.
SIGTERM sends DELETE to every peer and removes the TUNs, leaving the fail-closed
block in place unless ``[gateway] on_stop = "clear"``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from pathlib import Path
from typing import TYPE_CHECKING

from ipsecmgr import config as cfg
from ipsecmgr import sdnotify
from ipsecmgr.control import ControlServer
from ipsecmgr.daemon import Gateway, tun_layout, validate_acl
from ipsecmgr.failclosed import InstanceLock
from ipsecmgr.tls.service import TlsService

if TYPE_CHECKING:
    from ipsecmgr.metrics import MetricsServer

log = logging.getLogger("ipsecmgr")

SHUTDOWN_GRACE = 1.0  # seconds SIGTERM waits for the peers to answer our DELETEs
# The collector's thresholds once up (as the split data path's workers): a
# handshake allocates a few hundred objects, and with 10,000 peers' SAs alive
# the default (700, 10, 10) made collections a third of a restart storm's cost
# (tools/bench/ike_scale.py, docs/performance.md "Many peers").
GC_THRESHOLDS = (50_000, 50, 100)


async def serve(gw: Gateway, config_path: str, tls: TlsService | None = None) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    gw.attach(loop)
    handlers = gw.handlers() | (tls.handlers() if tls is not None else {})
    control = ControlServer(Path(gw.config.gateway.control_socket), handlers)
    notify = sdnotify.Notifier.from_environ()
    exporter: MetricsServer | None = None
    try:
        await control.start()
        if tls is not None:
            await tls.start()  # [tls_map]: transparent and explicit listeners accept
        if gw.config.metrics is not None:
            from ipsecmgr import metrics  # prometheus-client only when configured

            exporter = await metrics.serve(gw, gw.config.metrics, tls)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, _reload_notified, gw, config_path, notify, tls)
        # Start-up objects (config, pyroute2, asyncio, modules) live as long as we do:
        # out of the collector's reach, every full collection no longer walks them
        # (the handshakes allocate enough to trigger collections; see
        # docs/performance.md, IKE responder).
        gc.collect()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        print("ready", flush=True)
        notify.ready(gw.status_line())  # TUNs, routes, sockets up; tunnels come on demand
        notify.start_periodic(loop, gw.status_line)  # WATCHDOG=1 from this loop
        await stop.wait()
        notify.stopping()
        log.info("shutting down: deleting SAs, removing TUNs, routes and rules")
        await gw.delete_all(SHUTDOWN_GRACE)
    finally:
        gw.tracer.close_all()
        if tls is not None:
            await tls.close()
        gw.detach()
        if exporter is not None:
            await exporter.close()
        await control.close()
        notify.close()
    return 0


def _reload_notified(
    gw: Gateway, config_path: str, notify: sdnotify.Notifier, tls: TlsService | None = None
) -> None:
    """SIGHUP under systemd: RELOADING=1 (with MONOTONIC_USEC) around the reload."""
    notify.reloading()
    try:
        _reload(gw, config_path, tls)
    finally:
        notify.ready(gw.status_line())


def _reload(gw: Gateway, config_path: str, tls: TlsService | None = None) -> None:
    try:
        config = cfg.load_config(config_path, validate_acl=validate_acl)
    except cfg.ConfigError as exc:
        log.error("reload refused, keeping the running configuration: %s", exc)
        return
    for w in config.warnings:
        log.warning("%s", w)
    if (
        tls is None
        or config.tls_maps == gw.config.tls_maps
        or (tun_layout(config) != tun_layout(gw.config) or config.gateway != gw.config.gateway)
    ):
        gw.reload(config)  # (refuses TUN and gateway changes itself, with a warning)
        return
    task = asyncio.get_running_loop().create_task(_reload_with_tls(gw, tls, config))
    _RELOADS.add(task)  # the loop keeps only a weak reference to a task
    task.add_done_callback(_RELOADS.discard)


_RELOADS: set[asyncio.Task[None]] = set()


async def _reload_with_tls(gw: Gateway, tls: TlsService, config: cfg.Config) -> None:
    """[tls_map] changes: the new captures first, then the crypto maps, then the
    captures no longer configured go. A server moved between a crypto map and a TLS
    map (either way) is protected by one or the other at every instant."""
    try:
        await tls.reload_begin(config)
    except Exception as exc:  # a bind or netlink failure: nothing of the new config applies
        log.error("reload refused, keeping the running configuration: %s", exc)
        await tls.reload_abort()
        return
    gw.reload(config)
    await tls.reload_end()


def run(config_path: str) -> int:
    config = cfg.load_config(config_path, validate_acl=validate_acl)
    for w in config.warnings:
        log.warning("%s", w)
    gw = Gateway(config)
    gw.least_privilege = True
    lock = InstanceLock(gw.routing.table)
    try:
        lock.acquire()  # before touching anything: a second instance changes nothing
    except BaseException:
        gw.routing.close()
        raise
    # [tls_map]: TACACS+ over TLS 1.3 (ipsecmgr.tls); routes in the gateway's table.
    r = gw.routing
    tls = TlsService(config, table=r.table, priority=r.priority, mark=r.mark)
    gw.tracer.targets.append(tls)
    try:
        gw.setup()
        tls.setup()
        return asyncio.run(serve(gw, config_path, tls))
    finally:
        tls.teardown()
        gw.teardown()
        lock.release()
