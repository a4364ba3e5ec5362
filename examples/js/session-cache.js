// A session cache (cache-aside), answering exactly like
// examples/session-cache. Requests are JSON:
//
// - `{"op":"put","id":"s1","session":{…},"ttl_ms":60000}` → `{"stored":true}`
// - `{"op":"get","id":"s1"}` → `{"session":{…}}` or `{"session":null}`
// - `{"op":"delete","id":"s1"}` → `{"deleted":true}`
// - `{"op":"fetch","id":"s1"}` → the cached session, or one "loaded from the
//   origin" and cached for 5 minutes: `{"session":{…},"cached":false}`

import { badJson, fromJson, getJson, log, ownBucket, role, setJson, toBytes } from './lib/role.js';

const ORIGIN_TTL_MS = 300_000n;

// The fields of each operation, in order (the array form lists them so).
const OPS = { put: ['id', 'session', 'ttl_ms'], get: ['id'], delete: ['id'], fetch: ['id'] };

/** The request as `{ op, id, session, ttl_ms }`, checked as the Rust role's serde types check it. */
function readRequest(value) {
  let op;
  let field;
  if (value instanceof Map) {
    if (value.duplicates.has('op')) throw badJson('duplicate field `op`');
    if (!value.has('op')) throw badJson('missing field `op`');
    op = value.get('op');
    field = (name) => {
      if (value.duplicates.has(name)) throw badJson(`duplicate field \`${name}\``);
      return value.has(name) ? { value: value.get(name) } : undefined;
    };
  } else if (Array.isArray(value) && value.length > 0) {
    op = value[0];
    field = (name) => {
      const i = OPS[op].indexOf(name) + 1;
      return i < value.length ? { value: value[i] } : undefined;
    };
    if (Object.hasOwn(OPS, op) && value.length !== OPS[op].length + 1) {
      throw badJson(`invalid length ${value.length - 1}, expected ${OPS[op].length} fields`);
    }
  } else {
    throw badJson('invalid type, expected a request object');
  }
  if (typeof op !== 'string') throw badJson('invalid type for `op`, expected a string');
  if (!Object.hasOwn(OPS, op)) {
    throw badJson(`unknown variant \`${op}\`, expected one of \`put\`, \`get\`, \`delete\`, \`fetch\``);
  }
  const request = { op };
  for (const name of OPS[op]) {
    const found = field(name);
    if (name === 'id') {
      if (found === undefined) throw badJson('missing field `id`');
      if (typeof found.value !== 'string') throw badJson('invalid type for `id`, expected a string');
      request.id = found.value;
    } else if (name === 'session') {
      if (found === undefined) throw badJson('missing field `session`');
      request.session = found.value;
    } else if (found !== undefined && found.value !== null) {
      if (typeof found.value !== 'bigint' || found.value < 0n) throw badJson('invalid type for `ttl_ms`, expected u64');
      request.ttl_ms = found.value;
    }
  }
  return request;
}

const key = (id) => `session:${id}`;

export const handler = role((body) => {
  const bucket = ownBucket();
  const request = readRequest(fromJson(body));
  const k = key(request.id);
  switch (request.op) {
    case 'put':
      setJson(bucket, k, request.session, request.ttl_ms);
      return toBytes({ stored: true });
    case 'get':
      return toBytes({ session: getJson(bucket, k) });
    case 'delete':
      return toBytes({ deleted: bucket.delete(k) });
    default: {
      const cached = getJson(bucket, k);
      if (cached !== undefined) return toBytes({ session: cached, cached: true });
      log.info(`cache miss for session ${request.id}; loading from origin`);
      const session = { id: request.id, user: `user-of-${request.id}` };
      setJson(bucket, k, session, ORIGIN_TTL_MS);
      return toBytes({ session, cached: false });
    }
  }
});
