//! Python's number semantics for the values JSON gives: 64-bit ints and finite floats.

use std::cmp::Ordering;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Num {
    Int(i64),
    Float(f64),
}

/// Exact comparison of an int with a float, as Python compares them (never by rounding the
/// int to a float). None when the float is NaN.
fn cmp_int_float(i: i64, f: f64) -> Option<Ordering> {
    if f.is_nan() {
        return None;
    }
    if f >= 9_223_372_036_854_775_808.0 {
        return Some(Ordering::Less);
    }
    if f < -9_223_372_036_854_775_808.0 {
        return Some(Ordering::Greater);
    }
    let t = f.trunc();
    let ti = t as i64; // exact: |t| < 2**63 and t is integral
    match i.cmp(&ti) {
        Ordering::Equal => {
            // i == trunc(f): the fraction decides
            if f > t {
                Some(Ordering::Less)
            } else if f < t {
                Some(Ordering::Greater)
            } else {
                Some(Ordering::Equal)
            }
        }
        other => Some(other),
    }
}

pub fn cmp(a: Num, b: Num) -> Option<Ordering> {
    match (a, b) {
        (Num::Int(x), Num::Int(y)) => Some(x.cmp(&y)),
        (Num::Float(x), Num::Float(y)) => x.partial_cmp(&y),
        (Num::Int(x), Num::Float(y)) => cmp_int_float(x, y),
        (Num::Float(x), Num::Int(y)) => cmp_int_float(y, x).map(Ordering::reverse),
    }
}

/// `a + b` as Python computes it, or None where weir's aggregates refuse the result
/// (an int beyond signed 64 bits, a float that is not finite).
pub fn add(a: Num, b: Num) -> Option<Num> {
    let r = match (a, b) {
        (Num::Int(x), Num::Int(y)) => return x.checked_add(y).map(Num::Int),
        (Num::Float(x), Num::Float(y)) => x + y,
        // Python converts the int to the nearest float (ties to even), as `as f64` does.
        (Num::Int(x), Num::Float(y)) => x as f64 + y,
        (Num::Float(x), Num::Int(y)) => x + y as f64,
    };
    if r.is_finite() {
        Some(Num::Float(r))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_int_float_comparison() {
        let big = 9_007_199_254_740_993i64; // 2**53 + 1, not a float
        assert_eq!(cmp(Num::Int(big), Num::Float(9_007_199_254_740_992.0)), Some(Ordering::Greater));
        assert_eq!(cmp(Num::Int(1), Num::Float(1.0)), Some(Ordering::Equal));
        assert_eq!(cmp(Num::Int(-1), Num::Float(-1.5)), Some(Ordering::Greater));
        assert_eq!(cmp(Num::Int(-2), Num::Float(-1.5)), Some(Ordering::Less));
        assert_eq!(cmp(Num::Int(i64::MAX), Num::Float(9.3e18)), Some(Ordering::Less));
        assert_eq!(cmp(Num::Float(0.5), Num::Int(0)), Some(Ordering::Greater));
    }

    #[test]
    fn sums_refuse_what_python_would_overflow() {
        assert_eq!(add(Num::Int(i64::MAX), Num::Int(1)), None);
        assert_eq!(add(Num::Float(1e308), Num::Float(1e308)), None);
        assert_eq!(add(Num::Int(1), Num::Float(0.5)), Some(Num::Float(1.5)));
    }
}
