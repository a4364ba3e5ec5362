"""Counts its calls: each call increments `count` atomically and answers
with the new value as decimal digits (like examples/counter)."""

from rolehost_role import handle_with, own_bucket
from wit_world import exports
from wit_world.imports import atomics


class Handler(exports.Handler):
    def handle(self, request: bytes) -> bytes:
        return handle_with(lambda _: str(atomics.increment(own_bucket(), "count", 1)), request)
