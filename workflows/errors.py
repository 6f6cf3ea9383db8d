"""Errors meant for the user: printed as one clear message, never as a stack trace."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or environment the user can fix; the message says what and how."""
