"""margo-stream: a mutual-TLS QUIC control channel for Margo edge fleets."""

__version__ = "0.1.0"
