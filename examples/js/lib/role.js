// A small guest SDK for JavaScript roles: WIT errors, JSON requests and
// values, and the handler export. State calls that fail throw an error
// whose `payload` is the WIT `error` variant (`{ tag, val }`).

import { Bucket } from 'rolehost:state/kv@0.1.0';
import { log as witLog } from 'rolehost:state/log@0.1.0';
import { JsonError, parse, toBytes } from './json.js';

export { toBytes } from './json.js';

const TAGS = new Set([
  'invalid-key',
  'invalid-argument',
  'too-large',
  'access-denied',
  'quota-exceeded',
  'unavailable',
  'conflict',
  'internal',
]);

/** A WIT error to throw from a handler, e.g. `new RoleError('invalid-argument', 'user must not be empty')`. */
export class RoleError extends Error {
  constructor(tag, message) {
    super(`${tag}: ${message}`);
    this.payload = { tag, val: message };
  }
}

/** Parses a JSON request body; a parse failure is `invalid-argument`. */
export function fromJson(bytes) {
  try {
    return parse(bytes);
  } catch (e) {
    if (e instanceof JsonError) throw badJson(e.message);
    throw e;
  }
}

/** The `invalid-argument` error for a request that is not what the role expects. */
export function badJson(detail) {
  return new RoleError('invalid-argument', `bad JSON: ${detail}`);
}

/** The role's own namespace. */
export function ownBucket() {
  return Bucket.open('');
}

/** The JSON value of `key`, or undefined when absent (a stored JSON `null` is null). */
export function getJson(bucket, key) {
  const bytes = bucket.get(key);
  if (bytes === undefined || bytes === null) return undefined;
  try {
    return parse(bytes);
  } catch (e) {
    throw new RoleError('internal', `value of ${JSON.stringify(key)} is not the expected JSON: ${e.message}`);
  }
}

/** Writes `value` as JSON; `ttlMs` (a number or BigInt) or null for no TTL. */
export function setJson(bucket, key, value, ttlMs) {
  bucket.set(key, toBytes(value), ttlMs === null || ttlMs === undefined ? undefined : BigInt(ttlMs));
}

/** Log lines, tagged with the role by the host. */
export const log = Object.fromEntries(
  ['trace', 'debug', 'info', 'warn', 'error'].map((level) => [level, (message) => witLog(level, message)]),
);

/**
 * The `handler` export for a function from request bytes to response bytes
 * (or a string). Errors become the WIT error they carry; anything else
 * thrown (a bug) becomes `internal` instead of a trap.
 */
export function role(handle) {
  return {
    handle(request) {
      try {
        const response = handle(request);
        return typeof response === 'string' ? new TextEncoder().encode(response) : response;
      } catch (e) {
        if (e && e.payload && TAGS.has(e.payload.tag)) throw e.payload;
        if (e && TAGS.has(e.tag)) throw e; // a bare `{ tag, val }`
        throw { tag: 'internal', val: String(e) };
      }
    },
  };
}
