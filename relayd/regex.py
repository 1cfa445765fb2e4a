"""Clause regular expressions with the vendors' semantics.

Both vendors evaluate ``match`` (Harness) and ``matches`` (LaunchDarkly) with Go's ``regexp``, which is RE2:
no backreferences or lookarounds, ``\\pL`` classes, ``$`` only at the very end, linear-time matching. Python's
``re`` differs on all of these, so a rule could match in the vendor's SDKs and not in relayd (or the reverse);
google-re2 is that engine. Patterns come from flag data and are compiled once (cached, failures too).
"""

from __future__ import annotations

import functools
from typing import Any

import re2

_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # a bad pattern in flag data is "no match", not a line on stderr


@functools.lru_cache(maxsize=4096)
def compile_clause(pattern: str) -> Any | None:
    """The compiled pattern, or None when RE2 (and so Go) refuses it: the clause then does not match."""
    try:
        return re2.compile(pattern, options=_OPTIONS)
    except (re2.error, ValueError, TypeError):
        return None


def search(pattern: str, text: str) -> bool:
    """Go's ``regexp.MatchString``: an unanchored search."""
    compiled = compile_clause(pattern)
    return compiled is not None and compiled.search(text) is not None
