//! The order training reads rows in: a seeded shuffle per epoch and micro-batches cut from it, the
//! same for a given seed on any machine. With several data-parallel workers the single-GPU order is
//! split across ranks: micro-batch k of a run with `world` workers of `batch` rows each holds the
//! rows of micro-batch k of a one-worker run with `world * batch` rows, rank r taking the r-th
//! `batch` of them, so every row is read once per epoch and the global batches do not depend on
//! how many workers share them.

/// The order of the rows in `epoch`: a seeded shuffle, the same for a given seed on any machine.
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = crate::rng::SplitMix64::new(seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    for i in (1..n).rev() {
        order.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    order
}

/// Micro-batch `k` of the endless stream of epochs: the rows it holds.
pub fn micro_batch_rows(k: usize, n_rows: usize, batch: usize, seed: u64) -> Vec<usize> {
    let per_epoch = n_rows.div_ceil(batch);
    let (epoch, pos) = (k / per_epoch, k % per_epoch);
    let order = epoch_order(n_rows, seed, epoch);
    order[pos * batch..((pos + 1) * batch).min(n_rows)].to_vec()
}

/// The rows of micro-batch `k` that rank `rank` of `world` reads, `batch` rows per rank (fewer or
/// none in an epoch's last, short micro-batch).
pub fn rank_rows(k: usize, n_rows: usize, batch: usize, seed: u64, world: usize, rank: usize) -> Vec<usize> {
    let global = micro_batch_rows(k, n_rows, batch * world, seed);
    let start = (rank * batch).min(global.len());
    global[start..(start + batch).min(global.len())].to_vec()
}

#[cfg(test)]
mod tests {
    use super::{micro_batch_rows, rank_rows};

    #[test]
    fn ranks_split_the_single_worker_order_and_read_every_row_once_per_epoch() {
        let (n, seed) = (23usize, 7);
        for (world, batch) in [(1, 2), (2, 1), (2, 3), (4, 2), (3, 5)] {
            let per_epoch = n.div_ceil(world * batch);
            let mut seen = vec![0; n];
            for k in 0..per_epoch {
                let mut union = vec![];
                for r in 0..world {
                    union.extend(rank_rows(k, n, batch, seed, world, r));
                }
                assert_eq!(union, micro_batch_rows(k, n, world * batch, seed), "world {world} batch {batch} k {k}");
                union.iter().for_each(|&i| seen[i] += 1);
            }
            assert!(seen.iter().all(|&c| c == 1), "world {world} batch {batch}: {seen:?}");
        }
        // the same seed gives the same global order whatever the world size
        let two: Vec<usize> = (0..2).flat_map(|r| rank_rows(3, n, 2, seed, 2, r)).collect();
        assert_eq!(two, micro_batch_rows(3, n, 4, seed));
    }
}
