//! Choosing the next token from a logits row: greedy, or temperature + top-p with a seed.
//!
//! NaN logits are never chosen, as by the GPU argmax (`gpu::kernels::sample`): greedy picks the
//! largest other value, sampling gives NaN no probability. A row with no value other than NaN has
//! no answer: [`argmax`] gives the kernel's `NO_INDEX` and [`Sampler::sample`] `None`, which the
//! decode loop reports as an error just as it does the GPU's `NO_INDEX`.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::gpu::kernels::sample::{argmax_reference, NO_INDEX};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Nucleus mass in (0, 1]; 1 disables it.
    pub top_p: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

/// Index of the largest value; ties go to the lower index, NaN is never chosen; `NO_INDEX` when
/// every value is NaN (or the row is empty). The GPU argmax kernel's contract, by its reference.
pub fn argmax(logits: &[f32]) -> u32 {
    argmax_reference(logits).map_or(NO_INDEX, |i| i as u32)
}

/// Natural log-softmax of the logits (in f64 for the normaliser).
pub fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&v| (v as f64 - max).exp()).sum();
    let log_z = max + sum.ln();
    logits.iter().map(|&v| v as f64 - log_z).collect()
}

/// The `n` most likely ids with their log-probabilities, most likely first.
pub fn top_logprobs(logits: &[f32], n: usize) -> Vec<(u32, f64)> {
    let lp = log_softmax(logits);
    let mut order: Vec<usize> = (0..lp.len()).collect();
    order.sort_by(|&a, &b| {
        lp[b]
            .partial_cmp(&lp[a])
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(&b))
    });
    order
        .into_iter()
        .take(n)
        .map(|i| (i as u32, lp[i]))
        .collect()
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        Self {
            params,
            rng: StdRng::seed_from_u64(params.seed),
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.params.temperature <= 0.0
    }

    /// The next token id; `None` when no logit is a number (all NaN, or an empty row). NaN
    /// logits get no probability. If the largest logit is infinite (+∞, or −∞ when every
    /// other value is −∞ or NaN), softmax is undefined and the argmax is returned, as greedy.
    pub fn sample(&mut self, logits: &[f32]) -> Option<u32> {
        let best = argmax_reference(logits)?;
        let max = logits[best] as f64;
        if self.is_greedy() || max.is_infinite() {
            return Some(best as u32);
        }
        let t = self.params.temperature as f64;
        let mut probs: Vec<(usize, f64)> = logits
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let p = if v.is_nan() {
                    0.0
                } else {
                    ((v as f64 - max) / t).exp()
                };
                (i, p)
            })
            .collect();
        let total: f64 = probs.iter().map(|p| p.1).sum();
        probs.iter_mut().for_each(|p| p.1 /= total);
        probs.sort_by(|a, b| {
            b.1.partial_cmp(&a.1)
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(a.0.cmp(&b.0))
        });
        // Keep the smallest prefix whose mass reaches top_p (at least one token).
        let mut kept = 0;
        let mut mass = 0.0;
        for p in &probs {
            kept += 1;
            mass += p.1;
            if mass >= self.params.top_p as f64 {
                break;
            }
        }
        let r: f64 = self.rng.random::<f64>() * mass;
        let mut acc = 0.0;
        for p in &probs[..kept] {
            acc += p.1;
            if r < acc {
                return Some(p.0 as u32);
            }
        }
        Some(probs[kept - 1].0 as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_prefers_the_lower_index_on_ties_and_skips_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, f32::NAN]), 1);
        assert_eq!(argmax(&[f32::NAN, -1.0]), 1);
    }

    #[test]
    fn top_p_restricts_to_the_nucleus_and_the_seed_repeats() {
        let logits = [10.0, 9.0, 0.0, -5.0];
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            seed: 7,
        };
        let mut s = Sampler::new(params);
        assert!(
            (0..200).all(|_| s.sample(&logits) == Some(0)),
            "top-p 0.5 keeps only the first token"
        );
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            seed: 7,
        };
        let a: Vec<u32> = {
            let mut s = Sampler::new(params);
            (0..50).map(|_| s.sample(&logits).unwrap()).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(params);
            (0..50).map(|_| s.sample(&logits).unwrap()).collect()
        };
        assert_eq!(a, b);
        assert!(a.contains(&1), "the second token is drawn sometimes");
    }

    /// Hand-computed cases: NaN is skipped (also in front of −∞), all-NaN has no answer on the
    /// host just as on the GPU (`NO_INDEX`, then an error in the decode loop).
    #[test]
    fn nan_is_never_chosen_and_an_all_nan_row_has_no_token() {
        assert_eq!(argmax(&[f32::NAN, f32::NEG_INFINITY]), 1);
        assert_eq!(argmax(&[f32::NAN, f32::NAN]), NO_INDEX);
        assert_eq!(argmax(&[]), NO_INDEX);
        for temperature in [0.0, 0.7] {
            let params = SamplingParams {
                temperature,
                top_p: 1.0,
                seed: 3,
            };
            let mut s = Sampler::new(params);
            assert_eq!(s.sample(&[f32::NAN; 5]), None, "T = {temperature}");
            assert_eq!(s.sample(&[f32::NAN, 2.0, f32::INFINITY]), Some(2));
            let mixed = [f32::NAN, 1.0, f32::NAN, 1.5, f32::NAN];
            for _ in 0..200 {
                let id = s.sample(&mixed).unwrap();
                assert!(id == 1 || id == 3, "T = {temperature}: drew NaN logit {id}");
            }
        }
    }

    #[test]
    fn logprobs_are_normalised() {
        let lp = log_softmax(&[1.0, 2.0, 3.0]);
        let total: f64 = lp.iter().map(|v| v.exp()).sum();
        assert!((total - 1.0).abs() < 1e-12);
        assert_eq!(top_logprobs(&[1.0, 2.0, 3.0], 2)[0].0, 2);
    }
}
