"""The config's one error type (a module of its own: every part of the package raises it)."""


class ConfigError(ValueError):
    """A user mistake in the config or flags: one line per problem, key path first."""
