"""Errors a person can act on.

Every failure medfs expects to meet (bad input, a node that is down, a wrong passphrase, a
corrupt object) is a `MedfsError`: the CLI prints its message and hint and exits with its code,
without a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class MedfsError(Exception):
    """An expected failure: a message, an optional hint, and the CLI's exit code."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(MedfsError):
    """The command line or a configuration value is wrong."""

    exit_code = 2


class IPFSError(MedfsError):
    """The IPFS node could not be reached or refused a request."""

    exit_code = 3


class SetupError(MedfsError):
    """Something medfs needs is not installed (the Kubo binary, FUSE)."""

    exit_code = 4


class KeyFileError(MedfsError):
    """An identity or public key file is missing, malformed or unsafe."""

    exit_code = 5


class PassphraseError(KeyFileError):
    """The passphrase does not open the key file."""

    exit_code = 6


class FormatError(MedfsError):
    """An encrypted object, header or stanza is malformed or fails authentication."""

    exit_code = 7


class NotForIdentityError(MedfsError):
    """A wrapped key is addressed to another identity (distinct from a corrupt one)."""

    exit_code = 8


class SignatureError(FormatError):
    """A signed document (a share manifest) is not signed by the key the caller trusts."""

    exit_code = 11


class AuditError(MedfsError):
    """The audit log is damaged, fails verification, or cannot be written."""

    exit_code = 12


class VerifyError(MedfsError):
    """`medfs verify` found problems that remain (not repaired, or not repairable)."""

    exit_code = 14


class OutputError(MedfsError):
    """A command did its work (a grant, a revocation) but could not write what it produces
    (a share manifest): the work stands, and the hint says how to get the output again."""

    exit_code = 15
