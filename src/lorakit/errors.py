"""One exception hierarchy: every error lorakit raises on bad input is a `LorakitError`."""


class LorakitError(Exception):
    """Bad input or an impossible request; the message says what was expected, found, and what to do."""


class UnknownMethodError(LorakitError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class TargetError(LorakitError):
    """No module matched, or a matched module cannot be wrapped."""


class ConfigError(LorakitError, ValueError):
    """A configuration value is out of range or inconsistent."""


class AdapterFileError(LorakitError):
    """An adapter directory is missing, corrupt, foreign, or does not fit the model."""


class AdapterConfigError(AdapterFileError, ConfigError):
    """The config stored in an adapter file breaks the method's config schema (a type, a range)."""


class TrainingError(LorakitError):
    """Training cannot continue (non-finite loss, impossible budget, ...)."""


class OutputError(LorakitError):
    """An output path cannot be written: a directory or FIFO in a file's place, no permission, a full disk, or an
    output directory another run holds."""
