"""A small guest SDK for Python roles: WIT errors, JSON requests and values,
and the handler export.

JSON is read and written exactly as the Rust roles do (serde_json), so a
Python role answers byte for byte like its Rust twin and stores the same
bytes: objects print with sorted keys and no spaces, integers outside the
u64/i64 range become floats, floats print in Rust's shortest form (`1.0`,
`1e+21`).
"""

import json
import math
from typing import Any, Callable, Optional, Union

from componentize_py_types import Err
from wit_world.imports import kv, types
from wit_world.imports import log as wit_log

U64_MAX = 2**64 - 1
I64_MIN = -(2**63)
# serde_json refuses documents nested this deep.
MAX_DEPTH = 128


class JsonObject(dict):
    """A JSON object; `duplicates` holds keys that appeared more than once (the last wins)."""

    duplicates: set


def error(tag: str, message: str) -> Err:
    """A WIT error to raise, e.g. `raise error("invalid-argument", "user must not be empty")`."""
    variant = {
        "invalid-key": types.Error_InvalidKey,
        "invalid-argument": types.Error_InvalidArgument,
        "too-large": types.Error_TooLarge,
        "access-denied": types.Error_AccessDenied,
        "quota-exceeded": types.Error_QuotaExceeded,
        "unavailable": types.Error_Unavailable,
        "conflict": types.Error_Conflict,
        "internal": types.Error_Internal,
    }[tag]
    return Err(variant(message))


def bad_json(detail: str) -> Err:
    """The `invalid-argument` error for a request that is not what the role expects."""
    return error("invalid-argument", f"bad JSON: {detail}")


def _object(pairs):
    out = JsonObject()
    out.duplicates = set()
    for key, value in pairs:
        if key in out:
            out.duplicates.add(key)
        out[key] = value
    return out


def _int(text: str):
    if text == "-0":
        return -0.0  # as serde_json reads it
    value = int(text)
    return value if I64_MIN <= value <= U64_MAX else _float(text)


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("number out of range")
    return value


def _constant(name: str):
    raise ValueError(f"expected value, found {name}")


def _check(value, depth: int) -> None:
    """What Python's parser accepts but serde_json does not: deep nesting, lone surrogates."""
    if isinstance(value, (list, dict)):
        if depth + 1 >= MAX_DEPTH:
            raise ValueError("recursion limit exceeded")
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if isinstance(key, str):
                _check(key, depth)
            _check(item, depth + 1)
    elif isinstance(value, str) and any(0xD800 <= ord(c) <= 0xDFFF for c in value):
        raise ValueError("lone surrogate in hex escape")


def parse(data: bytes) -> Any:
    """Parses UTF-8 JSON; raises ValueError."""
    text = data.decode("utf-8")  # UnicodeDecodeError is a ValueError
    value = json.loads(
        text, object_pairs_hook=_object, parse_int=_int, parse_float=_float, parse_constant=_constant
    )
    _check(value, 0)
    return value


def from_json(data: bytes) -> Any:
    """Parses a JSON request body; a parse failure is `invalid-argument`."""
    try:
        return parse(data)
    except (ValueError, RecursionError) as e:
        raise bad_json(str(e)) from None


def format_float(x: float) -> str:
    """Formats a finite float as serde_json does: shortest digits, `e` notation outside 1e-5..1e16."""
    if x == 0:
        return "-0.0" if math.copysign(1.0, x) < 0 else "0.0"
    sign = "-" if x < 0 else ""
    # repr() gives the shortest digits that read back as `x`.
    mantissa, _, exp = repr(abs(x)).partition("e")
    whole, _, fraction = mantissa.partition(".")
    digits = (whole + fraction).lstrip("0")
    k = (int(exp) if exp else 0) - len(fraction)
    stripped = digits.rstrip("0")
    k += len(digits) - len(stripped)
    digits = stripped
    length = len(digits)
    kk = length + k  # 10^(kk-1) <= |x| < 10^kk
    if k >= 0 and kk <= 16:
        out = digits + "0" * k + ".0"
    elif 0 < kk <= 16:
        out = digits[:kk] + "." + digits[kk:]
    elif -5 < kk <= 0:
        out = "0." + "0" * -kk + digits
    else:
        e = kk - 1
        out = (digits if length == 1 else digits[0] + "." + digits[1:]) + (f"e{e}" if e < 0 else f"e+{e}")
    return sign + out


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _quote(text: str) -> str:
    out = ['"']
    for c in text:
        if c in _ESCAPES:
            out.append(_ESCAPES[c])
        elif c < " ":
            out.append("\\u%04x" % ord(c))
        else:
            out.append(c)
    out.append('"')
    return "".join(out)


def dumps(value: Any) -> str:
    """Serializes compactly with sorted object keys, as serde_json does."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        # serde_json writes NaN and the infinities as null.
        return format_float(value) if math.isfinite(value) else "null"
    if isinstance(value, str):
        return _quote(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(dumps(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(_quote(k) + ":" + dumps(v) for k, v in sorted(value.items())) + "}"
    raise TypeError(f"cannot serialize {type(value).__name__} as JSON")


def to_json(value: Any) -> bytes:
    """Serializes a value as UTF-8 JSON bytes."""
    return dumps(value).encode()


def own_bucket() -> kv.Bucket:
    """The role's own namespace."""
    return kv.Bucket.open("")


def get_json(bucket: kv.Bucket, key: str, default: Any = None) -> Any:
    """The JSON value of `key`, or `default` when absent (a stored JSON `null` is None)."""
    data = bucket.get(key)
    if data is None:
        return default
    try:
        return parse(data)
    except (ValueError, RecursionError) as e:
        raise error("internal", f"value of {json.dumps(key)} is not the expected JSON: {e}") from None


def set_json(bucket: kv.Bucket, key: str, value: Any, ttl_ms: Optional[int]) -> None:
    """Writes `value` as JSON; `ttl_ms` None means no TTL."""
    bucket.set(key, to_json(value), ttl_ms)


def log(level: str, message: str) -> None:
    """A log line (`trace`, `debug`, `info`, `warn`, `error`), tagged with the role by the host."""
    wit_log.log(wit_log.Level[level.upper()], message)


def handle_with(handle: Callable[[bytes], Union[bytes, str]], request: bytes) -> bytes:
    """Runs a handler: state errors pass through as the WIT error they carry;
    any other exception (a bug) becomes `internal` instead of a trap."""
    try:
        response = handle(request)
    except Err:
        raise
    except Exception as e:  # noqa: BLE001 - a role must answer, not trap
        raise error("internal", f"{type(e).__name__}: {e}") from None
    return response.encode() if isinstance(response, str) else response
