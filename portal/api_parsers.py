"""The API's JSON parser: DRF's, with nesting bounded so that no body can exhaust the stack.

json's C decoder raises RecursionError (not ValueError) on deep nesting, which DRF does
not catch: a 200 kB body of brackets was a 500. Here it is a 400 with a precise message,
and so is anything nested deeper than any request this API accepts.
"""

from __future__ import annotations

from typing import Any

from rest_framework import parsers
from rest_framework.exceptions import ParseError

MAX_DEPTH = 32
TOO_DEEP = (
    f"JSON parse error - the body is nested too deeply: "
    f"at most {MAX_DEPTH} levels of arrays and objects are accepted."
)


def nesting_exceeds(value: Any, limit: int) -> bool:
    """Whether arrays/objects in `value` nest deeper than `limit` (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


class JSONParser(parsers.JSONParser):
    def parse(self, stream, media_type: str | None = None, parser_context: Any = None) -> Any:
        try:
            data = super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise ParseError(TOO_DEEP) from None
        if nesting_exceeds(data, MAX_DEPTH):
            raise ParseError(TOO_DEEP)
        return data
