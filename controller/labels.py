"""Device labels: the two sets a device has, who may write which, and how selectors read them.

Theory of operation
-------------------
A device carries two label sets:

- ``labels``: assigned by an operator through the API (``margoctl label device``). Only these
  give a selector its power: ``apply --selector line=1`` targets devices whose *operator*
  label ``line`` is ``1``.
- ``reported_labels``: what the device says about itself (its hello's capabilities, or the
  Margo capabilities document). A device can claim anything here, so a plain selector never
  reads them; an operator who wants to trust a claim says so with the ``reported.`` prefix
  (``--selector reported.line=1``).

Operator labels are checked here (:func:`check_label`) wherever they are written; reported
labels are stored as the device sent them and are only ever compared for equality.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

REPORTED_PREFIX = "reported."
MAX_KEY_LENGTH = 128
MAX_VALUE_LENGTH = 63
MAX_LABELS = 64

# Kubernetes-like: letters, digits and . _ - (keys also /), starting and ending alphanumeric.
_KEY = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._/-]*[A-Za-z0-9])?")
_VALUE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")


class LabelError(ValueError):
    """An operator label that may not be stored; ``key`` names it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def check_label(key: object, value: object) -> None:
    """Raise :class:`LabelError` naming the label unless ``key=value`` may be an operator label."""
    if not isinstance(key, str) or not key:
        raise LabelError(str(key), f"label key {key!r} must be a non-empty string")
    if len(key) > MAX_KEY_LENGTH:
        raise LabelError(key, f"label key {key[:40]!r}... is longer than {MAX_KEY_LENGTH}")
    if not _KEY.fullmatch(key):
        raise LabelError(
            key,
            f"label key {key!r} must be letters, digits and '._/-', "
            "starting and ending with a letter or digit",
        )
    if key.startswith(REPORTED_PREFIX):
        raise LabelError(
            key, f"label key {key!r}: the prefix {REPORTED_PREFIX!r} names device-reported labels"
        )
    if not isinstance(value, str) or not value:
        raise LabelError(key, f"label {key!r} must have a non-empty string value, got {value!r}")
    if len(value) > MAX_VALUE_LENGTH:
        raise LabelError(key, f"label {key!r}: value is longer than {MAX_VALUE_LENGTH}")
    if not _VALUE.fullmatch(value):
        raise LabelError(
            key,
            f"label {key!r}: value {value!r} must be letters, digits and '._-', "
            "starting and ending with a letter or digit",
        )


def check_labels(labels: Mapping[str, str]) -> None:
    """Every label of an operator set, and their number."""
    for key, value in labels.items():
        check_label(key, value)
    if len(labels) > MAX_LABELS:
        extra = list(labels)[MAX_LABELS]
        raise LabelError(extra, f"label {extra!r}: a device has at most {MAX_LABELS} labels")


def apply_changes(current: Mapping[str, str], changes: Mapping[str, str | None]) -> dict[str, str]:
    """``current`` with ``changes`` merged in: a value sets its key, None removes it.
    Raises :class:`LabelError` for a bad label (removing any key is allowed)."""
    result = dict(current)
    for key, value in changes.items():
        if value is None:
            result.pop(key, None)
        else:
            check_label(key, value)
            result[key] = value
    check_labels(result)
    return result


def selector_matches(
    selector: Mapping[str, str], labels: Mapping[str, str], reported: Mapping[str, str]
) -> bool:
    """Whether every ``key=value`` of ``selector`` holds: ``key`` reads the operator labels,
    ``reported.key`` the device-reported ones."""
    for key, value in selector.items():
        if key.startswith(REPORTED_PREFIX):
            if reported.get(key[len(REPORTED_PREFIX) :]) != value:
                return False
        elif labels.get(key) != value:
            return False
    return True


__all__ = [
    "MAX_KEY_LENGTH",
    "MAX_LABELS",
    "MAX_VALUE_LENGTH",
    "REPORTED_PREFIX",
    "LabelError",
    "apply_changes",
    "check_label",
    "check_labels",
    "selector_matches",
]
