//! README.md and docs/*.md against the repository they describe.
//!
//! - Code fences pair up: every opening fence (```` ``` ```` or ```` ```lang ````) has a closing
//!   fence of backticks alone on its line. A "closing" fence with text after it is not one for any
//!   Markdown renderer (CommonMark gives closing fences no info string): the block then swallows
//!   the paragraphs after it, so such a line is reported where it stands.
//! - Every `gemmaclip ...` command shown in a ```` ```sh ```` block, and every
//!   `cargo run ... -- <subcommand> ...`, parses with today's command line. The commands are never
//!   run (they train, download and write); the built binary is run with the command's own
//!   arguments twice instead:
//!   1. with one unknown flag, `--x-parse-check`, appended. clap places arguments left to right
//!      and stops at the first one it cannot place, so the error must name `--x-parse-check`:
//!      then every subcommand and flag before it exists, and every value before the last one
//!      passed its parser (an unknown flag, a misspelt subcommand or a bad value would be
//!      reported first, naming itself);
//!   2. with `--help` appended. clap validates the value still pending (the last flag's) when it
//!      reaches `--help`, so exit status 0 says that value parses as well; the help printed gives
//!      the `Usage:` line, and each flag it lists outside `[OPTIONS]` (a required one) must appear
//!      in the command, since clap checks required flags only after all arguments are read and
//!      neither run gets that far.
//!
//!   Line continuations (`\`) are joined, quotes are honoured, comments, `VAR=value` prefixes,
//!   pipes and redirections are dropped. Placeholders such as `DIR` or `runs/...` are fine as
//!   values: only their syntax is checked. The children run with `GEMMACLIP_CACHE`, `HF_HOME`
//!   and the working directory in a temporary directory and `HF_HUB_OFFLINE=1`, so even a parse
//!   that unexpectedly succeeded could neither download nor write into the repository.
//! - Paths the text names in inline code under src/, tests/, tools/, docs/, assets/, configs/ or
//!   examples/ exist, and nothing points at files outside the repository (`../shared`) or at a
//!   DESIGN.md it does not carry.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// README.md, then docs/*.md in name order.
fn documents() -> Vec<PathBuf> {
    let mut docs = vec![root().join("README.md")];
    if let Ok(entries) = std::fs::read_dir(root().join("docs")) {
        let mut md: Vec<PathBuf> =
            entries.map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "md")).collect();
        md.sort();
        docs.extend(md);
    }
    docs
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn rel(path: &Path) -> String {
    path.strip_prefix(root()).unwrap_or(path).display().to_string()
}

/// A fenced code block: its info string (`sh`, `text`, empty), first line number (1-based) and body.
struct Block {
    lang: String,
    line: usize,
    body: Vec<String>,
}

/// A fence line: up to three spaces, then three or more backticks. Returns (backtick count, rest).
fn fence(line: &str) -> Option<(usize, &str)> {
    let indent = line.len() - line.trim_start_matches(' ').len();
    if indent > 3 {
        return None;
    }
    let s = &line[indent..];
    let ticks = s.len() - s.trim_start_matches('`').len();
    (ticks >= 3).then(|| (ticks, &s[ticks..]))
}

/// The fenced blocks of a document, or the problems that keep them from pairing up.
fn blocks(name: &str, text: &str) -> (Vec<Block>, Vec<String>) {
    let (mut out, mut problems) = (vec![], vec![]);
    let mut open: Option<(usize, Block)> = None;
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        match (open.take(), fence(line)) {
            (None, Some((ticks, info))) => {
                let lang = info.trim().to_string();
                if lang.contains('`') {
                    problems.push(format!("{name}:{n}: an opening fence's info string holds a backtick: {line:?}"));
                }
                open = Some((ticks, Block { lang, line: n, body: vec![] }));
            }
            (None, None) => {}
            (Some((ticks, block)), Some((t, rest))) if t >= ticks => {
                if rest.trim().is_empty() {
                    out.push(block);
                } else {
                    problems.push(format!(
                        "{name}:{n}: text after a closing fence (the block opened at line {} runs on): {line:?}",
                        block.line
                    ));
                    open = Some((ticks, block));
                }
            }
            (Some((ticks, mut block)), _) => {
                block.body.push(line.to_string());
                open = Some((ticks, block));
            }
        }
    }
    if let Some((_, block)) = open {
        problems.push(format!("{name}:{}: the fence opened here is never closed", block.line));
    }
    (out, problems)
}

