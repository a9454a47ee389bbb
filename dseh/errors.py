"""The one exception type for problems a user can cause (bad params, data, paths, servers)."""


class DsehError(Exception):
    """A user-facing error: the CLI prints its message alone, without a traceback."""


class MissingObject(DsehError):
    """A file or S3 object that does not exist (as opposed to a server that does not answer)."""
