"""Config sections as dataclasses: each section of the model config (network, constraint,
adversarial, optimization, validation, certificate) is a dataclass beside the code it
configures; `as_section` takes it as the dataclass, as a dict of its fields or as None."""

from __future__ import annotations

from typing import Any, TypeVar

__all__ = ["as_section", "MOVED"]

Section = TypeVar("Section")

# fields that moved to another section: a dict (checkpoint, user code) that still has them is refused
MOVED = {("ValidationConfig", "certify_radii"): "validation.certify_radii is now certificate.radii"}


def as_section(cls: type[Section], value: Section | dict[str, Any] | None) -> Section:
    """A config section as its dataclass: given as one (the CLI), as a dict of its fields (a
    checkpoint's hyperparameters, a user's own code) or None (the defaults)."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        moved = [MOVED[(cls.__name__, key)] for key in value if (cls.__name__, key) in MOVED]
        if moved:
            raise ValueError(f"{moved[0]} (sepnet 0.2.0): expected the new section; for a checkpoint, move the "
                             "value in its hyper_parameters")
        return cls(**value)
    raise TypeError(f"{cls.__name__}: expected the dataclass or a dict of its fields, got {type(value).__name__}")
