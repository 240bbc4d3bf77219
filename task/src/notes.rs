//! Reading operator notes for the label rules.
//!
//! A note is free text: the same fact is phrased many ways, misspelt, abbreviated or written in
//! capitals, and a word may appear in a negative sense ("no smoke seen", "leak test passed").
//! The reader lower-cases the note, splits it into clauses (punctuation and conjunctions such as
//! "but"), finds lexicon terms in each clause, and drops a term when a negation cue stands
//! shortly before it ("no", "without", …) or after it ("passed", "ok", "completed", …).
//!
//! The lexicon below is the single source of truth for both this reader and the data
//! generator, so every phrasing the generator emits is one the rules understand. It is not a
//! model of English: it is the closed vocabulary of our synthetic task, documented here so
//! users bringing their own data know what the ground truth recognises.

/// A fact a note can report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fact {
    /// Smoke, fire, flames, sparks, a burning smell, or a leak.
    Hazard,
    /// Scheduled maintenance, calibration, a sensor test, a maintenance window.
    Maintenance,
    /// Unusual noise, grinding, rattling, squealing, knocking, a non-burning odour,
    /// something loose, intermittent behaviour.
    Symptom,
}

/// What a note reports (after negations are removed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NoteFacts {
    /// A hazard is reported.
    pub hazard: bool,
    /// The machine is under maintenance or in a test.
    pub maintenance: bool,
    /// A symptom is reported.
    pub symptom: bool,
}

/// Terms (one or more words, lowercase) and the fact each reports. Misspellings the generator
/// uses are listed as terms of their own.
pub const LEXICON: &[(&str, Fact)] = &[
    // Hazards.
    ("smoke", Fact::Hazard),
    ("smoking", Fact::Hazard),
    ("smoky", Fact::Hazard),
    ("smokey", Fact::Hazard),
    ("smoek", Fact::Hazard),
    ("smouldering", Fact::Hazard),
    ("fire", Fact::Hazard),
    ("flame", Fact::Hazard),
    ("flames", Fact::Hazard),
    ("flams", Fact::Hazard),
    ("spark", Fact::Hazard),
    ("sparks", Fact::Hazard),
    ("sparking", Fact::Hazard),
    ("sparkes", Fact::Hazard),
    ("arcing", Fact::Hazard),
    ("burning", Fact::Hazard),
    ("burnt", Fact::Hazard),
    ("burned", Fact::Hazard),
    ("scorched", Fact::Hazard),
    ("leak", Fact::Hazard),
    ("leaks", Fact::Hazard),
    ("leaking", Fact::Hazard),
    ("leakage", Fact::Hazard),
    ("leek", Fact::Hazard),
    ("dripping oil", Fact::Hazard),
    ("weeping oil", Fact::Hazard),
    ("dripping refrigerant", Fact::Hazard),
    ("gas escaping", Fact::Hazard),
    // Maintenance.
    ("maintenance", Fact::Maintenance),
    ("maintenence", Fact::Maintenance),
    ("maint", Fact::Maintenance),
    ("calibration", Fact::Maintenance),
    ("calibrating", Fact::Maintenance),
    ("callibration", Fact::Maintenance),
    ("sensor test", Fact::Maintenance),
    ("sensor testing", Fact::Maintenance),
    ("sensor check", Fact::Maintenance),
    ("loop check", Fact::Maintenance),
    ("pm window", Fact::Maintenance),
    ("lockout", Fact::Maintenance),
    // Symptoms.
    ("noise", Fact::Symptom),
    ("noisy", Fact::Symptom),
    ("noize", Fact::Symptom),
    ("grinding", Fact::Symptom),
    ("grindng", Fact::Symptom),
    ("rattling", Fact::Symptom),
    ("rattle", Fact::Symptom),
    ("rattlin", Fact::Symptom),
    ("squealing", Fact::Symptom),
    ("squeal", Fact::Symptom),
    ("squeeling", Fact::Symptom),
    ("screeching", Fact::Symptom),
    ("knocking", Fact::Symptom),
    ("knock", Fact::Symptom),
    ("knoking", Fact::Symptom),
    ("chattering", Fact::Symptom),
    ("odour", Fact::Symptom),
    ("odor", Fact::Symptom),
    ("smell", Fact::Symptom),
    ("smells", Fact::Symptom),
    ("loose", Fact::Symptom),
    ("lose bolt", Fact::Symptom),
    ("wobbling", Fact::Symptom),
    ("intermittent", Fact::Symptom),
    ("intermittently", Fact::Symptom),
    ("intermitent", Fact::Symptom),
    ("intermitently", Fact::Symptom),
    ("chatering", Fact::Symptom),
    ("noisey", Fact::Symptom),
    ("on and off", Fact::Symptom),
    ("cutting out", Fact::Symptom),
];

