"""Records logins on user subjects (like examples/profile). A call with
`{"user":"u1"}` increments the default property `login_count` of subject
`user-u1` atomically, sets the extended property `last_login` (seconds since
the epoch) and answers with the new count as decimal digits."""

import time
from typing import Any

from rolehost_role import JsonObject, bad_json, dumps, error, from_json, handle_with
from wit_world import exports
from wit_world.imports import subjects


def read_user(value: Any) -> str:
    """The user name, checked as the Rust role's `Login` struct checks it."""
    if isinstance(value, JsonObject):
        if "user" in value.duplicates:
            raise bad_json("duplicate field `user`")
        if "user" not in value:
            raise bad_json("missing field `user`")
        user = value["user"]
    elif isinstance(value, list):
        if not value:
            raise bad_json("invalid length 0, expected struct Login with 1 element")
        if len(value) > 1:
            raise bad_json("trailing characters")
        user = value[0]
    else:
        raise bad_json("invalid type, expected struct Login")
    if not isinstance(user, str):
        raise bad_json("invalid type for `user`, expected a string")
    return user


def handle(body: bytes) -> str:
    user = read_user(from_json(body))
    if user == "":
        raise error("invalid-argument", "user must not be empty")
    subject = subjects.Subject.open("", f"user-{user}")
    count = subject.increment(subjects.Kind.DEFAULT, "login_count", 1)
    subject.set(subjects.Kind.EXTENDED, "last_login", dumps(int(time.time())))
    subject.store()
    return str(count)


class Handler(exports.Handler):
    def handle(self, request: bytes) -> bytes:
        return handle_with(handle, request)
