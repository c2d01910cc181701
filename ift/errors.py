"""User-facing errors: one line each, naming what, where and the fix; the CLI exits 2 on them."""

from __future__ import annotations


class IftError(Exception):
    """A problem with the user's input. Printed as `error: <what> (<where>) — <fix>`, exit code 2."""

    def __init__(self, what: str, where: str | None = None, fix: str | None = None):
        self.what, self.where, self.fix = what, where, fix
        super().__init__(self.line())

    def line(self) -> str:
        text = self.what
        if self.where:
            text += f" ({self.where})"
        if self.fix:
            text += f" — {self.fix}"
        return text

    def lines(self) -> list[str]:
        return [self.line()]


class IftErrors(IftError):
    """Several problems found together (e.g. every mistake in a recipe), reported at once."""

    def __init__(self, errors: list[IftError]):
        self.errors = list(errors)
        Exception.__init__(self, "\n".join(e.line() for e in self.errors))
        self.what, self.where, self.fix = self.errors[0].what, self.errors[0].where, self.errors[0].fix

    def line(self) -> str:
        return "\n".join(e.line() for e in self.errors)

    def lines(self) -> list[str]:
        return [e.line() for e in self.errors]


def exit_code(command, *args) -> int:
    """Run a command function; an IftError is printed as `error: ...` lines on stderr and gives exit code 2 (no
    traceback). The `ift` command and the script entry `ift/train.py` both end here."""
    import sys

    try:
        return int(command(*args) or 0)
    except IftError as err:
        for line in err.lines():
            print(f"error: {line}", file=sys.stderr)
        return 2