/// Words that negate a term appearing up to [`NEGATION_WINDOW`] words after them.
pub const NEGATION_BEFORE: &[&str] = &[
    "no", "not", "without", "never", "nor", "zero", "none", "free", "absence", "isn't", "wasn't", "nothing",
];
/// Words that negate a term appearing up to [`NEGATION_WINDOW`] words before them.
pub const NEGATION_AFTER: &[&str] = &[
    "passed",
    "negative",
    "ok",
    "okay",
    "none",
    "clear",
    "cleared",
    "absent",
    "completed",
    "finished",
    "done",
    "over",
    "ended",
    "fine",
    "resolved",
    "fixed",
];
/// How far (in words) a negation cue reaches.
pub const NEGATION_WINDOW: usize = 3;

const CLAUSE_BREAKS: &[&str] = &["but", "and", "however", "though", "although", "while", "yet", "then"];

/// Splits a note into lowercase clauses of words.
fn clauses(note: &str) -> Vec<Vec<String>> {
    let mut out = vec![Vec::new()];
    let lower = note.to_lowercase();
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut Vec<Vec<String>>| {
        if word.is_empty() {
            return;
        }
        let w = std::mem::take(word);
        if CLAUSE_BREAKS.contains(&w.as_str()) {
            out.push(Vec::new());
        } else {
            out.last_mut().expect("at least one clause").push(w);
        }
    };
    for c in lower.chars() {
        if c.is_alphanumeric() || c == '\'' {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            if matches!(c, '.' | ',' | ';' | '!' | '?' | '\n' | '(' | ')' | '/') {
                out.push(Vec::new());
            }
        }
    }
    flush(&mut word, &mut out);
    out.retain(|c| !c.is_empty());
    out
}

/// Reads the facts a note reports.
pub fn read(note: &str) -> NoteFacts {
    let mut facts = NoteFacts::default();
    for clause in clauses(note) {
        for (term, fact) in LEXICON {
            let term_words: Vec<&str> = term.split(' ').collect();
            let n = term_words.len();
            if clause.len() < n {
                continue;
            }
            for start in 0..=clause.len() - n {
                if clause[start..start + n].iter().zip(&term_words).all(|(a, b)| a == b)
                    && !negated(&clause, start, start + n)
                {
                    match fact {
                        Fact::Hazard => facts.hazard = true,
                        Fact::Maintenance => facts.maintenance = true,
                        Fact::Symptom => facts.symptom = true,
                    }
                }
            }
        }
    }
    facts
}

fn negated(clause: &[String], start: usize, end: usize) -> bool {
    let before = &clause[start.saturating_sub(NEGATION_WINDOW)..start];
    let after = &clause[end..(end + NEGATION_WINDOW).min(clause.len())];
    before.iter().any(|w| NEGATION_BEFORE.contains(&w.as_str()))
        || after.iter().any(|w| NEGATION_AFTER.contains(&w.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(h: bool, m: bool, s: bool) -> NoteFacts {
        NoteFacts { hazard: h, maintenance: m, symptom: s }
    }

    #[test]
    fn reads_facts_and_negations() {
        let cases = [
            ("", f(false, false, false)),
            ("slight rattling near the coupling", f(false, false, true)),
            ("SMOKE FROM MOTOR HOUSING", f(true, false, false)),
            ("no smoke seen", f(false, false, false)),
            ("leak test passed", f(false, false, false)),
            ("no smoke, but oil leek at flange", f(true, false, false)),
            ("no sparks and no smell", f(false, false, false)),
            ("burning smell near panel", f(true, false, true)),
            ("under scheduled maintenance", f(false, true, false)),
            ("maintenance completed yesterday", f(false, false, false)),
            ("sensor test in progress; loud knocking expected", f(false, true, true)),
            ("runs intermittently", f(false, false, true)),
            ("routine round, all normal", f(false, false, false)),
            ("Checked for leaks: none", f(false, false, false)),
            ("strange odour, not burning", f(false, false, true)),
        ];
        for (note, want) in cases {
            assert_eq!(read(note), want, "{note:?}");
        }
    }
}
