"""Config fields that are also command-line flags: ``flagged`` declares one
(its default, help and bounds, written once, on the dataclass field) and
``flag_fields`` lists a config class's, so that train.py defines its flags
from the configs and reads them back."""

from __future__ import annotations

import dataclasses
import typing


def flagged(default, help: str, name: str | None = None, choices: tuple[str, ...] = (), **bounds):
    """A config field with ``default`` that train.py's flag --``name`` (default:
    the field's name) sets: ``help`` is the flag's help, ``choices`` the values
    of an enum flag, ``bounds`` absl's lower_bound / upper_bound."""
    return dataclasses.field(
        default=default,
        metadata={"flag": name, "help": help, "choices": tuple(choices), "bounds": bounds},
    )


@dataclasses.dataclass(frozen=True)
class FlagField:
    """The flag --``name`` of the config field ``field`` (``flag_fields``).
    ``type``: bool, int, float, str, or tuple (a list flag of ``item``
    values); ``choices``: an enum flag's values; ``bounds``: absl's
    lower_bound / upper_bound."""

    name: str
    field: str
    type: type
    item: type | None
    default: object
    help: str
    choices: tuple[str, ...]
    bounds: dict


def flag_fields(config_class) -> list[FlagField]:
    """The flags of ``config_class``'s ``flagged`` fields, in field order;
    each one's type from the field's annotation (``int | None``: int)."""
    hints = typing.get_type_hints(config_class)
    out = []
    for field in dataclasses.fields(config_class):
        if "flag" not in field.metadata:
            continue
        hint = hints[field.name]
        args = [a for a in typing.get_args(hint) if a not in (type(None), Ellipsis)]
        if typing.get_origin(hint) is tuple:
            kind, item = tuple, args[0]
        else:
            kind, item = (args[0] if args else hint), None
        meta = field.metadata
        out.append(
            FlagField(
                meta["flag"] or field.name,
                field.name,
                kind,
                item,
                field.default,
                meta["help"],
                meta["choices"],
                meta["bounds"],
            )
        )
    return out
