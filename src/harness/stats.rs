//! The statistics `eval` reports with each accuracy: a Wilson score interval for a proportion
//! and the exact McNemar test for two methods answering the same questions.

use serde::{Deserialize, Serialize};

/// The standard normal quantile for a two-sided 95% interval, Φ⁻¹(0.975).
pub const Z95: f64 = 1.959_963_984_540_054;

/// A confidence interval for a proportion, as fractions in [0, 1].
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    pub low: f64,
    pub high: f64,
}

/// The Wilson score interval (without continuity correction) for `successes` of `trials` at
/// normal quantile `z`: the proportions p whose score test, |p̂ − p| ≤ z·√(p(1 − p)/n), does not
/// reject. Unlike p̂ ± z·√(p̂(1 − p̂)/n) it stays inside [0, 1] and is not empty at 0 or n
/// successes. No trials: the whole of [0, 1].
pub fn wilson(successes: usize, trials: usize, z: f64) -> Interval {
    if trials == 0 {
        return Interval {
            low: 0.0,
            high: 1.0,
        };
    }
    let n = trials as f64;
    let p = successes as f64 / n;
    let z2 = z * z;
    let denominator = 1.0 + z2 / n;
    let centre = (p + z2 / (2.0 * n)) / denominator;
    let half = z / denominator * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    Interval {
        low: (centre - half).max(0.0),
        high: (centre + half).min(1.0),
    }
}

/// The paired comparison of a method with a reference on the same questions.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct McNemar {
    /// Questions this method answers correctly and the reference does not.
    pub only_this_correct: usize,
    /// Questions the reference answers correctly and this method does not.
    pub only_reference_correct: usize,
    /// Exact two-sided p-value of the hypothesis that both are equally accurate.
    pub p_value: f64,
}

impl McNemar {
    /// Compare per-question outcomes (`true` = correct) of a method and the reference.
    pub fn of(this: &[bool], reference: &[bool]) -> Self {
        assert_eq!(this.len(), reference.len(), "paired outcomes");
        let pairs = this.iter().zip(reference);
        let only_this = pairs.clone().filter(|(&a, &b)| a && !b).count();
        let only_reference = pairs.filter(|(&a, &b)| !a && b).count();
        Self {
            only_this_correct: only_this,
            only_reference_correct: only_reference,
            p_value: mcnemar_exact(only_this, only_reference),
        }
    }
}

/// The exact McNemar test: under the null hypothesis each of the `b + c` discordant pairs goes
/// either way with probability ½, so the p-value is the two-sided binomial tail
/// `min(1, 2 · P(X ≤ min(b, c)))` with X ~ Binomial(b + c, ½). No discordant pairs: 1.
pub fn mcnemar_exact(b: usize, c: usize) -> f64 {
    let n = b + c;
    let k = b.min(c);
    // ln P(X = i), stepped from ln P(X = 0) = −n·ln 2 by the ratio (n − i)/(i + 1), so large n
    // neither overflows a binomial coefficient nor underflows an intermediate 2^−n.
    let mut log_pmf = -(n as f64) * std::f64::consts::LN_2;
    let mut tail = 0.0;
    for i in 0..=k {
        tail += log_pmf.exp();
        log_pmf += ((n - i) as f64 / (i + 1) as f64).ln();
    }
    (2.0 * tail).min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Newcombe (1998), "Two-sided confidence intervals for the single proportion", Statistics
    /// in Medicine 17:857–872, Table II, method 3 (score interval without continuity
    /// correction), to the four decimals printed there.
    #[test]
    fn wilson_matches_newcombes_table() {
        for (x, n, low, high) in [
            (81, 263, 0.2553, 0.3662),
            (15, 148, 0.0624, 0.1605),
            (0, 20, 0.0000, 0.1611),
            (1, 29, 0.0061, 0.1718),
        ] {
            let ci = wilson(x, n, Z95);
            assert!((ci.low - low).abs() < 5e-5, "{x}/{n}: {ci:?}");
            assert!((ci.high - high).abs() < 5e-5, "{x}/{n}: {ci:?}");
        }
    }

    /// Values from `python3 -c` with the closed form and `math.sqrt` (run once):
    /// 90/100 → (0.8256343384950865, 0.9447708629393249); 29/29 → (0.8830302015002593, 1.0).
    #[test]
    fn wilson_at_high_accuracy_and_at_the_edge() {
        let ci = wilson(90, 100, Z95);
        assert!((ci.low - 0.825_634_338_495_086_5).abs() < 1e-12, "{ci:?}");
        assert!((ci.high - 0.944_770_862_939_324_9).abs() < 1e-12, "{ci:?}");
        let ci = wilson(29, 29, Z95);
        assert!((ci.low - 0.883_030_201_500_259_3).abs() < 1e-12, "{ci:?}");
        assert_eq!(ci.high, 1.0);
        assert_eq!(
            wilson(0, 0, Z95),
            Interval {
                low: 0.0,
                high: 1.0
            }
        );
    }

    /// By hand: b = 3, c = 10 gives 2·(C(13,0) + C(13,1) + C(13,2) + C(13,3)) / 2¹³
    /// = 2·(1 + 13 + 78 + 286) / 8192 = 0.09228515625; b = 0, c = 6 gives 2/2⁶ = 0.03125;
    /// b = 1, c = 12 gives 2·14/2¹³ = 0.00341796875. Larger counts from Python's exact
    /// `math.comb` sum (run once): (40, 70) → 0.005447429511444482,
    /// (200, 260) → 0.005883922473103979.
    #[test]
    fn mcnemar_matches_exact_binomial_tails() {
        for (b, c, p) in [
            (3, 10, 0.092_285_156_25),
            (10, 3, 0.092_285_156_25),
            (0, 6, 0.031_25),
            (1, 12, 0.003_417_968_75),
            (40, 70, 0.005_447_429_511_444_482),
            (200, 260, 0.005_883_922_473_103_979),
        ] {
            let got = mcnemar_exact(b, c);
            assert!((got - p).abs() < 1e-12 * p.max(1e-3), "({b}, {c}): {got}");
        }
        assert_eq!(mcnemar_exact(5, 5), 1.0);
        assert_eq!(mcnemar_exact(0, 0), 1.0);
    }

    #[test]
    fn mcnemar_counts_only_discordant_pairs() {
        let this = [true, true, false, false, true, false];
        let star = [true, false, true, true, false, false];
        let m = McNemar::of(&this, &star);
        assert_eq!((m.only_this_correct, m.only_reference_correct), (2, 2));
        assert_eq!(m.p_value, 1.0);
    }
}
