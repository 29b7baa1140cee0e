//! JSON with comments, as maintenance configs in the field are written.
//!
//! What it is: a single pass that blanks out `//` line comments, `/* */`
//! block comments and trailing commas, replacing them with spaces (newlines
//! are kept), so the result is plain JSON whose every byte sits at the same
//! line and column as in the user's file. Errors reported by the JSON parser
//! therefore point at the right place in the original text.
//! What it is not: a JSON parser. Strings are only tracked so that a `//`
//! inside `"http://..."` is left alone.

/// Where an unclosed construct started, 1-based.
#[derive(Debug, PartialEq, Eq)]
pub struct Unclosed {
    pub what: &'static str,
    pub line: usize,
    pub column: usize,
}

/// Returns `text` with comments and trailing commas blanked out.
pub fn strip(text: &str) -> Result<String, Unclosed> {
    let mut out = text.as_bytes().to_vec();
    let bytes = text.as_bytes();
    let mut i = 0;
    // The last comma seen outside strings whose fate is not yet known: it is
    // trailing if the next significant byte closes an object or array.
    let mut pending_comma: Option<usize> = None;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                let start = i;
                i += 1;
                loop {
                    match bytes.get(i) {
                        None => return Err(unclosed("string", bytes, start)),
                        Some(b'\\') => i += 2,
                        Some(b'"') => break,
                        Some(b'\n') => return Err(unclosed("string", bytes, start)),
                        Some(_) => i += 1,
                    }
                }
                pending_comma = None;
                i += 1;
            }
            b'/' if bytes.get(i + 1) == Some(&b'/') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    out[i] = b' ';
                    i += 1;
                }
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                let start = i;
                out[i] = b' ';
                out[i + 1] = b' ';
                i += 2;
                loop {
                    match bytes.get(i) {
                        None => return Err(unclosed("comment", bytes, start)),
                        Some(b'*') if bytes.get(i + 1) == Some(&b'/') => {
                            out[i] = b' ';
                            out[i + 1] = b' ';
                            i += 2;
                            break;
                        }
                        Some(b'\n') => i += 1,
                        Some(_) => {
                            out[i] = b' ';
                            i += 1;
                        }
                    }
                }
            }
            b',' => {
                pending_comma = Some(i);
                i += 1;
            }
            b'}' | b']' => {
                if let Some(at) = pending_comma.take() {
                    out[at] = b' ';
                }
                i += 1;
            }
            b' ' | b'\t' | b'\r' | b'\n' => i += 1,
            _ => {
                pending_comma = None;
                i += 1;
            }
        }
    }
    // Only ASCII bytes were replaced by ASCII spaces, so this stays UTF-8.
    Ok(String::from_utf8(out).expect("blanking ASCII keeps UTF-8 valid"))
}

fn unclosed(what: &'static str, bytes: &[u8], at: usize) -> Unclosed {
    let before = &bytes[..at];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |p| p + 1);
    let column = String::from_utf8_lossy(&before[line_start..])
        .chars()
        .count()
        + 1;
    Unclosed { what, line, column }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_become_spaces_at_the_same_positions() {
        let text = "{ // note\n  \"a\": 1, /* b */ \"b\": 2\n}";
        let plain = strip(text).unwrap();
        assert_eq!(plain.len(), text.len());
        assert_eq!(plain, "{        \n  \"a\": 1,         \"b\": 2\n}");
        let v: serde_json::Value = serde_json::from_str(&plain).unwrap();
        assert_eq!(v["b"], 2);
    }

    #[test]
    fn slashes_inside_strings_are_kept() {
        let text = r#"{"url": "http://x/*y*/", "q": "say \"//\""}"#;
        assert_eq!(strip(text).unwrap(), text);
    }

    #[test]
    fn trailing_commas_are_forgiven() {
        let plain = strip("{\"a\": [1, 2, /* c */ ], \"b\": 3, // x\n}").unwrap();
        let v: serde_json::Value = serde_json::from_str(&plain).unwrap();
        assert_eq!(v["a"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn an_unclosed_block_comment_names_where_it_starts() {
        let err = strip("{\n  \"a\": 1 /* never\n closed").unwrap_err();
        assert_eq!(
            err,
            Unclosed {
                what: "comment",
                line: 2,
                column: 10
            }
        );
    }

    #[test]
    fn an_unclosed_string_names_where_it_starts() {
        let err = strip("{\"a\": \"abc").unwrap_err();
        assert_eq!((err.what, err.line, err.column), ("string", 1, 7));
    }
}
