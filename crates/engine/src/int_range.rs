//! Decimal integers in a range as digit patterns, for JSON Schema's `minimum` / `maximum` on
//! integers. A range becomes a few alternatives, each an optional minus sign and a run of digit
//! classes (`1 [2-9] [0-9]{3}`); together they match exactly the range's integers, written as
//! JSON writes them (no leading zeros, no `-0`). The split is the classic one for numeric ranges
//! in regular expressions: cut at the numbers ending in 9s above the minimum and at those ending
//! in 0s (minus one) below the maximum, so that every piece is a common prefix, one digit class
//! and a tail of any digits. Pure; [`crate::json_schema`] renders the patterns as GBNF.

/// Largest magnitude written: 16 digits, as the plain `integer` grammar rule allows.
pub(crate) const LIMIT: i64 = 9_999_999_999_999_999;

/// One digit class, repeated: `[lo-hi]{count}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Digits {
    pub(crate) lo: u8,
    pub(crate) hi: u8,
    pub(crate) count: u32,
}

/// One alternative: an optional minus sign, then digit classes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pattern {
    pub(crate) negative: bool,
    pub(crate) digits: Vec<Digits>,
}

/// The patterns of the integers in `lo..=hi`; both must lie within ±[`LIMIT`] and `lo ≤ hi`.
pub(crate) fn patterns(lo: i64, hi: i64) -> Vec<Pattern> {
    let mut out = Vec::new();
    if lo < 0 {
        // The negatives' magnitudes: from the one closest to zero to |lo|.
        let nearest = hi.min(-1).unsigned_abs();
        for (a, b) in split(nearest, lo.unsigned_abs()) {
            out.push(Pattern {
                negative: true,
                digits: digits(a, b),
            });
        }
    }
    if hi >= 0 {
        for (a, b) in split(lo.max(0).unsigned_abs(), hi.unsigned_abs()) {
            out.push(Pattern {
                negative: false,
                digits: digits(a, b),
            });
        }
    }
    out
}

/// `min..=max` cut into pieces whose two ends have the same number of digits and differ in one
/// place followed only by 0s (start) and 9s (end).
fn split(min: u64, max: u64) -> Vec<(u64, u64)> {
    let mut stops = vec![max];
    // Above min: min with its last k digits turned to 9s.
    for k in 1..=17 {
        let p = 10u64.pow(k);
        let stop = min - min % p + (p - 1);
        if stop >= max {
            break;
        }
        stops.push(stop);
    }
    // Below max: max + 1 with its last k digits turned to 0s, minus one.
    for k in 1..=17 {
        let next = max + 1;
        let Some(stop) = (next - next % 10u64.pow(k)).checked_sub(1) else {
            break;
        };
        if stop <= min {
            break;
        }
        stops.push(stop);
    }
    stops.sort_unstable();
    stops.dedup();
    let mut start = min;
    stops
        .into_iter()
        .map(|stop| {
            let piece = (start, stop);
            start = stop + 1;
            piece
        })
        .collect()
}

/// The digit classes of `start..=stop`, place by place (equal classes in a row merged).
fn digits(start: u64, stop: u64) -> Vec<Digits> {
    let (a, b) = (start.to_string(), stop.to_string());
    let mut out: Vec<Digits> = Vec::new();
    for (x, y) in a.bytes().zip(b.bytes()) {
        match out.last_mut() {
            Some(d) if d.lo == x && d.hi == y => d.count += 1,
            _ => out.push(Digits {
                lo: x,
                hi: y,
                count: 1,
            }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(patterns: &[Pattern], text: &str) -> bool {
        patterns.iter().any(|p| {
            let Some(mut rest) = (if p.negative {
                text.strip_prefix('-')
            } else {
                Some(text)
            }) else {
                return false;
            };
            for d in &p.digits {
                for _ in 0..d.count {
                    match rest.as_bytes().first() {
                        Some(c) if (d.lo..=d.hi).contains(c) => rest = &rest[1..],
                        _ => return false,
                    }
                }
            }
            rest.is_empty()
        })
    }

    #[test]
    fn every_integer_in_the_range_and_no_other() {
        let edges = [
            -1001, -1000, -999, -250, -101, -100, -99, -57, -10, -9, -1, 0, 1, 5, 9, 10, 11, 19,
            20, 99, 100, 101, 150, 199, 200, 257, 999, 1000, 1001,
        ];
        for &lo in &edges {
            for &hi in edges.iter().filter(|&&h| h >= lo) {
                let p = patterns(lo, hi);
                for n in -1100i64..=1100 {
                    assert_eq!(
                        matches(&p, &n.to_string()),
                        (lo..=hi).contains(&n),
                        "{n} in {lo}..={hi}: {p:?}"
                    );
                }
                for not_json in ["-0", "00", "01", "-01", "007", ""] {
                    assert!(!matches(&p, not_json), "{not_json} in {lo}..={hi}");
                }
            }
        }
    }

    #[test]
    fn the_ends_of_the_writable_range() {
        let all = patterns(-LIMIT, LIMIT);
        for text in [
            "0",
            "-1",
            "9999999999999999",
            "-9999999999999999",
            "1234567890123456",
        ] {
            assert!(matches(&all, text), "{text}");
        }
        assert!(!matches(&all, "10000000000000000"));
        let top = patterns(LIMIT - 5, LIMIT);
        assert!(matches(&top, "9999999999999994") && matches(&top, "9999999999999999"));
        assert!(!matches(&top, "9999999999999993"));
        let above = patterns(1_000_000, LIMIT);
        assert!(matches(&above, "1000000") && matches(&above, "123456789012"));
        assert!(!matches(&above, "999999"));
        // A handful of alternatives, not one per number.
        assert!(all.len() <= 40, "{}", all.len());
        assert!(patterns(13, 5_432_109).len() <= 16);
    }
}
