"""Errors a user can fix. The CLI prints their message on one line and exits non-zero, without a traceback."""


class UserError(Exception):
    """Bad input or environment: the message names the file or value and says what to do."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)
