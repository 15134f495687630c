//! Collectives between CPU processes over the rendezvous' data links, through rank 0: every rank
//! sends its values, rank 0 combines them in rank order and sends the result back (torch's gloo
//! plays this part there). GPUs use NCCL (`nccl.rs`); this is for CPU runs and CPU tests of the
//! launcher, where the tensors are small.

use crate::dist::comm::Communicator;
use crate::dist::control::Control;
use crate::dist::wire::{bytes_to_f32s, f32s_to_bytes, read_frame, write_frame, DATA};
use anyhow::{bail, Context, Result};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};

pub struct TcpComm {
    rank: usize,
    world: usize,
    /// Rank 0: the link to rank r at r - 1; others: the link to rank 0.
    data: Mutex<Vec<TcpStream>>,
    control: Arc<Control>,
}

impl TcpComm {
    pub fn new(rank: usize, world: usize, data: Vec<TcpStream>, control: Arc<Control>) -> Self {
        Self { rank, world, data: Mutex::new(data), control }
    }

    /// The same words as the control link's watcher: whichever of the two sees the closed link
    /// first, the message names the rank the same way.
    fn gone(rank: usize) -> String {
        format!("rank {rank} stopped without finishing (its link closed during a collective)")
    }

    fn receive(s: &TcpStream, from: usize, len: usize) -> Result<Vec<f32>> {
        let gone = || Self::gone(from);
        match read_frame(s).with_context(gone)? {
            Some((DATA, b)) if b.len() == 4 * len => Ok(bytes_to_f32s(&b)),
            Some((DATA, b)) => bail!("rank {from} handed in {} values where this rank has {len}", b.len() / 4),
            _ => bail!(gone()),
        }
    }

    fn collective(&self, values: &mut [f32], combine: impl Fn(Vec<Vec<f32>>) -> Vec<f32>) -> Result<()> {
        let links = self.data.lock().unwrap_or_else(|p| p.into_inner());
        if self.rank == 0 {
            let mut parts = vec![values.to_vec()];
            for (i, s) in links.iter().enumerate() {
                parts.push(Self::receive(s, i + 1, values.len())?);
            }
            let result = combine(parts);
            let bytes = f32s_to_bytes(&result);
            for (i, s) in links.iter().enumerate() {
                // a rank killed while it waits for the result breaks the link here
                write_frame(s, DATA, &bytes).with_context(|| Self::gone(i + 1))?;
            }
            values.copy_from_slice(&result);
        } else {
            write_frame(&links[0], DATA, &f32s_to_bytes(values)).with_context(|| Self::gone(0))?;
            values.copy_from_slice(&Self::receive(&links[0], 0, values.len())?);
        }
        Ok(())
    }
}

impl Communicator for TcpComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, values: &mut [f32]) -> Result<()> {
        self.collective(values, |parts| {
            let mut it = parts.into_iter();
            let mut sum = it.next().expect("rank 0's part");
            for p in it {
                sum.iter_mut().zip(&p).for_each(|(a, b)| *a += b);
            }
            sum
        })
    }

    fn broadcast(&self, values: &mut [f32], root: usize) -> Result<()> {
        if root >= self.world {
            bail!("broadcast from rank {root} in a world of {}", self.world);
        }
        self.collective(values, |mut parts| parts.swap_remove(root))
    }

    fn abort(&self, why: &str) {
        self.control.abort(why)
    }
}