#[test]
fn code_fences_pair_up() {
    let mut problems = vec![];
    for doc in documents() {
        let (blocks, p) = blocks(&rel(&doc), &read(&doc));
        problems.extend(p);
        for b in &blocks {
            if b.body.iter().all(|l| l.trim().is_empty()) {
                problems.push(format!("{}:{}: an empty code block", rel(&doc), b.line));
            }
        }
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

#[test]
fn the_checker_catches_a_fence_with_text_after_it() {
    let (_, p) = blocks("t.md", "```sh\nls\n``` The tiny model and the\nsample data go\n");
    assert_eq!(p.len(), 2, "{p:?}"); // the bad fence, then the block left open
    assert!(p[0].contains("t.md:3: text after a closing fence"), "{p:?}");
    let (b, p) = blocks("t.md", "text\n```sh\na \\\n  b\n```\n\n````text\n```\n````\n");
    assert!(p.is_empty(), "{p:?}");
    assert_eq!((b.len(), b[0].lang.as_str(), b[0].line, b[1].body.len()), (2, "sh", 2, 1));
}

/// Shell words of one logical line, with operators (`|`, `;`, `&`, `>`, `<`) as separate words
/// and a `#` comment dropped. Enough shell for what a README shows.
fn shell_words(line: &str) -> Vec<String> {
    let (mut words, mut cur, mut in_word) = (vec![], String::new(), false);
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                for c in chars.by_ref() {
                    if c == '\'' {
                        break;
                    }
                    cur.push(c);
                }
            }
            '"' => {
                in_word = true;
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' if matches!(chars.peek(), Some('"' | '\\' | '$' | '`')) => cur.push(chars.next().unwrap()),
                        c => cur.push(c),
                    }
                }
            }
            '\\' => {
                in_word = true;
                if let Some(c) = chars.next() {
                    cur.push(c);
                }
            }
            '#' if !in_word => break,
            '|' | ';' | '&' | '>' | '<' => {
                if in_word && (c == '>' || c == '<') && cur.chars().all(|d| d.is_ascii_digit()) {
                    cur.clear(); // the file descriptor of `2>&1`
                } else if in_word {
                    words.push(std::mem::take(&mut cur));
                }
                in_word = false;
                let mut op = c.to_string();
                if c == '>' && matches!(chars.peek(), Some('>' | '&')) {
                    op.push(chars.next().unwrap());
                }
                words.push(op);
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    words
}

/// The gemmaclip argument lists a ```sh block shows: `gemmaclip ARGS` (also as a path ending in
/// /gemmaclip) and `cargo run [...] -- ARGS`, with the line they start on.
fn commands(block: &Block) -> Vec<(usize, Vec<String>)> {
    let mut out = vec![];
    let mut joined = String::new();
    let mut start = block.line + 1;
    for (i, line) in block.body.iter().enumerate() {
        if joined.is_empty() {
            start = block.line + 1 + i;
        }
        match line.strip_suffix('\\') {
            Some(head) => {
                joined.push_str(head);
                joined.push(' ');
                continue;
            }
            None => joined.push_str(line),
        }
        let words = shell_words(&std::mem::take(&mut joined));
        let mut simple: Vec<Vec<String>> = vec![vec![]];
        let mut skip_next = false;
        for w in words {
            if skip_next {
                skip_next = false;
            } else if matches!(w.as_str(), ">" | ">>" | ">&" | "<") {
                skip_next = true; // a redirection and its target
            } else if w == "|" || w == ";" || w == "&" {
                simple.push(vec![]);
            } else {
                simple.last_mut().unwrap().push(w);
            }
        }
        for mut cmd in simple {
            let is_assignment = |w: &String| {
                w.split_once('=').is_some_and(|(name, _)| {
                    !name.is_empty()
                        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                        && !name.starts_with(|c: char| c.is_ascii_digit())
                })
            };
            while cmd.first().is_some_and(is_assignment) {
                cmd.remove(0);
            }
            let Some(program) = cmd.first() else { continue };
            if program == "gemmaclip" || program.ends_with("/gemmaclip") {
                out.push((start, cmd[1..].to_vec()));
            } else if program == "cargo" && cmd.get(1).is_some_and(|w| w == "run") {
                if let Some(dd) = cmd.iter().position(|w| w == "--") {
                    out.push((start, cmd[dd + 1..].to_vec()));
                }
            }
        }
    }
    out
}

