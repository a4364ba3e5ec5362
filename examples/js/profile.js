// Records logins on user subjects (like examples/profile). A call with
// `{"user":"u1"}` increments the default property `login_count` of subject
// `user-u1` atomically, sets the extended property `last_login` (seconds
// since the epoch) and answers with the new count as decimal digits.

import { Subject } from 'rolehost:state/subjects@0.1.0';
import { badJson, fromJson, RoleError, role, toBytes } from './lib/role.js';

/** The user name, checked as the Rust role's `Login` struct checks it. */
function readUser(value) {
  let user;
  if (value instanceof Map) {
    if (value.duplicates.has('user')) throw badJson('duplicate field `user`');
    if (!value.has('user')) throw badJson('missing field `user`');
    user = value.get('user');
  } else if (Array.isArray(value)) {
    if (value.length === 0) throw badJson('invalid length 0, expected struct Login with 1 element');
    if (value.length > 1) throw badJson('trailing characters');
    user = value[0];
  } else {
    throw badJson('invalid type, expected struct Login');
  }
  if (typeof user !== 'string') throw badJson('invalid type for `user`, expected a string');
  return user;
}

export const handler = role((body) => {
  const user = readUser(fromJson(body));
  if (user === '') throw new RoleError('invalid-argument', 'user must not be empty');
  const subject = Subject.open('', `user-${user}`);
  const count = subject.increment('default', 'login_count', 1n);
  const now = BigInt(Math.floor(Date.now() / 1000));
  subject.set('extended', 'last_login', new TextDecoder().decode(toBytes(now)));
  subject.store();
  return count.toString();
});
