"""_errors.py - kvarc's exceptions.

Every failure of a libkvarc call is a kvarc.Error carrying the library's
return code (a negative errno or a KVARC_E* code) and its message (what
failed, and where). Argument problems found before any call are the same
class with ValueError / TypeError mixed in, so `except ValueError` works too.
"""
import errno as _errno


class Error(Exception):
    """A libkvarc call failed: .code (negative errno or KVARC_E*), .message."""

    def __init__(self, message, code=None):
        super().__init__(message)
        self.message, self.code = message, code

    @property
    def errno_name(self):
        """'EINVAL', 'KVARC_ESHAPE', ... for .code (None when there is none)."""
        if self.code is None:
            return None
        if -1099 <= self.code <= -1000:
            return _KVARC_CODES.get(self.code, "KVARC_E?")
        return _errno.errorcode.get(-self.code, str(self.code))


class InvalidArgument(Error, ValueError):
    """A shape, layout, option or state libkvarc would refuse (-EINVAL)."""

    def __init__(self, message, code=-_errno.EINVAL):
        super().__init__(message, code)


class DtypeError(Error, TypeError):
    """An element type or object libkvarc does not take (KVARC_EDTYPE)."""

    def __init__(self, message, code=-1004):
        super().__init__(message, code)


class ClosedError(Error):
    """The conversation or client was closed (-EBADF)."""

    def __init__(self, message, code=-_errno.EBADF):
        super().__init__(message, code)


_KVARC_CODES = {-1001: "KVARC_EHEADDIM", -1002: "KVARC_EFORMAT", -1003: "KVARC_EVERSION", -1004: "KVARC_EDTYPE",
                -1005: "KVARC_ENONFINITE", -1006: "KVARC_ECORRUPT", -1007: "KVARC_ESHAPE",
                -1008: "KVARC_ELOCKED"}
