"""What ``margoctl`` signs on the operator's machine before anything reaches the controller."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from margo_stream.errors import ConfigError
from margo_stream.identity.authored import sign_deployment
from margo_stream.identity.operator_files import OperatorCredentials
from margo_stream.state.digest import sha256_digest
from margo_stream.state.documents import parse_deployment
from margo_stream.state.yaml_split import split_documents


def sign_documents(texts: Sequence[str], creds: OperatorCredentials) -> dict[str, dict[str, Any]]:
    """A signature by the operator's key over each document of ``texts``, as the controller
    will cut and store them (document digest -> signature envelope)."""
    if creds.key is None or creds.tenant is None:
        raise ConfigError(
            "applying signs each document with the operator's key: use --operator DIR, or a "
            "token file with operator.key and operator.cert.json beside it"
        )
    now = dt.datetime.now(dt.UTC)
    out: dict[str, dict[str, Any]] = {}
    for i, text in enumerate(texts):
        source = f"documents[{i}]"
        for data in split_documents(text, source):
            deployment = parse_deployment(data, source=source)
            digest = sha256_digest(data)
            out[digest] = sign_deployment(
                creds.tenant, deployment.deployment_id, digest, creds.key, now=now
            )
    return out
