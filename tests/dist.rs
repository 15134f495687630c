//! Data parallelism on the CPU with the in-process communicator: two workers with one row each,
//! their gradients and losses summed across ranks, against one worker with both rows as one batch
//! (the same global batch). The tiny model, f32, no dropout (dropout masks differ per rank by
//! design, as they would per sample).

mod common;

use candle_core::{Device, Tensor};
use common::{qlora, Fixture};
use gemmaclip::dist::comm::{all_reduce_grads, Communicator, ThreadComm};
use gemmaclip::model::gemma3::BaseFormat;
use gemmaclip::model::vlm::Supervised;
use gemmaclip::train::step::{loss_and_grads, Batch, StepOptions};

/// Rows `pick` of the fixture's padded two-row text batch, supervised from position 3 on.
fn batch_of(f: &Fixture, pick: &[usize]) -> Batch {
    let ids = f.rows_i64("batch.input_ids");
    let mask = f.rows_i64("batch.attention_mask");
    let labels: Vec<Vec<i64>> = pick
        .iter()
        .map(|&r| {
            ids[r]
                .iter()
                .zip(&mask[r])
                .enumerate()
                .map(|(t, (&id, &m))| if m == 1 && t >= 3 { id } else { -100 })
                .collect()
        })
        .collect();
    Batch {
        ids: pick.iter().map(|&r| ids[r].iter().map(|&x| x as u32).collect()).collect(),
        valid: pick.iter().map(|&r| mask[r].iter().map(|&m| m == 1).collect()).collect(),
        pixels: None,
        supervised: Supervised::from_labels(&labels),
    }
}

fn to_vecs(grads: &[Option<Tensor>]) -> Vec<Option<Vec<f32>>> {
    grads.iter().map(|g| g.as_ref().map(|g| g.flatten_all().unwrap().to_vec1::<f32>().unwrap())).collect()
}

#[test]
fn two_workers_of_one_row_equal_one_worker_of_two() {
    let f = Fixture::load("parity.safetensors");
    let cpu = Device::Cpu;
    let both = batch_of(&f, &[0, 1]);
    let total = both.supervised.rows.len();
    let (vlm, vars) = qlora::model(&cpu, BaseFormat::Dense);
    let vars: Vec<_> = vars.into_iter().map(|(_, v)| v).collect();
    let one = loss_and_grads(&vlm, &both, &vars, &StepOptions::default()).unwrap();
    let (one_loss, one_grads) = (one.loss, to_vecs(&one.grads));

    let comms = ThreadComm::group(2);
    let results: Vec<(f32, Vec<Option<Vec<f32>>>)> = std::thread::scope(|s| {
        let f = &f;
        let hs: Vec<_> = comms
            .iter()
            .map(|comm| {
                s.spawn(move || {
                    let (vlm, vars) = qlora::model(&Device::Cpu, BaseFormat::Dense);
                    let vars: Vec<_> = vars.into_iter().map(|(_, v)| v).collect();
                    let mine = batch_of(f, &[comm.rank()]);
                    // each rank divides by the global batch's supervised tokens, so the sum over
                    // ranks is the global mean
                    let opts = StepOptions { loss_denominator: Some(total), ..Default::default() };
                    let mut g = loss_and_grads(&vlm, &mine, &vars, &opts).unwrap();
                    let like: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
                    all_reduce_grads(comm, &mut g.grads, &like).unwrap();
                    let mut loss = [g.loss];
                    comm.all_reduce_sum(&mut loss).unwrap();
                    (loss[0], to_vecs(&g.grads))
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(results[0].1, results[1].1, "every rank holds the same summed gradients");
    let (dist_loss, dist_grads) = &results[0];
    let mut worst = 0f32;
    for (a, b) in dist_grads.iter().zip(&one_grads) {
        assert_eq!(a.is_some(), b.is_some());
        if let (Some(a), Some(b)) = (a, b) {
            let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(f32::MIN_POSITIVE);
            worst = worst.max(a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale);
        }
    }
    let loss_err = (dist_loss - one_loss).abs() / one_loss.abs();
    println!("2 workers x 1 row vs 1 worker x 2 rows: loss {dist_loss} vs {one_loss} (relative {loss_err:.1e}), max relative gradient difference {worst:.1e}");
    // f32 summation in another order (per-row partial sums added across ranks) is the only difference
    assert!(loss_err <= 1e-6 && worst <= 1e-5, "loss {loss_err:.2e}, gradients {worst:.2e}");
}
