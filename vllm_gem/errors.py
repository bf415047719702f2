"""The one error type GEM raises for bad input: it names the file, the field and what was expected."""

from __future__ import annotations


class GemInputError(ValueError):
    """A profile, trace, placement or argument that GEM cannot use.

    The message always reads ``<source>: <field>: <problem>; expected <expectation>`` so a
    user can fix the input without reading a traceback. The CLI turns it into exit code 2.
    """

    def __init__(self, source: str, field: str, problem: str, expected: str | None = None):
        self.source = str(source)
        self.field = field
        self.problem = _one_line(problem)  # a library's multi-line message (torch.load's) too
        self.expected = _one_line(expected) if expected else expected
        problem, expected = self.problem, self.expected
        msg = f"{_printable(self.source)}: {_printable(field)}: {problem}"
        if expected:
            msg += f"; expected {expected}"
        super().__init__(msg)


def _one_line(text: str) -> str:
    """text with its line breaks (and the indentation after them) folded into single spaces."""
    return " ".join(text.split()) if "\n" in text else text


def _printable(name: str) -> str:
    """A file name or field as one printable line: a newline or other control character in a
    name is shown escaped (as Python writes it), so the message stays one line."""
    return name if name.isprintable() else repr(name)[1:-1]
