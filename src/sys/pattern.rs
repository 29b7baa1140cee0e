//! File-name patterns, matched by the C library's fnmatch(3).
//!
//! What it is: a list of patterns made into C strings once, and a match of
//! a file name (bytes, any encoding) that copies the name into a stack
//! buffer to NUL-terminate it. No allocation per match. What it is not:
//! path globbing: a pattern never contains '/', config validation sees to it.

use std::ffi::CString;

/// Longest file name Linux allows (NAME_MAX), plus the NUL.
const NAME_BUF: usize = 256;

#[derive(Clone, Debug)]
pub struct Patterns {
    list: Vec<CString>,
}

impl Patterns {
    /// Patterns containing a NUL byte (rejected by config validation) are
    /// dropped.
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Patterns {
        Patterns {
            list: patterns
                .iter()
                .filter_map(|p| CString::new(p.as_ref()).ok())
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// True if `name` matches any pattern.
    pub fn matches(&self, name: &[u8]) -> bool {
        if name.len() >= NAME_BUF || name.contains(&0) {
            return false;
        }
        let mut buf = [0u8; NAME_BUF];
        buf[..name.len()].copy_from_slice(name);
        self.list.iter().any(|p| {
            // SAFETY: both pointers are NUL-terminated strings that live
            // across the call: `p` is a CString, `buf` is zero-filled past
            // `name` (checked shorter than the buffer, without NULs).
            unsafe { libc::fnmatch(p.as_ptr(), buf.as_ptr().cast(), 0) == 0 }
        })
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
}
