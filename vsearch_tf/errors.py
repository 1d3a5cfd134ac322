"""The one exception type users see: a one-line message that names the file, row or key."""

from __future__ import annotations

import re


class VSearchError(Exception):
    """A user-facing error. The CLI prints ``str(err)`` on one line and exits with code 2."""


def one_line(err: BaseException | str, limit: int = 300) -> str:
    """A library's message (often several lines: YAML marks, TF stack notes) as one line of at
    most ``limit`` characters, so that a ``VSearchError`` built from it stays one line."""
    text = " ".join(str(getattr(err, "message", None) or err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def error_cause(message: str) -> str:
    """The one informative line of a TensorFlow op error.

    TensorFlow wraps it in function and node names and "Detected at node" boilerplate, and our
    own asserts in ``assertion failed: [...]``.
    """
    noise = ("Graph execution error", "Detected at node", 'File "', "<stack traces", "[[")
    lines = [line.strip() for line in message.splitlines()]
    line = next((line for line in lines if line and not line.startswith(noise)), message.strip())
    line = re.sub(r"^\{\{function_node [^}]*\}\}\s*", "", line)
    line = re.sub(r"\s*\[Op:[^\]]*\](\s*name:.*)?$", "", line)
    own = re.fullmatch(r"assertion failed: \[([^\[\]]*)\]", line) or re.fullmatch(
        r"Expected .* Summarized data: b'(.*)'", line
    )
    return own.group(1) if own else line
