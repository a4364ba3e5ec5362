// JSON read and written exactly as the Rust roles do (serde_json), so a JS
// role answers byte for byte like its Rust twin and stores the same bytes:
// objects print with sorted keys and no spaces, integers keep all their
// digits (BigInt), floats print in Rust's shortest form (`1.0`, `1e+21`).
//
// Values: null, booleans, strings, arrays, `Map`s (objects), BigInt
// (integers that fit u64/i64) and `JsonFloat` (every other number).

/** A JSON number that is not an integer in the u64/i64 range. */
export class JsonFloat {
  constructor(value) {
    this.value = value;
  }
}

/** Why a document is not valid JSON. */
export class JsonError extends Error {}

const U64_MAX = (1n << 64n) - 1n;
const I64_MIN = -(1n << 63n);
// serde_json refuses documents nested this deep.
const MAX_DEPTH = 128;

/** Parses UTF-8 bytes; throws `JsonError`. Objects remember duplicate keys in `.duplicates`. */
export function parse(bytes) {
  let text;
  try {
    text = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true }).decode(bytes);
  } catch {
    throw new JsonError('invalid UTF-8');
  }
  const parser = new Parser(text);
  parser.skipSpace();
  const value = parser.value(0);
  parser.skipSpace();
  if (parser.pos < text.length) parser.fail('trailing characters');
  return value;
}

class Parser {
  constructor(text) {
    this.text = text;
    this.pos = 0;
  }

  fail(what) {
    throw new JsonError(`${what} at offset ${this.pos}`);
  }

  skipSpace() {
    while (this.pos < this.text.length && ' \t\n\r'.includes(this.text[this.pos])) this.pos++;
  }

  expect(literal, value) {
    if (this.text.startsWith(literal, this.pos)) {
      this.pos += literal.length;
      return value;
    }
    this.fail('expected value');
  }

  value(depth) {
    if (this.pos >= this.text.length) this.fail('EOF while parsing a value');
    const c = this.text[this.pos];
    if (c === '{' || c === '[') {
      if (depth + 1 >= MAX_DEPTH) this.fail('recursion limit exceeded');
      return c === '{' ? this.object(depth + 1) : this.array(depth + 1);
    }
    if (c === '"') return this.string();
    if (c === 't') return this.expect('true', true);
    if (c === 'f') return this.expect('false', false);
    if (c === 'n') return this.expect('null', null);
    if (c === '-' || (c >= '0' && c <= '9')) return this.number();
    this.fail('expected value');
  }

  array(depth) {
    this.pos++;
    const out = [];
    this.skipSpace();
    if (this.text[this.pos] === ']') {
      this.pos++;
      return out;
    }
    for (;;) {
      this.skipSpace();
      out.push(this.value(depth));
      this.skipSpace();
      const c = this.text[this.pos++];
      if (c === ']') return out;
      if (c !== ',') this.fail('expected `,` or `]`');
    }
  }

  object(depth) {
    this.pos++;
    const out = new Map();
    out.duplicates = new Set();
    this.skipSpace();
    if (this.text[this.pos] === '}') {
      this.pos++;
      return out;
    }
    for (;;) {
      this.skipSpace();
      if (this.text[this.pos] !== '"') this.fail('key must be a string');
      const key = this.string();
      this.skipSpace();
      if (this.text[this.pos++] !== ':') this.fail('expected `:`');
      this.skipSpace();
      if (out.has(key)) out.duplicates.add(key);
      out.set(key, this.value(depth));
      this.skipSpace();
      const c = this.text[this.pos++];
      if (c === '}') return out;
      if (c !== ',') this.fail('expected `,` or `}`');
    }
  }

  hex4() {
    const digits = this.text.slice(this.pos, this.pos + 4);
    if (!/^[0-9a-fA-F]{4}$/.test(digits)) this.fail('invalid escape');
    this.pos += 4;
    return parseInt(digits, 16);
  }

