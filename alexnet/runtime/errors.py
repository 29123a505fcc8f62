"""The one exception type the CLI turns into a clear message instead of a traceback."""


class UserError(Exception):
    """Bad input from the user: a missing file, a malformed source, an invalid config.

    The message must name the file or setting and say what is wrong with it. The CLI prints
    it as ``alexnet <command>: error: <message>`` and exits with status 2.
    """
