"""Errors longlab raises on bad input. Each message names what was wrong and what is allowed."""


class LonglabError(ValueError):
    """Base class for every error longlab raises on bad input."""


class SpecError(LonglabError):
    """A method spec string or parameter is malformed, unknown, or out of range."""


class UnsupportedModelError(LonglabError):
    """The model is not of an architecture longlab can patch."""