  string() {
    this.pos++;
    let out = '';
    for (;;) {
      if (this.pos >= this.text.length) this.fail('EOF while parsing a string');
      const c = this.text[this.pos++];
      if (c === '"') return out;
      if (c < ' ') this.fail('control character found while parsing a string');
      if (c !== '\\') {
        out += c;
        continue;
      }
      const e = this.text[this.pos++];
      const simple = { '"': '"', '\\': '\\', '/': '/', b: '\b', f: '\f', n: '\n', r: '\r', t: '\t' }[e];
      if (simple !== undefined) {
        out += simple;
        continue;
      }
      if (e !== 'u') this.fail('invalid escape');
      let unit = this.hex4();
      if (unit >= 0xdc00 && unit <= 0xdfff) this.fail('lone trailing surrogate in hex escape');
      if (unit >= 0xd800 && unit <= 0xdbff) {
        if (!this.text.startsWith('\\u', this.pos)) this.fail('lone leading surrogate in hex escape');
        this.pos += 2;
        const low = this.hex4();
        if (low < 0xdc00 || low > 0xdfff) this.fail('lone leading surrogate in hex escape');
        out += String.fromCharCode(unit, low);
        continue;
      }
      out += String.fromCharCode(unit);
    }
  }

  number() {
    const match = /^-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?/.exec(this.text.slice(this.pos));
    if (!match || match[0] === '-') this.fail('invalid number');
    this.pos += match[0].length;
    // serde_json reads `-0` as the float -0.0.
    if (match[2] === undefined && match[3] === undefined && match[0] !== '-0') {
      const int = BigInt(match[0]);
      if (int >= I64_MIN && int <= U64_MAX) return int;
    }
    const float = Number(match[0]);
    if (!Number.isFinite(float)) this.fail('number out of range');
    return new JsonFloat(float);
  }
}

/** Compares strings by code point, as Rust orders `String`s. */
function byCodePoint(a, b) {
  const x = Array.from(a);
  const y = Array.from(b);
  for (let i = 0; i < Math.min(x.length, y.length); i++) {
    const d = x[i].codePointAt(0) - y[i].codePointAt(0);
    if (d !== 0) return d;
  }
  return x.length - y.length;
}

function quote(text) {
  let out = '"';
  for (const c of text) {
    const simple = { '"': '\\"', '\\': '\\\\', '\b': '\\b', '\f': '\\f', '\n': '\\n', '\r': '\\r', '\t': '\\t' }[c];
    if (simple !== undefined) out += simple;
    else if (c < ' ') out += '\\u' + c.charCodeAt(0).toString(16).padStart(4, '0');
    else out += c;
  }
  return out + '"';
}

const exponentText = (e) => (e < 0 ? `e${e}` : `e+${e}`);

/** Formats a finite float as serde_json does: shortest digits, `e` notation outside 1e-5..1e16. */
export function formatFloat(x) {
  if (x === 0) return Object.is(x, -0) ? '-0.0' : '0.0';
  const sign = x < 0 ? '-' : '';
  // toExponential() gives the shortest digits that read back as `x`.
  const [mantissa, exponent] = Math.abs(x).toExponential().split('e');
  const digits = mantissa.replace('.', '');
  const length = digits.length;
  const kk = Number(exponent) + 1; // 10^(kk-1) <= |x| < 10^kk
  const k = kk - length;
  let out;
  if (k >= 0 && kk <= 16) out = digits + '0'.repeat(k) + '.0';
  else if (kk > 0 && kk <= 16) out = digits.slice(0, kk) + '.' + digits.slice(kk);
  else if (kk > -5 && kk <= 0) out = '0.' + '0'.repeat(-kk) + digits;
  else out = (length === 1 ? digits : digits[0] + '.' + digits.slice(1)) + exponentText(kk - 1);
  return sign + out;
}

/** A float as serde_json writes it: NaN and the infinities as `null`. */
function floatText(x) {
  return Number.isFinite(x) ? formatFloat(x) : 'null';
}

/** Serializes a value compactly with sorted object keys, as serde_json does. */
export function stringify(value) {
  if (value === null || value === undefined) return 'null';
  if (value === true) return 'true';
  if (value === false) return 'false';
  if (typeof value === 'bigint') return value.toString();
  if (typeof value === 'string') return quote(value);
  if (value instanceof JsonFloat) return floatText(value.value);
  if (typeof value === 'number') {
    return Number.isInteger(value) && !Object.is(value, -0) ? BigInt(value).toString() : floatText(value);
  }
  if (Array.isArray(value)) return '[' + value.map(stringify).join(',') + ']';
  const entries = value instanceof Map ? [...value.entries()] : Object.entries(value);
  entries.sort(([a], [b]) => byCodePoint(a, b));
  return '{' + entries.map(([k, v]) => quote(k) + ':' + stringify(v)).join(',') + '}';
}

/** Serializes a value as UTF-8 JSON bytes. */
export function toBytes(value) {
  return new TextEncoder().encode(stringify(value));
}
