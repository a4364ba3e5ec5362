//! Redis-compatible glob patterns: validation, escaping and matching.
//!
//! The matcher follows Redis's `stringmatchlen` on bytes (`?` is one byte),
//! so the memory backend lists exactly what `SCAN MATCH` would.

use crate::error::{StateError, StateResult};

/// Most `*` a guest pattern may hold. Many stars make some matchers slow,
/// and no sensible listing needs more.
pub const MAX_STARS: usize = 8;

/// Escapes every glob metacharacter so `text` matches only itself.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Checks that `pattern` is well formed: no control characters, every `[`
/// closed and not empty, no dangling `\`, at most [`MAX_STARS`] stars.
pub fn validate(pattern: &str) -> StateResult<()> {
    let invalid = |why: &str| Err(StateError::InvalidKey(format!("invalid pattern: {why}")));
    if pattern.chars().any(char::is_control) {
        return invalid("control character");
    }
    let bytes = pattern.as_bytes();
    let (mut i, mut stars) = (0, 0);
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if i + 1 == bytes.len() => return invalid("ends with an unescaped `\\`"),
            b'\\' => i += 1,
            b'*' => stars += 1,
            b'[' => match class(bytes, i, 0) {
                Some((_, end)) => i = end - 1,
                None => return invalid("malformed `[…]`: unclosed, empty, or a range ending in `]` or `\\`"),
            },
            _ => {}
        }
        i += 1;
    }
    if stars > MAX_STARS {
        return invalid(&format!("more than {MAX_STARS} `*`"));
    }
    Ok(())
}

/// The bytes every match must start with: the pattern up to its first
/// unescaped metacharacter, with escapes resolved.
pub fn literal_prefix(pattern: &str) -> String {
    let mut out = String::new();
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        match c {
            '*' | '?' | '[' => break,
            '\\' => match chars.next() {
                Some(escaped) => out.push(escaped),
                None => out.push('\\'),
            },
            _ => out.push(c),
        }
    }
    out
}

/// True when `text` matches `pattern`, with Redis's semantics.
///
/// Backtracks only to the last `*`, so the cost is at most
/// `pattern.len() * text.len()` steps whatever the pattern.
pub fn matches(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            pi += 1;
            star = Some((pi, ti));
            continue;
        }
        if let Some(next) = (pi < p.len()).then(|| match_one(p, pi, t[ti])).flatten() {
            pi = next;
            ti += 1;
            continue;
        }
        match star {
            Some((sp, st)) => {
                pi = sp;
                ti = st + 1;
                star = Some((sp, st + 1));
            }
            None => return false,
        }
    }
    p.get(pi..).is_some_and(|rest| rest.iter().all(|&b| b == b'*'))
}

/// Matches one non-star token at `p[pi]` against byte `c`; on success the
/// index of the next token.
fn match_one(p: &[u8], pi: usize, c: u8) -> Option<usize> {
    match p[pi] {
        b'?' => Some(pi + 1),
        b'\\' if pi + 1 < p.len() => (p[pi + 1] == c).then_some(pi + 2),
        b'[' => class(p, pi, c).and_then(|(hit, end)| hit.then_some(end)),
        literal => (literal == c).then_some(pi + 1),
    }
}

/// Reads the class `[...]` starting at `p[start]` and tests byte `c`
/// against it: whether it matches, and the index after `]`. None when the
/// class is unclosed, empty or has a range ending in an escape or in `]`
/// (`[a-]`, which Redis reads as the range `]`..`a` and this would read as
/// `a` or `-`: refused rather than matched two ways). The one parser of
/// classes, for validation and matching alike.
fn class(p: &[u8], start: usize, c: u8) -> Option<(bool, usize)> {
    let mut i = start + 1;
    let negate = p.get(i) == Some(&b'^');
    if negate {
        i += 1;
    }
    let first = i;
    let mut hit = false;
    loop {
        match *p.get(i)? {
            b']' if i > first => return Some((hit != negate, i + 1)),
            b']' => return None,
            b'\\' => {
                hit |= *p.get(i + 1)? == c;
                i += 2;
            }
            lo if p.get(i + 1) == Some(&b'-') && p.get(i + 2).is_some() => {
                let hi = p[i + 2];
                if hi == b'\\' || hi == b']' {
                    return None;
                }
                hit |= (lo.min(hi)..=lo.max(hi)).contains(&c);
                i += 3;
            }
            byte => {
                hit |= byte == c;
                i += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_like_redis() {
        let cases = [
            ("*", "anything", true),
            ("a*", "abc", true),
            ("a*", "bac", false),
            ("*c", "abc", true),
            ("a?c", "abc", true),
            ("a?c", "ac", false),
            ("[a-c]x", "bx", true),
            ("[a-c]x", "dx", false),
            ("[^a-c]x", "dx", true),
            ("[c-a]x", "bx", true),
            ("\\*", "*", true),
            ("\\*", "a", false),
            ("*:*", "a:b", true),
            ("*:*", "ab", false),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("[\\]]", "]", true),
            ("", "", true),
        ];
        for (pattern, text, expected) in cases {
            assert_eq!(matches(pattern, text), expected, "{pattern:?} vs {text:?}");
        }
    }

    #[test]
    fn escape_round_trips() {
        for text in ["a*b", "[x]", "back\\slash", "q?", "plain:key"] {
            let escaped = escape(text);
            validate(&escaped).unwrap();
            assert!(matches(&escaped, text));
            assert_eq!(literal_prefix(&escaped), text);
            assert!(!matches(&escaped, &format!("{text}x")));
        }
    }

    #[test]
    fn rejects_malformed_patterns() {
        for bad in ["[abc", "abc\\", "[]", "a\u{1}b", "*********x", "[a-\\\\]", "[^]", "[\\", "[a-]", "[^x-]y"] {
            assert!(matches!(validate(bad), Err(StateError::InvalidKey(_))), "{bad:?}");
        }
        for good in ["*", "[a-z]*", "\\*", "..", "user:*:x"] {
            validate(good).unwrap();
        }
    }

    #[test]
    fn pathological_pattern_is_fast() {
        let text = "a".repeat(10_000);
        assert!(!matches("*a*a*a*a*a*a*a*b", &text));
    }
}
