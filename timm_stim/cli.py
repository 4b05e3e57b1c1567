"""What the command-line entry points share: reporting a failure as one line."""
from __future__ import annotations

import sys

__all__ = ['one_line', 'report_error']


def one_line(error: BaseException) -> str:
    """The error's message with all whitespace (newlines from wrapped library messages) folded to single spaces."""
    return ' '.join(str(error).split())


def report_error(error: BaseException, exit_code: int) -> int:
    """Print `error: <message>` as one line on stderr; returns `exit_code` for `main()` to return."""
    print(f'error: {one_line(error)}', file=sys.stderr)
    return exit_code
