"""Device-facing transports other than QUIC: Margo's own pull API and two push alternatives.

margo-stream's transport is QUIC; these servers exist so the bench can compare it, on
evidence, with what a fleet would otherwise use, each carrying the same signed desired state
and the same Margo status documents out of the same ``Store``:

- ``rest_poll``: Margo rc.3's Management Interface as published (devices poll
  ``GET /api/v1/deployments`` with ``If-None-Match``), HTTP/1.1 over mutual TLS.
- ``h2_push``: one long-lived HTTP/2 connection per device; the controller pushes each new
  desired state on a response stream the device keeps open.
- ``bench.transports.mqtt``: a Mosquitto broker plus a bridge task (lives in ``bench/``).

What they share: ``backend`` (the store side: desired state per device, status, capabilities,
last seen), ``margo_documents`` (validation of Margo's status and capability documents),
``http_messages`` (headers and JSON bodies), ``tls`` (mutual TLS and the peer's identity).
Errors are ``controller.problems.Problem``, rendered with ``DEVICE_PROBLEMS``.
"""
