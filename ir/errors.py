"""Typed errors shared by every llmq layer.

A :class:`LlmqError` is a problem with the user's input or environment: the CLI prints it as one
line (message and what to do) and exits non-zero, without a traceback unless ``--debug``.
:class:`PassError` is a broken invariant inside a pass: it names the pass and the node.
"""

from __future__ import annotations

__all__ = ["LlmqError", "PassError", "UsageError"]


class LlmqError(Exception):
    """A user-facing error: ``message`` names the problem, ``hint`` says what to do."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        return f"{self.message}; {self.hint}" if self.hint else self.message


class UsageError(LlmqError):
    """Bad command-line usage or options."""


class PassError(LlmqError):
    """A pass met a graph that breaks an invariant it relies on."""

    exit_code = 3

    def __init__(self, pass_name: str, message: str, node: str | None = None):
        where = f" at node '{node}'" if node else ""
        super().__init__(f"pass '{pass_name}'{where}: {message}",
                         "rerun with --debug --dump-dir DIR and report the dumped graph")
        self.pass_name = pass_name
        self.node = node
