"""Deployment documents to runnable specs, parsed and checked once, at the trust boundary.

A manifest that passed the verifier names its deployment documents by digest; :func:`read_specs`
parses each document once (``parse_deployment``: the validation the controller ran when the
document was applied), resolves it into a ``DeploymentSpec`` and checks it against the shared
content rules (``content_rules.check_spec``). The result, :class:`CheckedSpecs`, is what the
reconciler applies: holding one means the checks were done, so nothing downstream parses or
checks again.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from margo_stream.errors import DocumentError
from margo_stream.state.content_rules import check_spec
from margo_stream.state.documents import parse_deployment, resolve
from margo_stream.state.manifest import Manifest
from margo_stream.state.spec import DeploymentSpec


@dataclass(frozen=True, slots=True)
class CheckedSpecs:
    """Deployment specs that passed :func:`validate`; build with :func:`read_specs` or
    :func:`check_specs`."""

    specs: tuple[DeploymentSpec, ...]

    def __len__(self) -> int:
        return len(self.specs)

    def __iter__(self) -> Iterator[DeploymentSpec]:
        return iter(self.specs)


def validate(desired: Sequence[DeploymentSpec]) -> None:
    """Refuse specs the agent cannot lay out on disk safely or run (raises ``DocumentError``).

    The rules are the shared ones (``margo_stream.state.content_rules``) that the controller
    also runs on every document an operator applies, so nothing it accepts is refused here."""
    for dep in desired:
        check_spec(dep)


def check_specs(specs: Sequence[DeploymentSpec]) -> CheckedSpecs:
    """``specs`` as :class:`CheckedSpecs`, or ``DocumentError``."""
    specs = tuple(specs)
    validate(specs)
    return CheckedSpecs(specs)


def read_specs(manifest: Manifest, blobs: Mapping[str, bytes]) -> CheckedSpecs:
    """Parse the manifest's deployment documents (``blobs`` by digest) into checked specs.

    Raises ``DocumentError`` for a malformed or unsafe document, ``KeyError`` for a missing
    blob (the verifier has already refused a push that lacks one).
    """
    specs = []
    for entry in manifest.deployments:
        document = parse_deployment(blobs[entry.digest], source=f"deployment {entry.deployment_id}")
        if document.deployment_id != entry.deployment_id:
            raise DocumentError(
                f"manifest entry {entry.deployment_id!r} points at a document "
                f"whose id is {document.deployment_id!r}"
            )
        specs.append(resolve(document, digest=entry.digest))
    return check_specs(specs)