#[test]
fn the_command_reader_joins_continuations_and_honours_quotes() {
    let b = Block {
        lang: "sh".into(),
        line: 10,
        body: vec![
            "# a comment".into(),
            "GEMMACLIP_PHASES=1 gemmaclip infer --choices \"A) x; B) y\" \\".into(),
            "  --question 'Which?'   # trailing comment".into(),
            "cargo run --release --features cuda -- eval --limit 2 2>&1 | tail -3".into(),
            "target/release/gemmaclip bench generate > out.jsonl".into(),
            "export HF_TOKEN=hf_x; huggingface-cli download google/gemma-3-4b-it".into(),
        ],
    };
    let c = commands(&b);
    let want: Vec<(usize, Vec<&str>)> = vec![
        (12, vec!["infer", "--choices", "A) x; B) y", "--question", "Which?"]),
        (14, vec!["eval", "--limit", "2"]),
        (15, vec!["bench", "generate"]),
    ];
    assert_eq!(c.len(), want.len(), "{c:?}");
    for ((line, args), (wl, wa)) in c.iter().zip(&want) {
        assert_eq!((*line, args.iter().map(String::as_str).collect::<Vec<_>>()), (*wl, wa.clone()));
    }
}

fn gemmaclip(sandbox: &Path, args: &[String], extra: &str) -> (Option<i32>, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_gemmaclip"))
        .args(args)
        .arg(extra)
        .current_dir(sandbox)
        .env("GEMMACLIP_CACHE", sandbox.join("cache"))
        .env("HF_HOME", sandbox.join("hf"))
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("HF_TOKEN")
        .output()
        .expect("run gemmaclip");
    (o.status.code(), String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

/// Flags the `Usage:` line of a help text lists outside brackets: the required ones.
fn required_flags(help: &str) -> Vec<String> {
    let Some(usage) = help.lines().find_map(|l| l.trim().strip_prefix("Usage:")) else { return vec![] };
    let mut depth = 0i32;
    let mut flags = vec![];
    for word in usage.split_whitespace() {
        let opens = word.matches('[').count() as i32;
        if depth == 0 && opens == 0 && word.starts_with("--") {
            flags.push(word.trim_end_matches(|c: char| !(c.is_ascii_alphanumeric() || c == '-')).to_string());
        }
        depth += opens - word.matches(']').count() as i32;
    }
    flags
}

/// `flag` and the visible aliases its entry in a help text lists (`[alias: --out]`,
/// `[aliases: --a, --b]`).
fn names_of(help: &str, flag: &str) -> Vec<String> {
    let mut names = vec![flag.to_string()];
    let is_entry = |l: &str| l.trim_start().starts_with('-') && l.starts_with("  ");
    let mut inside = false;
    for line in help.lines() {
        if is_entry(line) {
            let t = line.trim_start();
            let t = t.split_once(", ").filter(|(short, _)| short.len() == 2).map_or(t, |(_, long)| long);
            inside = t.split(|c: char| c.is_whitespace() || c == '=' || c == '[').next() == Some(flag);
        } else if inside {
            let t = line.trim();
            if let Some(list) = t.strip_prefix("[alias: ").or_else(|| t.strip_prefix("[aliases: ")) {
                let list = list.trim_end_matches(']');
                names.extend(list.split(", ").map(|a| format!("--{}", a.trim_start_matches('-'))));
            }
        }
    }
    names
}

/// Whether `args` give one of `names` (`--flag`, `--flag=v`, or its snake_case spelling).
fn gives(args: &[String], names: &[String]) -> bool {
    names.iter().any(|flag| {
        let snake = format!("--{}", flag.trim_start_matches("--").replace('-', "_"));
        args.iter().any(|a| {
            let name = a.split('=').next().unwrap_or(a);
            name == flag || name == snake
        })
    })
}

#[test]
fn the_commands_shown_parse() {
    let sandbox = tempfile::tempdir().unwrap();
    let mut problems = vec![];
    let mut checked = 0;
    for doc in documents() {
        let name = rel(&doc);
        let (blocks, _) = blocks(&name, &read(&doc));
        for block in blocks.iter().filter(|b| matches!(b.lang.as_str(), "sh" | "bash" | "shell" | "console")) {
            for (line, args) in commands(block) {
                checked += 1;
                let shown = format!("{name}:{line}: gemmaclip {}", args.join(" "));
                let (code, _, err) = gemmaclip(sandbox.path(), &args, "--x-parse-check");
                if code != Some(2) || !err.contains("unexpected argument '--x-parse-check'") {
                    problems.push(format!("{shown}\n  does not parse: {}", err.trim().replace('\n', "\n  ")));
                    continue;
                }
                let (code, out, err) = gemmaclip(sandbox.path(), &args, "--help");
                if code != Some(0) {
                    problems.push(format!("{shown}\n  does not parse: {}", err.trim().replace('\n', "\n  ")));
                    continue;
                }
                for flag in required_flags(&out) {
                    if !gives(&args, &names_of(&out, &flag)) {
                        problems.push(format!("{shown}\n  lacks the required {flag}"));
                    }
                }
            }
        }
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
    // the README alone shows train, infer, eval, init and bench commands
    assert!(checked >= 6, "only {checked} commands found: is the command reader still reading them?");
}

#[test]
fn the_parse_check_catches_what_it_claims_to() {
    let sandbox = tempfile::tempdir().unwrap();
    let args = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
    // an unknown flag is named instead of the probe
    let (_, _, err) = gemmaclip(sandbox.path(), &args("train --output-dir x --no-such-flag 1"), "--x-parse-check");
    assert!(err.contains("'--no-such-flag'"), "{err}");
    // a bad last value gets past the probe but not --help
    let bad_last = args("eval --output-dir x --split nowhere");
    let (_, _, err) = gemmaclip(sandbox.path(), &bad_last, "--x-parse-check");
    assert!(err.contains("unexpected argument '--x-parse-check'"), "{err}");
    let (code, _, err) = gemmaclip(sandbox.path(), &bad_last, "--help");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("invalid value 'nowhere'"), "{err}");
    // a missing required flag shows in the usage line
    let (code, out, _) = gemmaclip(sandbox.path(), &args("bench train-step --model m"), "--help");
    assert_eq!(code, Some(0));
    let req = required_flags(&out);
    assert!(req.contains(&"--vision-model".to_string()), "{req:?}");
    assert!(!gives(&args("bench train-step --model m"), &names_of(&out, "--vision-model")));
    assert!(gives(&args("bench train-step --vision_model m"), &names_of(&out, "--vision-model")));
    // visible aliases count as the flag
    let help =
        "Options:\n      --output-dir <DIR>\n          Where\n\n          [alias: --out]\n\n      --seed <SEED>\n";
    assert_eq!(names_of(help, "--output-dir"), ["--output-dir", "--out"]);
    assert_eq!(names_of(help, "--seed"), ["--seed"]);
}

/// Inline code spans outside fenced blocks, with their line numbers.
fn inline_code(text: &str) -> Vec<(usize, String)> {
    let mut out = vec![];
    let mut in_block = false;
    for (i, line) in text.lines().enumerate() {
        if fence(line).is_some() {
            in_block = !in_block;
            continue;
        }
        if in_block {
            continue;
        }
        let parts: Vec<&str> = line.split('`').collect();
        for (k, p) in parts.iter().enumerate() {
            if k % 2 == 1 && k + 1 < parts.len() {
                out.push((i + 1, p.to_string()));
            }
        }
    }
    out
}

#[test]
fn named_paths_exist_and_nothing_points_outside_the_repository() {
    const TOP: [&str; 7] = ["src/", "tests/", "tools/", "docs/", "assets/", "configs/", "examples/"];
    let mut problems = vec![];
    let mut texts: Vec<(String, String)> = documents().iter().map(|d| (rel(d), read(d))).collect();
    texts.push(("Cargo.toml".into(), read(&root().join("Cargo.toml"))));
    for (name, text) in &texts {
        for (n, line) in text.lines().enumerate() {
            for bad in ["../shared", "DESIGN.md"] {
                if line.contains(bad) {
                    problems.push(format!("{name}:{}: points at {bad}, which is not in this repository", n + 1));
                }
            }
        }
        if !name.ends_with(".md") {
            continue;
        }
        for (n, span) in inline_code(text) {
            let path = span.trim();
            let placeholder = path.contains(|c: char| "<>*{}|$ ".contains(c)) || path.contains("...");
            if placeholder || !TOP.iter().any(|t| path.starts_with(t)) {
                continue;
            }
            let path = path.split(':').next().unwrap_or(path); // file:line
            if !root().join(path).exists() {
                problems.push(format!("{name}:{n}: `{path}` does not exist"));
            }
        }
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}
