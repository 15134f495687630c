//! Temperature / top-k / top-p sampling of one next token from a row of logits, on the host.
//!
//! The choice is the one a full descending sort of the vocabulary gives (ties: the lower id
//! first): the kept tokens are the `top_k` largest, then the shortest prefix of those whose
//! probabilities reach `top_p`, and `u` picks by their cumulative probabilities in that order. A
//! full sort of Gemma's 262k logits takes milliseconds per row and step, so only what the choice
//! can reach is sorted: the `top_k` selected in linear time, then the tokens above a probability
//! threshold whose mass already passes `top_p` (or, without top-p, the draw).

use std::cmp::Ordering;

/// What shapes the distribution (see `GenerateOptions`).
#[derive(Debug, Clone, Copy)]
pub struct Sampling {
    /// > 0.
    pub temperature: f64,
    /// 0 = no limit.
    pub top_k: usize,
    /// In (0, 1]; 1 = no limit.
    pub top_p: f64,
}

/// The descending order of the logits, the lower id first among equals.
fn descending(logits: &[f32]) -> impl Fn(&usize, &usize) -> Ordering + '_ {
    |&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b))
}

/// The token `u` (uniform in [0, 1)) picks from `logits` under `s`.
pub fn sample(logits: &[f32], s: Sampling, u: f64) -> u32 {
    let order = descending(logits);
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    if s.top_k > 0 && s.top_k < idx.len() {
        idx.select_nth_unstable_by(s.top_k - 1, &order);
        idx.truncate(s.top_k);
    }
    let max = idx.iter().map(|&i| logits[i]).fold(f32::NEG_INFINITY, f32::max) as f64;
    let weights: Vec<f64> = idx.iter().map(|&i| ((logits[i] as f64 - max) / s.temperature).exp()).collect();
    let total: f64 = weights.iter().sum();
    // the sorted prefix the choice can reach: the one whose mass reaches top_p (the draw then
    // falls inside it), or without top-p the one whose mass reaches the draw itself
    let reach = if s.top_p < 1.0 { s.top_p } else { u };
    let mut kept = reaching(&idx, &weights, reach * total);
    kept.sort_unstable_by(|a, b| order(&a.0, &b.0));
    let mut probs: Vec<f64> = kept.iter().map(|&(_, w)| w / total).collect();
    if s.top_p < 1.0 {
        let mut acc = 0.0;
        let keep = probs.iter().position(|&p| {
            acc += p;
            acc >= s.top_p
        });
        let keep = keep.map_or(probs.len(), |k| k + 1);
        probs.truncate(keep);
        kept.truncate(keep);
        let t: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= t);
    }
    let mut acc = 0.0;
    for (p, &(i, _)) in probs.iter().zip(&kept) {
        acc += p;
        if u < acc {
            return i as u32;
        }
    }
    kept.last().expect("at least one token").0 as u32
}

/// The tokens of `idx` (with their `weights`) above a weight threshold whose weights sum past
/// `mass` with room to spare, so that the sorted prefix reaching `mass` lies inside them,
/// lowering the threshold until they do; all of `idx` at the end.
fn reaching(idx: &[usize], weights: &[f64], mass: f64) -> Vec<(usize, f64)> {
    let top = weights.iter().copied().fold(0.0, f64::max);
    // the margin is far above the rounding of a sum of 262k terms and far below any probability
    // that decides which token is kept
    let needed = mass * (1.0 + 1e-9);
    for scale in [1e-2, 1e-4, 1e-6, 1e-9] {
        let above: Vec<(usize, f64)> =
            idx.iter().zip(weights).filter(|(_, &w)| w >= top * scale).map(|(&i, &w)| (i, w)).collect();
        if above.len() == idx.len() || above.iter().map(|(_, w)| w).sum::<f64>() >= needed {
            return above;
        }
    }
    idx.iter().copied().zip(weights.iter().copied()).collect()
}

#[cfg(test)]
mod tests {
    use super::{sample, Sampling};
    use crate::rng::SplitMix64;

    /// The specification: every logit sorted (descending, lower id first), top-k, softmax,
    /// top-p, then `u` over the cumulative probabilities.
    fn by_full_sort(logits: &[f32], s: Sampling, u: f64) -> u32 {
        let mut idx: Vec<usize> = (0..logits.len()).collect();
        idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        if s.top_k > 0 {
            idx.truncate(s.top_k);
        }
        let max = logits[idx[0]] as f64;
        let w: Vec<f64> = idx.iter().map(|&i| ((logits[i] as f64 - max) / s.temperature).exp()).collect();
        let total: f64 = w.iter().sum();
        let mut p: Vec<f64> = w.iter().map(|x| x / total).collect();
        if s.top_p < 1.0 {
            let mut acc = 0.0;
            let keep = p.iter().position(|&x| {
                acc += x;
                acc >= s.top_p
            });
            let keep = keep.map_or(p.len(), |k| k + 1);
            p.truncate(keep);
            let t: f64 = p.iter().sum();
            p.iter_mut().for_each(|x| *x /= t);
        }
        let mut acc = 0.0;
        for (x, &i) in p.iter().zip(&idx) {
            acc += x;
            if u < acc {
                return i as u32;
            }
        }
        idx[p.len() - 1] as u32
    }

    #[test]
    fn the_choice_equals_a_full_sort_of_the_vocabulary_ties_included() {
        let mut rng = SplitMix64::new(7);
        let settings = [(1.0, 0, 1.0), (0.7, 0, 0.9), (1.3, 50, 1.0), (0.6, 40, 0.95), (1.0, 0, 0.5), (2.0, 3, 0.1)];
        for trial in 0..400 {
            let v = [50, 3000, 20_000][trial % 3];
            // logits on a coarse grid (bf16 logits tie often), some rows peaked, some flat
            let spread = [0.5, 4.0, 30.0][trial % 3];
            let logits: Vec<f32> =
                (0..v).map(|_| ((rng.next_f64() * spread * 16.0).round() / 16.0) as f32 - 10.0).collect();
            for &(temperature, top_k, top_p) in &settings {
                let s = Sampling { temperature, top_k, top_p };
                let u = rng.next_f64();
                assert_eq!(sample(&logits, s, u), by_full_sort(&logits, s, u), "trial {trial}, {s:?}, u {u}");
            }
        }
    }

    #[test]
    fn a_draw_near_one_takes_the_last_kept_token() {
        let logits = [0.0f32, 2.0, 1.0, 2.0];
        let s = Sampling { temperature: 1.0, top_k: 2, top_p: 1.0 };
        // the two 2.0s are kept, id 1 before id 3
        assert_eq!(sample(&logits, s, 0.0), 1);
        assert_eq!(sample(&logits, s, 0.999_999), 3);
    }
}
