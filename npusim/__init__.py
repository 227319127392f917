"""NPUSIM: ACL classification, crypto-map verdicts and the SA-flow table."""
