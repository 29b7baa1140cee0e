//! What a camera frame looks like, from its bytes: a JPEG marker scanner.
//!
//! What it is: an allocation-free, bounds-checked walk over the marker
//! segments at the head of a JPEG (SOI, then `FF xx` segments with their
//! lengths) that stops at the first SOF (for width and height) or SOS, plus
//! the check a truncated frame fails: a JPEG ends with EOI (`FF D9`). It is
//! fed the first bytes of the file and the last two; it never reads past
//! what it is given (fuzzed in issue 8).
//! What it is not: a decoder. A frame whose entropy-coded data is garbage
//! but whose markers are whole is `valid` here; the optional external
//! analyzer is the place for pixel-level checks.

/// What the head of a frame says.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Head {
    /// Starts with SOI (`FF D8`).
    pub soi: bool,
    pub width: u16,
    pub height: u16,
    /// A start-of-frame marker was found before the data ran out.
    pub sof: bool,
}

/// Scans the marker segments in `head` (the first bytes of the file).
pub fn scan_head(head: &[u8]) -> Head {
    let mut out = Head::default();
    if head.len() < 2 || head[0] != 0xFF || head[1] != 0xD8 {
        return out;
    }
    out.soi = true;
    let mut i = 2;
    loop {
        // Skip fill bytes: a marker is FF followed by a non-FF byte.
        while i < head.len() && head[i] == 0xFF && head.get(i + 1) == Some(&0xFF) {
            i += 1;
        }
        let (Some(&ff), Some(&marker)) = (head.get(i), head.get(i + 1)) else {
            return out;
        };
        if ff != 0xFF {
            return out; // not a marker where one must be: give up
        }
        i += 2;
        match marker {
            // Markers without a length.
            0x01 | 0xD0..=0xD7 => continue,
            0xD8 | 0xD9 => return out,
            _ => {}
        }
        let (Some(&hi), Some(&lo)) = (head.get(i), head.get(i + 1)) else {
            return out;
        };
        let len = usize::from(u16::from_be_bytes([hi, lo]));
        if len < 2 {
            return out;
        }
        let is_sof = matches!(marker, 0xC0..=0xCF) && !matches!(marker, 0xC4 | 0xC8 | 0xCC);
        if is_sof {
            // [len:2][precision:1][height:2][width:2]...
            if let Some(seg) = head.get(i..i + 7) {
                out.height = u16::from_be_bytes([seg[3], seg[4]]);
                out.width = u16::from_be_bytes([seg[5], seg[6]]);
                out.sof = true;
            }
            return out;
        }
        if marker == 0xDA {
            return out; // start of scan: entropy-coded data follows
        }
        i = match i.checked_add(len) {
            Some(next) => next,
            None => return out,
        };
    }
}

/// True if the last two bytes of a frame are EOI (`FF D9`).
pub fn ends_with_eoi(tail: &[u8]) -> bool {
    tail.len() >= 2 && tail[tail.len() - 2..] == [0xFF, 0xD9]
}

/// Builds a small frame with the markers a scanner looks at (SOI, APP0,
/// DQT, SOF0 with the given size, SOS, `body` as entropy data, EOI). For
/// tests, the demo and benchmarks; not a decodable image.
pub fn synthetic(width: u16, height: u16, body: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&[0xFF, 0xD8]);
    // APP0 "JFIF"
    out.extend_from_slice(&[
        0xFF, 0xE0, 0x00, 0x10, b'J', b'F', b'I', b'F', 0, 1, 1, 0, 0, 1, 0, 1, 0, 0,
    ]);
    // DQT: one 8-bit table of 64 ones
    out.extend_from_slice(&[0xFF, 0xDB, 0x00, 0x43, 0x00]);
    out.extend(std::iter::repeat_n(1u8, 64));
    // SOF0: precision 8, height, width, 3 components
    out.extend_from_slice(&[0xFF, 0xC0, 0x00, 0x11, 0x08]);
    out.extend_from_slice(&height.to_be_bytes());
    out.extend_from_slice(&width.to_be_bytes());
    out.extend_from_slice(&[0x03, 1, 0x22, 0, 2, 0x11, 0, 3, 0x11, 0]);
    // SOS
    out.extend_from_slice(&[
        0xFF, 0xDA, 0x00, 0x0C, 0x03, 1, 0, 2, 0x11, 3, 0x11, 0x00, 0x3F, 0x00,
    ]);
    // Entropy-coded data: an FF in it is stuffed with 00, as in a real JPEG.
    for &b in body {
        out.push(b);
        if b == 0xFF {
            out.push(0x00);
        }
    }
    out.extend_from_slice(&[0xFF, 0xD9]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_size_in_a_synthetic_frame() {
        let mut f = Vec::new();
        synthetic(1280, 720, &[1, 2, 0xFF, 3], &mut f);
        let h = scan_head(&f);
        assert_eq!(
            h,
            Head {
                soi: true,
                width: 1280,
                height: 720,
                sof: true
            }
        );
        assert!(ends_with_eoi(&f));
        assert!(!ends_with_eoi(&f[..f.len() - 1]), "truncated");
    }

    #[test]
    fn progressive_and_fill_bytes_are_understood() {
        let mut f = Vec::new();
        synthetic(640, 480, &[], &mut f);
        // Make it progressive (SOF2) and put fill bytes before the SOF.
        let sof = f.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
        f[sof + 1] = 0xC2;
        f.insert(sof, 0xFF);
        let h = scan_head(&f);
        assert_eq!((h.width, h.height, h.sof), (640, 480, true));
    }

    #[test]
    fn garbage_and_truncation_never_panic() {
        let mut f = Vec::new();
        synthetic(320, 240, &[0xAB; 100], &mut f);
        for cut in 0..f.len() {
            let h = scan_head(&f[..cut]);
            if cut < 2 {
                assert!(!h.soi);
            }
            if h.sof {
                assert_eq!((h.width, h.height), (320, 240));
            }
        }
        assert_eq!(scan_head(b"not a jpeg"), Head::default());
        assert!(
            !scan_head(&[0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x01]).sof,
            "a length below 2"
        );
        assert!(
            !scan_head(&[0xFF, 0xD8, 0xFF, 0xE0, 0xFF, 0xFF, 0, 0]).sof,
            "a length past the end"
        );
    }
}
