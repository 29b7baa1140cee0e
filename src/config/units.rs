//! Durations and sizes as users write them in the config: `"500ms"`, `"10s"`,
//! `"5m"`, `"24h"`, `"7d"`; `"512KB"`, `"100MB"`, `"4GiB"`.
//!
//! What it is: two small value types that parse from and print back to those
//! strings, so `edgekeeper check` shows the same notation users wrote.
//! What it is not: a general unit library. Integers only: `"1.5s"` is written
//! `"1500ms"`, which keeps parsing exact and printing canonical.

use core::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// A span of time, held in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Duration(u64);

const DURATION_UNITS: [(&str, u64); 5] = [
    ("d", 86_400_000),
    ("h", 3_600_000),
    ("m", 60_000),
    ("s", 1_000),
    ("ms", 1),
];

impl Duration {
    pub const fn from_millis(ms: u64) -> Self {
        Duration(ms)
    }
    pub const fn from_secs(s: u64) -> Self {
        Duration(s * 1000)
    }
    pub const fn as_millis(self) -> u64 {
        self.0
    }
    pub fn as_std(self) -> std::time::Duration {
        std::time::Duration::from_millis(self.0)
    }

    /// Parses `"<integer><unit>"` with unit one of ms, s, m, h, d.
    pub fn parse(text: &str) -> Result<Self, String> {
        parse_with(
            text,
            &DURATION_UNITS,
            "duration",
            "\"500ms\", \"10s\", \"7d\"",
        )
        .map(Duration)
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_with(f, self.0, &DURATION_UNITS, "0s")
    }
}

/// An amount of bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Size(u64);

const SIZE_UNITS: [(&str, u64); 10] = [
    ("TiB", 1 << 40),
    ("GiB", 1 << 30),
    ("MiB", 1 << 20),
    ("KiB", 1 << 10),
    ("TB", 1_000_000_000_000),
    ("GB", 1_000_000_000),
    ("MB", 1_000_000),
    ("KB", 1_000),
    ("kB", 1_000),
    ("B", 1),
];

impl Size {
    pub const fn from_bytes(b: u64) -> Self {
        Size(b)
    }
    pub const fn bytes(self) -> u64 {
        self.0
    }

    /// Parses `"<integer><unit>"`: B, KB/MB/GB/TB (powers of 1000),
    /// KiB/MiB/GiB/TiB (powers of 1024).
    pub fn parse(text: &str) -> Result<Self, String> {
        parse_with(text, &SIZE_UNITS, "size", "\"512KB\", \"4GiB\"").map(Size)
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_with(f, self.0, &SIZE_UNITS, "0B")
    }
}

/// `"<integer><unit>"` → integer × the unit's factor.
fn parse_with(
    text: &str,
    units: &[(&str, u64)],
    what: &str,
    examples: &str,
) -> Result<u64, String> {
    let (number, unit) = split_number(text);
    let number = parse_integer(number, text, what, examples)?;
    let factor = units
        .iter()
        .find(|(name, _)| *name == unit)
        .map(|(_, f)| *f)
        .ok_or_else(|| {
            let names: Vec<&str> = units.iter().map(|(n, _)| *n).collect();
            format!(
                "invalid {what} \"{text}\": unit must be one of {} (for example {examples})",
                names.join(", ")
            )
        })?;
    number
        .checked_mul(factor)
        .ok_or_else(|| format!("invalid {what} \"{text}\": too large"))
}

/// Writes `value` in the first (largest) unit that divides it exactly.
/// Units listed with a factor that another unit already has print under the
/// first name only.
fn write_with(
    f: &mut fmt::Formatter<'_>,
    value: u64,
    units: &[(&str, u64)],
    zero: &str,
) -> fmt::Result {
    if value == 0 {
        return f.write_str(zero);
    }
    let (unit, factor) = units
        .iter()
        .find(|(_, factor)| value % factor == 0)
        .copied()
        .unwrap_or(("", 1));
    write!(f, "{}{unit}", value / factor)
}

