"""ESP (RFC 4303) with AES-GCM (RFC 4106): a pure data-path library."""
