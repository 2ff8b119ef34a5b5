"""Deployment documents to runnable specs, parsed and checked once, at the trust boundary.

A manifest that passed the verifier names its deployment documents by digest; :func:`read_specs`
parses each document once, resolves it into a ``DeploymentSpec`` and checks that the agent can
lay it out on disk safely. The result, :class:`CheckedSpecs`, is what the reconciler applies:
holding one means the checks were done, so nothing downstream parses or checks again.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

from agent.runtime.base import is_safe_name
from margo_stream.errors import DocumentError
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
    """Refuse specs the agent cannot lay out on disk safely (raises ``DocumentError``)."""
    for dep in desired:
        if not is_safe_name(dep.deployment_id):
            raise DocumentError(f"deploymentId {dep.deployment_id!r} is not a safe name")
        for comp in dep.components:
            if not is_safe_name(comp.name):
                raise DocumentError(
                    f"{dep.deployment_id}: component name {comp.name!r} is not safe"
                )
            workdir = PurePosixPath(comp.working_dir or ".")
            if not workdir.is_absolute() and ".." in workdir.parts:
                raise DocumentError(
                    f"{dep.deployment_id}: component {comp.name!r} working dir leaves the "
                    f"deployment's directory: {comp.working_dir!r}"
                )
            if comp.deployment_id != dep.deployment_id:
                raise DocumentError(
                    f"{dep.deployment_id}: component {comp.name!r} names deployment "
                    f"{comp.deployment_id!r}"
                )
        for f in dep.files:
            path = PurePosixPath(f.name)
            if not f.name or path.is_absolute() or ".." in path.parts or "\\" in f.name:
                raise DocumentError(f"{dep.deployment_id}: file name {f.name!r} is not safe")


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