fn split_number(text: &str) -> (&str, &str) {
    let text = text.trim();
    let end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    (&text[..end], text[end..].trim_start())
}

fn parse_integer(number: &str, text: &str, what: &str, examples: &str) -> Result<u64, String> {
    if number.is_empty() {
        return Err(format!(
            "invalid {what} \"{text}\": expected a whole number and a unit, like {examples}"
        ));
    }
    number
        .parse::<u64>()
        .map_err(|_| format!("invalid {what} \"{text}\": number too large"))
}

macro_rules! string_unit_serde {
    ($ty:ident, $expecting:expr) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> Visitor<'de> for V {
                    type Value = $ty;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($expecting)
                    }
                    fn visit_str<E: de::Error>(self, v: &str) -> Result<$ty, E> {
                        $ty::parse(v).map_err(E::custom)
                    }
                }
                d.deserialize_str(V)
            }
        }
    };
}

string_unit_serde!(
    Duration,
    "a duration string such as \"500ms\", \"10s\", \"5m\", \"24h\" or \"7d\""
);
string_unit_serde!(
    Size,
    "a size string such as \"512KB\", \"100MB\" or \"4GiB\""
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_every_unit() {
        assert_eq!(Duration::parse("500ms").unwrap().as_millis(), 500);
        assert_eq!(Duration::parse("10s").unwrap().as_millis(), 10_000);
        assert_eq!(Duration::parse("5m").unwrap().as_millis(), 300_000);
        assert_eq!(Duration::parse("24h").unwrap().as_millis(), 86_400_000);
        assert_eq!(Duration::parse("7d").unwrap().as_millis(), 604_800_000);
        assert_eq!(Duration::parse("0s").unwrap().as_millis(), 0);
    }

    #[test]
    fn durations_print_in_the_largest_exact_unit() {
        assert_eq!(Duration::parse("60s").unwrap().to_string(), "1m");
        assert_eq!(Duration::parse("1500ms").unwrap().to_string(), "1500ms");
        assert_eq!(Duration::parse("48h").unwrap().to_string(), "2d");
        assert_eq!(Duration::parse("0ms").unwrap().to_string(), "0s");
    }

    #[test]
    fn bad_durations_say_what_is_wrong() {
        assert!(Duration::parse("10").unwrap_err().contains("unit must be"));
        assert!(Duration::parse("s").unwrap_err().contains("whole number"));
        assert!(Duration::parse("-5s").unwrap_err().contains("whole number"));
        assert!(
            Duration::parse("1.5s")
                .unwrap_err()
                .contains("unit must be")
        );
        assert!(Duration::parse("10 parsecs").unwrap_err().contains("unit"));
        assert!(
            Duration::parse("99999999999999999999d")
                .unwrap_err()
                .contains("too large")
        );
    }

    #[test]
    fn sizes_use_decimal_and_binary_powers() {
        assert_eq!(Size::parse("512KB").unwrap().bytes(), 512_000);
        assert_eq!(Size::parse("100MB").unwrap().bytes(), 100_000_000);
        assert_eq!(Size::parse("4GiB").unwrap().bytes(), 4 << 30);
        assert_eq!(Size::parse("1KiB").unwrap().bytes(), 1024);
        assert_eq!(Size::parse("7B").unwrap().bytes(), 7);
        assert_eq!(Size::parse("4GiB").unwrap().to_string(), "4GiB");
        assert_eq!(Size::parse("1000KB").unwrap().to_string(), "1MB");
        assert_eq!(Size::parse("1023B").unwrap().to_string(), "1023B");
    }

    #[test]
    fn bad_sizes_say_what_is_wrong() {
        assert!(Size::parse("100").unwrap_err().contains("unit must be"));
        assert!(Size::parse("100mb").unwrap_err().contains("unit must be"));
        assert!(Size::parse("").unwrap_err().contains("whole number"));
        assert!(
            Size::parse("99999999999TiB")
                .unwrap_err()
                .contains("too large")
        );
    }
}
