//! `gemmaclip bench train-step` on the tiny checkpoint, on the CPU.

mod common;

use std::process::Command;

/// `--checkpointing both` runs both modes from the same weights: their first steps are the same
/// step, so checkpointing (which changes no value on the CPU) must give the same step-1 loss and
/// gradient norm. The second mode used to start from the weights the first mode had trained.
#[test]
fn both_checkpointing_modes_start_from_the_same_weights() {
    let dir = common::tiny_dir();
    let o = Command::new(env!("CARGO_BIN_EXE_gemmaclip"))
        .args(["bench", "train-step", "--model"])
        .arg(dir.join("llm"))
        .arg("--vision-model")
        .arg(dir.join("vision"))
        .args(["--checkpointing", "both", "--seq", "64", "--label-tokens", "16", "--steps", "2", "--warmup", "1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2, "one line per mode: {rows:?}");
    assert_ne!(rows[0]["grad_ckpt"], rows[1]["grad_ckpt"]);
    for key in ["step1_loss", "step1_grad_norm"] {
        assert_eq!(rows[0][key], rows[1][key], "{key}: {rows:?}");
    }
    // the modes' last steps did train: the loss moved from step 1
    assert_ne!(rows[0]["loss"], rows[0]["step1_loss"]);
}
