//! Which trainable tensors a data-parallel step sums over the ranks together, and when: the
//! layer-wise backward finishes the decoder layers from the last to the first, and a layer's
//! LoRA gradients are final once its backward ran (on the step's last micro-batch), so the
//! layers are grouped, from the last down, into buckets of about `--ddp-bucket-cap-mb` (torch
//! DDP's buckets, 25 MB by default there) and each bucket is summed as soon as its lowest layer
//! is done, while the backward goes on below it. What no layer holds (the projector) is summed at
//! the end of the step.

use anyhow::{bail, Result};

/// The buckets of one run: the same on every rank (they decide the order of the collectives).
#[derive(Debug, Clone, PartialEq)]
pub struct Buckets {
    /// (lowest layer, tensor indices), in the order they complete: the last layers first.
    buckets: Vec<(usize, Vec<usize>)>,
}

/// The decoder layer of a trainable tensor's name (`...layers.{i}....`), None for the rest.
pub fn layer_of(name: &str) -> Option<usize> {
    let rest = &name[name.find(".layers.")? + ".layers.".len()..];
    rest[..rest.find('.')?].parse().ok()
}

impl Buckets {
    /// Buckets of at least `cap_bytes` (the last one of the first layers may be smaller) over
    /// tensors of `bytes` each in decoder layer `layers[i]`. The tensors of a bucket must be
    /// consecutive in the run's order (so that they are one stretch of a flat buffer).
    pub fn new(layers: &[Option<usize>], bytes: &[usize], cap_bytes: usize) -> Result<Self> {
        let top = layers.iter().flatten().copied().max();
        let mut buckets = vec![];
        let (mut open, mut size) = (vec![], 0usize);
        for layer in (0..=top.unwrap_or(0)).rev().filter(|_| top.is_some()) {
            let of: Vec<usize> = (0..layers.len()).filter(|&i| layers[i] == Some(layer)).collect();
            size += of.iter().map(|&i| bytes[i]).sum::<usize>();
            open.extend(of);
            if !open.is_empty() && (size >= cap_bytes || layer == 0) {
                open.sort_unstable();
                if open.windows(2).any(|w| w[1] != w[0] + 1) {
                    bail!("the trainable tensors of layers {layer} and up are not consecutive");
                }
                buckets.push((layer, std::mem::take(&mut open)));
                size = 0;
            }
        }
        Ok(Self { buckets })
    }

    /// The tensors whose sums can start once decoder layer `layer`'s backward is done.
    pub fn after_layer(&self, layer: usize) -> Option<&[usize]> {
        self.buckets.iter().find(|(l, _)| *l == layer).map(|(_, t)| t.as_slice())
    }

    /// Every tensor some bucket holds.
    pub fn covered(&self) -> impl Iterator<Item = usize> + '_ {
        self.buckets.iter().flat_map(|(_, t)| t.iter().copied())
    }

    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

/// `sorted` split into runs of consecutive numbers.
pub fn runs(sorted: &[usize]) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = vec![];
    for &i in sorted {
        match out.last_mut() {
            Some(run) if run.last() == Some(&(i.wrapping_sub(1))) => run.push(i),
            _ => out.push(vec![i]),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{layer_of, runs, Buckets};

    #[test]
    fn runs_of_consecutive_indices() {
        assert_eq!(runs(&[0, 1, 2, 5, 6, 9]), vec![vec![0, 1, 2], vec![5, 6], vec![9]]);
        assert!(runs(&[]).is_empty());
    }

    #[test]
    fn layers_are_read_from_peft_names() {
        assert_eq!(layer_of("base_model.model.model.layers.12.self_attn.q_proj.lora_A.weight"), Some(12));
        assert_eq!(layer_of("base_model.model.model.language_model.layers.0.mlp.up_proj.lora_B.weight"), Some(0));
        assert_eq!(layer_of("projector.linear_1.weight"), None);
    }

    #[test]
    fn buckets_fill_from_the_last_layer_down_and_close_at_the_first() {
        // 4 layers of two tensors (10 and 30 bytes), then the projector
        let layers = [0, 0, 1, 1, 2, 2, 3, 3].map(Some).into_iter().chain([None, None]).collect::<Vec<_>>();
        let bytes = [10, 30, 10, 30, 10, 30, 10, 30, 5, 5];
        let b = Buckets::new(&layers, &bytes, 70).unwrap();
        assert_eq!(b.len(), 2);
        assert_eq!(b.after_layer(3), None);
        assert_eq!(b.after_layer(2), Some(&[4, 5, 6, 7][..]));
        assert_eq!(b.after_layer(1), None);
        assert_eq!(b.after_layer(0), Some(&[0, 1, 2, 3][..]));
        assert_eq!(b.covered().count(), 8);
        // a cap below one layer: one bucket per layer
        assert_eq!(Buckets::new(&layers, &bytes, 1).unwrap().len(), 4);
        // nothing in a layer (only the projector trains): no bucket
        assert!(Buckets::new(&[None, None], &[5, 5], 1).unwrap().is_empty());
        // a layer's tensors apart from each other cannot be one stretch
        let apart = [Some(0), Some(1), Some(0)];
        assert!(Buckets::new(&apart, &[1, 1, 1], 1).is_err());
    }
}
