"""The bench's operator: applies are signed as ``margoctl apply`` signs them, with the admin
operator's key that ``margo-certs init`` leaves beside the tenant's token."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from margo_stream.cli.signing import sign_documents
from margo_stream.identity.operator_files import OperatorCredentials, load_operator_credentials


class Signer:
    def __init__(self, creds: OperatorCredentials) -> None:
        self.creds = creds

    @classmethod
    def for_tenant(cls, certs: Path, tenant: str) -> Signer:
        token_file = certs / tenant / "operator.token"
        return cls(load_operator_credentials(operator_dir=None, token_file=token_file))

    def body(self, documents: list[str], **fields: Any) -> dict[str, Any]:
        """An apply request body with every document signed."""
        return {
            "documents": documents,
            "signatures": sign_documents(documents, self.creds),
            "certificate": self.creds.certificate,
            **fields,
        }
