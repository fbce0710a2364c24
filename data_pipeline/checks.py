"""The argument checks every layer shares: a positive integer, and a list flag
of integers (``--crop=160,192,128``) as a tuple of ints. Each raises
ValueError, one line that names the argument and quotes the value; and
``one_line``, an error's message as the commands print it."""

from __future__ import annotations


def positive_int(name: str, value) -> int:
    """``value`` if it is a Python int >= 1 (a bool is not); else ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def int_flag_list(
    name: str, values, count: int | None = None, minimum: int | None = None, multiple: int = 1
) -> tuple[int, ...]:
    """A command's list flag ``--name`` (its values as absl gives them:
    strings) as integers: ``count`` of them when given, each >= ``minimum``
    and divisible by ``multiple``. ValueError naming the flag, saying what it
    must be and quoting the values:
    ``--crop must be 3 integers >= 16 divisible by 16, got 32,x,32``."""
    text = ",".join(str(v) for v in values)
    try:
        numbers = tuple(int(v) for v in values)
    except ValueError:
        numbers = None
    if (
        numbers is None
        or (count is not None and len(numbers) != count)
        or (minimum is not None and any(n < minimum for n in numbers))
        or any(n % multiple for n in numbers)
    ):
        how_many = "" if count is None else f"{count} "
        kind = (
            "positive integers"
            if minimum == 1
            else "integers"
            if minimum is None
            else f"integers >= {minimum}"
        )
        divisible = f" divisible by {multiple}" if multiple > 1 else ""
        raise ValueError(f"--{name} must be {how_many}{kind}{divisible}, got {text}")
    return numbers


def one_line(e: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none)."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
