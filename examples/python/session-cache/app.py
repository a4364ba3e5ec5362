"""A session cache (cache-aside), answering exactly like
examples/session-cache. Requests are JSON:

- `{"op":"put","id":"s1","session":{…},"ttl_ms":60000}` → `{"stored":true}`
- `{"op":"get","id":"s1"}` → `{"session":{…}}` or `{"session":null}`
- `{"op":"delete","id":"s1"}` → `{"deleted":true}`
- `{"op":"fetch","id":"s1"}` → the cached session, or one "loaded from the
  origin" and cached for 5 minutes: `{"session":{…},"cached":false}`
"""

from typing import Any

from rolehost_role import JsonObject, bad_json, from_json, get_json, handle_with, log, own_bucket, set_json, to_json
from wit_world import exports

ORIGIN_TTL_MS = 300_000

# The fields of each operation, in order (the array form lists them so).
OPS = {"put": ["id", "session", "ttl_ms"], "get": ["id"], "delete": ["id"], "fetch": ["id"]}
_MISSING = object()


def read_request(value: Any) -> dict:
    """The request as a dict, checked as the Rust role's serde types check it."""
    if isinstance(value, JsonObject):
        if "op" in value.duplicates:
            raise bad_json("duplicate field `op`")
        if "op" not in value:
            raise bad_json("missing field `op`")
        op = value["op"]

        def field(name):
            if name in value.duplicates:
                raise bad_json(f"duplicate field `{name}`")
            return value.get(name, _MISSING)

    elif isinstance(value, list) and value:
        op = value[0]

        def field(name):
            i = OPS[op].index(name) + 1
            return value[i] if i < len(value) else _MISSING

        if isinstance(op, str) and op in OPS and len(value) != len(OPS[op]) + 1:
            raise bad_json(f"invalid length {len(value) - 1}, expected {len(OPS[op])} fields")
    else:
        raise bad_json("invalid type, expected a request object")
    if not isinstance(op, str):
        raise bad_json("invalid type for `op`, expected a string")
    if op not in OPS:
        raise bad_json(f"unknown variant `{op}`, expected one of `put`, `get`, `delete`, `fetch`")
    request = {"op": op, "ttl_ms": None}
    for name in OPS[op]:
        found = field(name)
        if name == "id":
            if found is _MISSING:
                raise bad_json("missing field `id`")
            if not isinstance(found, str):
                raise bad_json("invalid type for `id`, expected a string")
            request["id"] = found
        elif name == "session":
            if found is _MISSING:
                raise bad_json("missing field `session`")
            request["session"] = found
        elif found is not _MISSING and found is not None:
            if isinstance(found, bool) or not isinstance(found, int) or found < 0:
                raise bad_json("invalid type for `ttl_ms`, expected u64")
            request["ttl_ms"] = found
    return request


def handle(body: bytes) -> bytes:
    bucket = own_bucket()
    request = read_request(from_json(body))
    key = f"session:{request['id']}"
    op = request["op"]
    if op == "put":
        set_json(bucket, key, request["session"], request["ttl_ms"])
        return to_json({"stored": True})
    if op == "get":
        return to_json({"session": get_json(bucket, key)})
    if op == "delete":
        return to_json({"deleted": bucket.delete(key)})
    cached = get_json(bucket, key, _MISSING)
    if cached is not _MISSING:
        return to_json({"session": cached, "cached": True})
    log("info", f"cache miss for session {request['id']}; loading from origin")
    session = {"id": request["id"], "user": f"user-of-{request['id']}"}
    set_json(bucket, key, session, ORIGIN_TTL_MS)
    return to_json({"session": session, "cached": False})


class Handler(exports.Handler):
    def handle(self, request: bytes) -> bytes:
        return handle_with(handle, request)
