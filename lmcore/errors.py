"""The errors lmcycle reports as one clear line (no traceback) and a non-zero exit."""


class LmcycleError(Exception):
    """Base: the message names the file, params key or model at fault."""


class ConfigError(LmcycleError, ValueError):
    """A params.yaml problem: the message starts with the key path."""


class DataError(LmcycleError):
    """An input-data problem: the message names the file or source."""


class CheckpointError(LmcycleError):
    """A checkpoint or model directory that cannot be used."""


class DiskFullError(LmcycleError):
    """A write ran out of space (ENOSPC) or quota (EDQUOT): the message names the path being written."""


class ChatError(LmcycleError):
    """A chat turn that cannot be answered (e.g. it does not fit the model's context window)."""
