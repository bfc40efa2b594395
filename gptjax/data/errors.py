"""The one error type for bad input data, so callers can catch data problems apart from bugs."""


class DataError(ValueError):
  """Malformed or missing input data. Messages start with `path:lineno:` when a line is to blame."""
