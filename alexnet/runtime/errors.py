"""The one exception type the CLI turns into a clear message instead of a traceback, and the
one line it prints for a failed file operation."""

import errno
import os


class UserError(Exception):
    """Bad input from the user: a missing file, a malformed source, an invalid config.

    The message must name the file or setting and say what is wrong with it. The CLI prints
    it as ``alexnet <command>: error: <message>`` and exits with status 2.
    """


# Out of room: what was written before is whole (every write is atomic), so the same command
# continues once there is space.
FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def os_error_line(e: OSError) -> str | None:
    """One line for a failed file operation that names its file (a full disk, a read-only
    or missing folder, no permission), or None where the error names no file (a bug, to be
    seen with its traceback)."""
    if e.filename is None or e.errno is None:
        return None
    where = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 else "")
    line = f"{where}: {e.strerror or os.strerror(e.errno)}"
    if e.errno in FULL:
        line += (
            " (nothing finished before was lost: every file is replaced whole or not at all; "
            "free space and run the same command again to continue)"
        )
    return line
