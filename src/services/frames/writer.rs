//! An ffmpeg-like frame writer, for the demo, tests and benchmarks.
//!
//! What it is: writes `capture_%09d.jpg` frames the way ffmpeg does with
//! `-atomic_writing 1` (to `NAME.tmp`, then renamed into place), each a
//! synthetic JPEG of a given size whose content changes with its number;
//! it can repeat a frame (a freeze), write a truncated one (corrupt), a tiny
//! one (dark), skip numbers (dropped frames) and start again at 1 (a capture
//! restart). What it is not: a camera; the frames are not decodable images.

use std::io;
use std::path::{Path, PathBuf};

use super::jpeg;

pub struct FrameWriter {
    dir: PathBuf,
    /// The number the next frame gets.
    pub next: u64,
    width: u16,
    height: u16,
    bytes: usize,
    buf: Vec<u8>,
    body: Vec<u8>,
    last_body_seed: u64,
}

/// What the next frame should be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A new image.
    Fresh,
    /// The same bytes as the previous frame.
    Repeat,
    /// Cut in the middle: no EOI.
    Truncated,
    /// A small uniform image (black).
    Dark,
}

impl FrameWriter {
    /// Frames of about `bytes` bytes, `width`×`height`, numbered from 1.
    pub fn new(dir: &Path, width: u16, height: u16, bytes: usize) -> FrameWriter {
        FrameWriter {
            dir: dir.to_path_buf(),
            next: 1,
            width,
            height,
            bytes: bytes.max(64),
            buf: Vec::with_capacity(bytes + 1024),
            body: Vec::with_capacity(bytes),
            last_body_seed: 0,
        }
    }

    pub fn name(n: u64) -> String {
        format!("capture_{n:09}.jpg")
    }

    /// Writes the next frame (temporary, then rename); returns its name and
    /// its bytes.
    pub fn write(&mut self, kind: Kind) -> io::Result<(String, &[u8])> {
        let n = self.next;
        self.next += 1;
        match kind {
            Kind::Fresh | Kind::Truncated => {
                self.last_body_seed = n;
                fill(&mut self.body, self.bytes, n);
            }
            Kind::Repeat => fill(&mut self.body, self.bytes, self.last_body_seed),
            Kind::Dark => {
                self.body.clear();
                self.body.resize(self.bytes / 20, 0x10);
            }
        }
        jpeg::synthetic(self.width, self.height, &self.body, &mut self.buf);
        if kind == Kind::Truncated {
            let half = self.buf.len() / 2;
            self.buf.truncate(half);
        }
        let name = Self::name(n);
        let tmp = self.dir.join(format!("{name}.tmp"));
        std::fs::write(&tmp, &self.buf)?;
        std::fs::rename(&tmp, self.dir.join(&name))?;
        Ok((name, &self.buf))
    }

    /// The next frame will be number `n` (a gap, or a restart at 1).
    pub fn jump_to(&mut self, n: u64) {
        self.next = n;
    }
}

/// Pseudo-random bytes from `seed`: different frames differ everywhere.
fn fill(body: &mut Vec<u8>, len: usize, seed: u64) {
    body.clear();
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while body.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        body.extend_from_slice(&x.to_le_bytes());
    }
    body.truncate(len);
}
