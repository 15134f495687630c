//! The command-line conventions of Hugging Face's `HfArgumentParser` (the transformers, TRL and
//! PEFT example scripts), applied to every argument of every subcommand when the command is built,
//! so that no flag added later can miss them:
//! - every long flag (and alias) also answers to its snake_case spelling: `--output_dir`;
//! - a boolean flag takes an optional value: `--bf16` alone is true, `--bf16 True` / `--bf16 false`
//!   are read as argparse's `string_to_bool` reads them;
//! - a flag given twice keeps its last value.

use clap::builder::ValueParser;
use clap::{Arg, ArgAction, Command};

/// argparse's `string_to_bool` as HfArgumentParser uses it: yes/true/t/y/1 and no/false/f/n/0,
/// case-insensitive.
pub fn string_to_bool(v: &str) -> Result<bool, String> {
    match v.to_ascii_lowercase().as_str() {
        "yes" | "true" | "t" | "y" | "1" => Ok(true),
        "no" | "false" | "f" | "n" | "0" => Ok(false),
        _ => Err("expected one of true/false, yes/no, t/f, y/n, 1/0 (case-insensitive)".into()),
    }
}

/// `cmd` and all its subcommands with the conventions above.
pub fn hf_conventions(cmd: Command) -> Command {
    cmd.args_override_self(true).mut_args(hf_arg).mut_subcommands(hf_conventions)
}

fn hf_arg(arg: Arg) -> Arg {
    let arg = if matches!(arg.get_action(), ArgAction::SetTrue) { optional_bool(arg) } else { arg };
    snake_case_aliases(arg)
}

/// A clap flag (`bool`, SetTrue) becomes an option whose value may be left out (argparse's
/// `nargs="?", const=True`). Its default stays what the field declares (false unless given).
fn optional_bool(arg: Arg) -> Arg {
    let declared_default = !arg.get_default_values().is_empty();
    let arg = arg
        .action(ArgAction::Set)
        .num_args(0..=1)
        .require_equals(false)
        .default_missing_value("true")
        .value_parser(ValueParser::new(string_to_bool))
        .value_name("BOOL");
    if declared_default {
        arg
    } else {
        arg.default_value("false").hide_default_value(true)
    }
}

/// Adds `--snake_case` for the long name and every alias that has a dash (hidden from --help).
fn snake_case_aliases(arg: Arg) -> Arg {
    let mut names: Vec<String> = arg.get_long().map(String::from).into_iter().collect();
    names.extend(arg.get_all_aliases().unwrap_or_default().into_iter().map(String::from));
    let snake: Vec<String> =
        names.iter().filter(|n| n.contains('-')).map(|n| n.replace('-', "_")).filter(|s| !names.contains(s)).collect();
    snake.into_iter().fold(arg, |arg, s| arg.alias(s))
}
