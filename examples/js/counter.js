// Counts its calls: each call increments `count` atomically and answers
// with the new value as decimal digits (like examples/counter).

import { increment } from 'rolehost:state/atomics@0.1.0';
import { ownBucket, role } from './lib/role.js';

export const handler = role(() => increment(ownBucket(), 'count', 1n).toString());
