"""IpsecMgr: the gateway daemon, its CLI, control API, tracing and the netns lab."""
