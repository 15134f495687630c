//! ScienceQA scoring: answer parsing (our "Final Answer:" block first, then LLaVA's rules) and the
//! official accuracy breakdown (lupantech/ScienceQA tools/evaluate_acc.py).

use crate::data::scienceqa::Problem;
use serde::Serialize;

fn letter_index(c: char, n_choices: usize) -> Option<usize> {
    let i = (c as u32).checked_sub('A' as u32)? as usize;
    (c.is_ascii_uppercase() && i < n_choices).then_some(i)
}

/// The chosen option's index, or None when the text names none (scored as wrong, as LLaVA does).
pub fn parse_answer(text: &str, n_choices: usize) -> Option<usize> {
    // Ours: "Final Answer:\nB) whale" (also "(B)", "B.", "B:" or a bare "B").
    if let Some(pos) = text.rfind("Final Answer:") {
        let rest = text[pos + "Final Answer:".len()..].trim_start();
        let rest = rest.strip_prefix('(').unwrap_or(rest);
        let mut chars = rest.chars();
        if let Some(c) = chars.next() {
            let after = chars.next();
            if matches!(after, None | Some(')') | Some('.') | Some(':') | Some(' ') | Some('\n')) {
                if let Some(i) = letter_index(c, n_choices) {
                    return Some(i);
                }
            }
        }
    }
    // LLaVA's eval_science_qa.py: options are A-E; a letter past the choices counts as wrong.
    let options = ['A', 'B', 'C', 'D', 'E'];
    let pick = |c: char| if options.contains(&c) { letter_index(c, n_choices) } else { None };
    let t = text.trim();
    let mut cs = t.chars();
    if let (Some(c), None) = (cs.next(), cs.next()) {
        if options.contains(&c) {
            return pick(c);
        }
    }
    let chars: Vec<char> = t.chars().collect();
    if chars.len() >= 3 && options.contains(&chars[0]) && chars[1] == '.' && chars[2] == ' ' {
        return pick(chars[0]);
    }
    // re.findall(r'The answer is ([A-Z]).') -- the final '.' matches any character
    let needle = "The answer is ";
    let mut found = vec![];
    let mut from = 0;
    while let Some(p) = t[from..].find(needle) {
        let at = from + p + needle.len();
        let mut rest = t[at..].chars();
        if let (Some(c), Some(_)) = (rest.next(), rest.next()) {
            if c.is_ascii_uppercase() {
                found.push(c);
            }
        }
        from = at;
    }
    if found.len() == 1 {
        return letter_index(found[0], n_choices);
    }
    None
}

/// One scored question.
#[derive(Debug, Clone)]
pub struct Scored {
    pub subject: String,
    pub grade: String,
    pub has_text: bool,
    pub has_image: bool,
    pub correct: bool,
}

impl Scored {
    pub fn of(p: &Problem, predicted: Option<usize>) -> Self {
        Self {
            subject: p.subject.clone(),
            grade: p.grade.clone(),
            has_text: !p.hint.is_empty(),
            has_image: p.image.is_some(),
            correct: predicted == Some(p.answer),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Column {
    pub name: &'static str,
    pub correct: usize,
    pub count: usize,
    /// Percent; None when the column is empty.
    pub accuracy: Option<f64>,
}

fn grade_number(g: &str) -> Option<u32> {
    g.strip_prefix("grade")?.parse().ok()
}

/// NAT SOC LAN TXT IMG NO G1-6 G7-12 Avg, as the official scorer defines them.
pub fn breakdown(rows: &[Scored]) -> Vec<Column> {
    type Pred = fn(&Scored) -> bool;
    let cols: [(&'static str, Pred); 9] = [
        ("NAT", |s| s.subject == "natural science"),
        ("SOC", |s| s.subject == "social science"),
        ("LAN", |s| s.subject == "language science"),
        ("TXT", |s| s.has_text),
        ("IMG", |s| s.has_image),
        ("NO", |s| !s.has_text && !s.has_image),
        ("G1-6", |s| grade_number(&s.grade).is_some_and(|g| (1..=6).contains(&g))),
        ("G7-12", |s| grade_number(&s.grade).is_some_and(|g| (7..=12).contains(&g))),
        ("Avg", |_| true),
    ];
    cols.iter()
        .map(|(name, f)| {
            let sel: Vec<&Scored> = rows.iter().filter(|s| f(s)).collect();
            let correct = sel.iter().filter(|s| s.correct).count();
            let count = sel.len();
            Column { name, correct, count, accuracy: (count > 0).then(|| correct as f64 / count as f64 * 100.0) }
        })
        .collect()
}

/// The breakdown as a text table: accuracy with two decimals, counts beside.
pub fn table(cols: &[Column]) -> String {
    let head: Vec<String> = cols.iter().map(|c| format!("{:>14}", c.name)).collect();
    let vals: Vec<String> = cols
        .iter()
        .map(|c| {
            let acc = c.accuracy.map_or("-".to_string(), |a| format!("{a:.2}"));
            format!("{:>14}", format!("{acc} ({}/{})", c.correct, c.count))
        })
        .collect();
    format!("{}\n{}\n", head.join(""), vals.join(""))
}
