"""IKEv2 (RFC 7296) with PSK authentication: a sans-I/O engine."""
