"""What a command imported: ``python -X importtime`` writes one line per
module to stderr (``import time: self | cumulative | name``); the tests that
check an error is answered before TensorFlow loads read them with this."""


def imported_modules(stderr: str) -> list[str]:
    """The names of the modules `python -X importtime` reports in `stderr`."""
    return [
        line.rsplit("|", 1)[-1].strip()
        for line in stderr.splitlines()
        if line.startswith("import time")
    ]
