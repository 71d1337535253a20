//! Money is an integer count of the smallest LAI unit (1 LAI = 10^18 units, like wei), with
//! checked arithmetic only. It travels as a decimal string: JSON numbers lose precision past 2^53.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Smallest units per LAI.
pub const UNITS_PER_LAI: u128 = 1_000_000_000_000_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Money(u128);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not an amount of LAI units: {0:?} (expected a non-negative integer string)")]
pub struct ParseMoneyError(String);

impl Money {
    pub const ZERO: Money = Money(0);

    pub const fn from_units(units: u128) -> Self {
        Self(units)
    }

    pub const fn units(self) -> u128 {
        self.0
    }

    /// Whole LAI; `None` on overflow.
    pub fn from_lai(lai: u64) -> Option<Self> {
        u128::from(lai).checked_mul(UNITS_PER_LAI).map(Self)
    }

    pub fn checked_add(self, rhs: Money) -> Option<Money> {
        self.0.checked_add(rhs.0).map(Money)
    }

    pub fn checked_sub(self, rhs: Money) -> Option<Money> {
        self.0.checked_sub(rhs.0).map(Money)
    }

    pub fn is_zero(self) -> bool {
        self.0 == 0
    }

    /// `self * num / den`, rounded down; `None` on overflow or a zero denominator.
    pub fn mul_div(self, num: u128, den: u128) -> Option<Money> {
        if den == 0 {
            return None;
        }
        // Split to avoid overflowing the intermediate product where possible.
        let q = self.0 / den;
        let r = self.0 % den;
        let whole = q.checked_mul(num)?;
        let part = r.checked_mul(num)? / den;
        whole.checked_add(part).map(Money)
    }

    /// Human form, e.g. `1.5 LAI`; exact (no float).
    pub fn to_lai_string(self) -> String {
        let whole = self.0 / UNITS_PER_LAI;
        let frac = self.0 % UNITS_PER_LAI;
        if frac == 0 {
            return format!("{whole} LAI");
        }
        let frac = format!("{frac:018}");
        format!("{whole}.{} LAI", frac.trim_end_matches('0'))
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for Money {
    type Err = ParseMoneyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() || s.len() > 39 || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ParseMoneyError(s.chars().take(64).collect()));
        }
        s.parse::<u128>()
            .map(Money)
            .map_err(|_| ParseMoneyError(s.to_owned()))
    }
}

impl Serialize for Money {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Money {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A node's price: units per one million input (prompt) and output (completion) tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Rate {
    pub input_per_mtok: Money,
    pub output_per_mtok: Money,
}

impl Rate {
    /// Cost of a request, rounded down to the unit; `None` on overflow.
    pub fn cost(&self, prompt_tokens: u64, completion_tokens: u64) -> Option<Money> {
        let a = self
            .input_per_mtok
            .units()
            .checked_mul(u128::from(prompt_tokens))?;
        let b = self
            .output_per_mtok
            .units()
            .checked_mul(u128::from(completion_tokens))?;
        Some(Money(a.checked_add(b)? / 1_000_000))
    }

    /// The higher of two rates, component-wise (an upper bound for holds).
    pub fn max(self, other: Rate) -> Rate {
        Rate {
            input_per_mtok: self.input_per_mtok.max(other.input_per_mtok),
            output_per_mtok: self.output_per_mtok.max(other.output_per_mtok),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_exactly() {
        let m: Money = "340282366920938463463374607431768211455".parse().unwrap();
        assert_eq!(m.units(), u128::MAX);
        assert_eq!(m.to_string(), "340282366920938463463374607431768211455");
        assert!("-1".parse::<Money>().is_err());
        assert!("1.5".parse::<Money>().is_err());
        assert!("".parse::<Money>().is_err());
        assert!(" 1".parse::<Money>().is_err());
        assert!(
            "340282366920938463463374607431768211456"
                .parse::<Money>()
                .is_err()
        );
        assert_eq!(
            Money::from_units(1_500_000_000_000_000_000).to_lai_string(),
            "1.5 LAI"
        );
        assert_eq!(Money::from_lai(3).unwrap().to_lai_string(), "3 LAI");
    }

    #[test]
    fn json_is_a_string() {
        let m = Money::from_units(12345678901234567890123);
        let j = serde_json::to_string(&m).unwrap();
        assert_eq!(j, "\"12345678901234567890123\"");
        assert_eq!(serde_json::from_str::<Money>(&j).unwrap(), m);
        assert!(serde_json::from_str::<Money>("123").is_err());
    }

    #[test]
    fn checked_arithmetic() {
        let max = Money::from_units(u128::MAX);
        assert_eq!(max.checked_add(Money::from_units(1)), None);
        assert_eq!(Money::ZERO.checked_sub(Money::from_units(1)), None);
        assert_eq!(
            Money::from_units(10).mul_div(3, 4),
            Some(Money::from_units(7))
        );
        assert_eq!(max.mul_div(1, 1), Some(max));
        assert_eq!(max.mul_div(2, 1), None);
        assert_eq!(max.mul_div(1, 0), None);
    }

    #[test]
    fn rate_cost_rounds_down() {
        let r = Rate {
            input_per_mtok: Money::from_units(1_000_000),
            output_per_mtok: Money::from_units(3_000_001),
        };
        assert_eq!(r.cost(10, 0), Some(Money::from_units(10)));
        // 3 * 3_000_001 / 1e6 = 9.000003 → 9
        assert_eq!(r.cost(0, 3), Some(Money::from_units(9)));
        assert_eq!(
            r.cost(u64::MAX, u64::MAX).map(|m| m.units() > 0),
            Some(true)
        );
    }
}
