//! The text the model reads for a record, and the prompt around it.
//!
//! Preprocessing computes statistics — min / max / first → last and a trend word per series,
//! current as a share of rated current, dropouts — and passes the note verbatim. It does not
//! apply the label rules: the decision is the model's. The instructions are identical for
//! every record, so their keys and values can be computed once per model version
//! ([`INSTRUCTIONS`] is the shared prefix).

use crate::record::{Record, Series, stats};

/// The system prompt shared by every record: what the labels mean.
pub const INSTRUCTIONS: &str = "You triage industrial equipment telemetry. Reply with one word: \
normal (nothing to do), inspect (schedule a human check), throttle (reduce load now) or \
shutdown (stop the machine now). Hazards in the note (smoke, fire, sparks, burning smell, leaks) \
mean shutdown; scheduled maintenance or sensor tests mean normal; very high temperature, \
vibration or current mean shutdown; fast heating, high current or high pressure mean throttle; \
vibration, noises, odours, looseness, pressure drops or missing samples mean inspect.";

fn fmt(v: f64) -> String {
    format!("{v:.1}")
}

fn trend(first: f64, last: f64, scale: f64) -> &'static str {
    let d = last - first;
    if d > scale {
        "rising"
    } else if d < -scale {
        "falling"
    } else {
        "steady"
    }
}

fn line(name: &str, unit: &str, series: &Series, scale: f64) -> String {
    match stats(series) {
        None => format!("{name}: no samples (all {} dropped out)", series.len()),
        Some(s) => {
            let mut out = format!(
                "{name} {unit}: min {} max {}, {} -> {} ({})",
                fmt(s.min),
                fmt(s.max),
                fmt(s.first),
                fmt(s.last),
                trend(s.first, s.last, scale)
            );
            if s.dropouts > 0 {
                out.push_str(&format!(", {} missing", s.dropouts));
            }
            out
        }
    }
}

/// The record as the text the model reads.
pub fn record_text(r: &Record) -> String {
    let mut lines = vec![format!("machine: {}", r.kind.as_str())];
    lines.push(line("temperature", "C", &r.temp_c, 1.0));
    lines.push(line("vibration", "mm/s", &r.vibration_mm_s, 0.5));
    let mut current = line("current", "A", &r.current_a, 0.5);
    if let Some(s) = stats(&r.current_a) {
        current.push_str(&format!(
            ", max {:.0}% of rated {}",
            100.0 * s.max / r.rated_current_a,
            fmt(r.rated_current_a)
        ));
    }
    lines.push(current);
    if let Some(p) = &r.pressure_bar {
        lines.push(line("pressure", "bar", p, 0.3));
    }
    let note = r.note.trim();
    lines.push(format!("note: {}", if note.is_empty() { "(none)" } else { note }));
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_has_statistics_and_the_note_verbatim() {
        let r = Record::parse(
            br#"{"device_id":"pump-0042","kind":"pump","ts":"2026-11-29T10:00:00Z",
            "temp_c":[61.2,61.9,62.5,63.0,63.8,64.1],"vibration_mm_s":[2.1,2.3,null,2.4,2.2,2.3],
            "current_a":[10.1,10.3,10.2,10.4,10.2,10.3],"rated_current_a":12.0,
            "pressure_bar":[6.1,6.0,6.1,6.0,6.1,6.0],"note":"Slight RATTLING near the coupling"}"#,
        )
        .unwrap();
        let text = record_text(&r);
        assert_eq!(
            text,
            "machine: pump\n\
             temperature C: min 61.2 max 64.1, 61.2 -> 64.1 (rising)\n\
             vibration mm/s: min 2.1 max 2.4, 2.1 -> 2.3 (steady), 1 missing\n\
             current A: min 10.1 max 10.4, 10.1 -> 10.3 (steady), max 87% of rated 12.0\n\
             pressure bar: min 6.0 max 6.1, 6.1 -> 6.0 (steady)\n\
             note: Slight RATTLING near the coupling"
        );
    }
}
