//! ScienceQA data: parquet splits, image preprocessing, prompts and labels, batches.

pub mod batch;
pub mod image;
pub mod order;
pub mod prompt;
pub mod resize;
mod row_check;
pub mod scienceqa;
