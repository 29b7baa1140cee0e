//! File-name patterns, matched by the C library's fnmatch(3).
//!
//! What it is: a list of patterns made into C strings once, and a match of
//! a file name (bytes, any encoding) that copies the name into a stack
//! buffer to NUL-terminate it. No allocation per match. The patterns the
//! field uses most (`*.jpg`, `casa-*.log`, `TMPPOINTING*`: at most one `*`
//! and no other special character) are matched as a prefix and a suffix
//! without calling fnmatch: the same answer (flags 0, the C locale: bytes,
//! and `*` matches any run, a leading `.` too), at a fraction of the cost
//! on a walk over 220,000 names; anything else goes to fnmatch(3).
//! What it is not: path globbing: a pattern never contains '/', config
//! validation sees to it.

use std::ffi::CString;

/// Longest file name Linux allows (NAME_MAX), plus the NUL.
const NAME_BUF: usize = 256;

#[derive(Clone, Debug)]
enum Matcher {
    /// `<prefix>*<suffix>`, or `<literal>` when `star` is false.
    Literal {
        prefix: Vec<u8>,
        suffix: Vec<u8>,
        star: bool,
    },
    Fnmatch(CString),
}

impl Matcher {
    fn new(pattern: &str) -> Option<Matcher> {
        let b = pattern.as_bytes();
        let special = |c: &u8| matches!(c, b'?' | b'[' | b'\\' | b'*');
        let stars = b.iter().filter(|c| **c == b'*').count();
        let others = b.iter().filter(|c| special(c) && **c != b'*').count();
        if stars <= 1 && others == 0 {
            let (prefix, suffix) = match b.iter().position(|c| *c == b'*') {
                Some(i) => (b[..i].to_vec(), b[i + 1..].to_vec()),
                None => (b.to_vec(), Vec::new()),
            };
            return Some(Matcher::Literal {
                prefix,
                suffix,
                star: stars == 1,
            });
        }
        CString::new(pattern).ok().map(Matcher::Fnmatch)
    }

    /// For a list without fnmatch patterns.
    fn matches_literal(&self, name: &[u8]) -> bool {
        match self {
            Matcher::Literal {
                prefix,
                suffix,
                star: true,
            } => {
                name.len() >= prefix.len() + suffix.len()
                    && same_bytes(&name[..prefix.len()], prefix)
                    && same_bytes(&name[name.len() - suffix.len()..], suffix)
            }
            Matcher::Literal { prefix, .. } => name == prefix.as_slice(),
            Matcher::Fnmatch(_) => false,
        }
    }

    fn matches(&self, name: &[u8], cname: &[u8; NAME_BUF]) -> bool {
        match self {
            Matcher::Literal { .. } => self.matches_literal(name),
            // SAFETY: both pointers are NUL-terminated strings that live
            // across the call: `p` is a CString, `cname` is zero-filled past
            // `name` (checked shorter than the buffer, without NULs).
            Matcher::Fnmatch(p) => unsafe {
                libc::fnmatch(p.as_ptr(), cname.as_ptr().cast(), 0) == 0
            },
        }
    }
}

/// Equal bytes, compared inline: the prefix and suffix of a pattern are a
/// few bytes (often none, as in `*.jpg`), and a call to memcmp for each
/// was a fifth of a retention pass's user time.
#[inline]
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x == y)
}

#[derive(Clone, Debug)]
pub struct Patterns {
    list: Vec<Matcher>,
    /// Some pattern needs fnmatch, and so a NUL-terminated name.
    any_fnmatch: bool,
}

impl Patterns {
    /// Patterns containing a NUL byte (rejected by config validation) are
    /// dropped.
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Patterns {
        let list: Vec<Matcher> = patterns
            .iter()
            .filter(|p| !p.as_ref().contains('\0'))
            .filter_map(|p| Matcher::new(p.as_ref()))
            .collect();
        let any_fnmatch = list.iter().any(|m| matches!(m, Matcher::Fnmatch(_)));
        Patterns { list, any_fnmatch }
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// True if `name` matches any pattern.
    pub fn matches(&self, name: &[u8]) -> bool {
        if !self.any_fnmatch {
            // No NUL-terminated copy needed (nor the 256 bytes it zeroes),
            // nor a search for a NUL: names come from directory entries and
            // inotify events, which never hold one.
            return self.list.iter().any(|m| m.matches_literal(name));
        }
        if name.len() >= NAME_BUF || name.contains(&0) {
            return false;
        }
        let mut buf = [0u8; NAME_BUF];
        buf[..name.len()].copy_from_slice(name);
        self.list.iter().any(|m| m.matches(name, &buf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_patterns_on_byte_names() {
        let p = Patterns::new(&["casa-*.log", "TMPPOINTING*", "frame_[0-9]?.jpg"]);
        assert!(p.matches(b"casa-2026.log"));
        assert!(p.matches(b"casa-a b\nc.log"));
        assert!(p.matches(b"casa-\xff\xfe.log"), "non-UTF-8 names match too");
        assert!(p.matches(b"TMPPOINTING_0001"));
        assert!(p.matches(b"frame_12.jpg"));
        assert!(!p.matches(b"casa-1.log.tmp"));
        assert!(!p.matches(b"xcasa-1.log"));
        assert!(!p.matches(&[b'a'; 300]));
        assert!(Patterns::new::<&str>(&[]).is_empty());
    }

    /// What fnmatch(3) itself says, for comparison.
    fn fnmatch(pattern: &str, name: &[u8]) -> bool {
        let p = CString::new(pattern).unwrap();
        let n = CString::new(name).unwrap();
        // SAFETY: two NUL-terminated strings that outlive the call.
        unsafe { libc::fnmatch(p.as_ptr(), n.as_ptr(), 0) == 0 }
    }

    #[test]
    fn the_literal_fast_path_agrees_with_fnmatch() {
        let patterns = [
            "*.jpg",
            "casa-*.log",
            "TMPPOINTING*",
            "*",
            "exact.json",
            "a*a",
            "*.",
            ".*",
            "*.tar.gz",
            "",
            "x*",
            "*x",
            "frame_[0-9]?.jpg",
            "a\\*b",
            "*.j?g",
            "**.jpg",
        ];
        let names: [&[u8]; 24] = [
            b"x.jpg",
            b".jpg",
            b"jpg",
            b"x.jpg.tmp",
            b"casa-1.log",
            b"casa-.log",
            b"casa-log",
            b"casa.log",
            b"TMPPOINTING",
            b"TMPPOINTING_0815",
            b"tmppointing_1",
            b"exact.json",
            b"exact.json2",
            b"a",
            b"aa",
            b"aba",
            b"x.",
            b".hidden",
            b"a.tar.gz",
            b"x",
            b"frame_12.jpg",
            b"a*b",
            b"a\xff\xfe.jpg",
            b"casa-\n.log",
        ];
        for pat in patterns {
            let p = Patterns::new(&[pat]);
            for name in names {
                assert_eq!(
                    p.matches(name),
                    fnmatch(pat, name),
                    "{pat:?} on {:?}",
                    String::from_utf8_lossy(name)
                );
            }
        }
    }
}
