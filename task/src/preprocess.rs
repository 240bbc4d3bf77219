//! The text the model reads for a record, and the prompt around it.
//!
//! Preprocessing computes statistics (shared/TASK.md) — per series min / max, first → last and
//! the change between them (the trend, as a signed number: `+2.9`), current as a share of rated
//! current, dropouts — and passes the note verbatim. It does not apply the label rules: the
//! decision is the model's. The text is terse because every token costs: SmolLM2 reads a number
//! digit by digit, and an agent's decision time is the record's prefill. The
//! instructions are identical for every record, so their keys and values are computed once per
//! model version ([`INSTRUCTIONS`] is the shared prefix).

use crate::record::{Record, Series, stats};

/// The system prompt shared by every record: what the labels mean and the limits that decide
/// them (shared/TASK.md).
pub const INSTRUCTIONS: &str = "You triage industrial equipment telemetry. Reply with one word: \
normal, inspect, throttle or shutdown. The first rule that matches decides. \
1. The note reports smoke, fire, sparks, a burning smell or a leak: shutdown. \
2. The note says scheduled maintenance, calibration, a sensor test or a maintenance window: normal. \
3. Temperature max at least 95 C, vibration max at least 11.2 mm/s or current max at least 150% of rated: shutdown. \
4. Temperature change at least +8.0 C with max at least 80 C, current max at least 120% of rated or pressure max at least 9.0 bar: throttle. \
5. Vibration max at least 4.5 mm/s, a noise, odour, looseness or intermittent running in the note, a pressure change of -1.5 bar or less, or missing samples: inspect. \
6. Otherwise: normal. A negated note (\"no smoke\", \"leak test passed\") does not count.";

fn fmt(v: f64) -> String {
    format!("{v:.1}")
}

/// `name unit: min A max M, F -> L (±D)[, N missing]`, or `name unit: all N missing`: the
/// series' range, its first and last samples with the change between them (the trend), and its
/// dropouts.
fn line(name: &str, series: &Series) -> String {
    let Some(s) = stats(series) else {
        return format!("{name}: all {} missing", series.len());
    };
    let mut out = format!(
        "{name}: min {} max {}, {} -> {} ({:+.1})",
        fmt(s.min),
        fmt(s.max),
        fmt(s.first),
        fmt(s.last),
        s.last - s.first
    );
    if s.dropouts > 0 {
        out.push_str(&format!(", {} missing", s.dropouts));
    }
    out
}

/// The record as the text the model reads, e.g.
///
/// ```text
/// machine: pump
/// temperature C: min 61.2 max 64.1, 61.2 -> 64.1 (+2.9)
/// vibration mm/s: min 2.1 max 2.4, 2.1 -> 2.3 (+0.2), 1 missing
/// current A: min 10.1 max 10.4, 87% of rated 12.0, 10.1 -> 10.3 (+0.2)
/// pressure bar: min 6.0 max 6.1, 6.1 -> 6.0 (-0.1)
/// note: Slight RATTLING near the coupling
/// ```
pub fn record_text(r: &Record) -> String {
    let mut lines = vec![format!("machine: {}", r.kind.as_str())];
    lines.push(line("temperature C", &r.temp_c));
    lines.push(line("vibration mm/s", &r.vibration_mm_s));
    let mut current = line("current A", &r.current_a);
    if let Some(s) = stats(&r.current_a) {
        current.insert_str(
            current.find(',').unwrap_or(current.len()),
            &format!(", {:.0}% of rated {}", 100.0 * s.max / r.rated_current_a, fmt(r.rated_current_a)),
        );
    }
    lines.push(current);
    if let Some(p) = &r.pressure_bar {
        lines.push(line("pressure bar", p));
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
            "current_a":[10.1,10.3,10.2,10.4,null,10.3],"rated_current_a":12.0,
            "pressure_bar":[6.1,6.0,6.1,6.0,6.1,6.0],"note":"Slight RATTLING near the coupling"}"#,
        )
        .unwrap();
        let text = record_text(&r);
        assert_eq!(
            text,
            "machine: pump\n\
             temperature C: min 61.2 max 64.1, 61.2 -> 64.1 (+2.9)\n\
             vibration mm/s: min 2.1 max 2.4, 2.1 -> 2.3 (+0.2), 1 missing\n\
             current A: min 10.1 max 10.4, 87% of rated 12.0, 10.1 -> 10.3 (+0.2), 1 missing\n\
             pressure bar: min 6.0 max 6.1, 6.1 -> 6.0 (-0.1)\n\
             note: Slight RATTLING near the coupling"
        );
    }

    #[test]
    fn a_series_without_samples_says_so() {
        let mut r = Record::parse(
            br#"{"device_id":"fan-1","kind":"fan","ts":"t","temp_c":[null,null,null,null,null,null],
            "vibration_mm_s":[1,1,1,1,1,1],"current_a":[null,null,null,null,null,null],
            "rated_current_a":8.0,"note":" "}"#,
        )
        .unwrap();
        r.note = String::new();
        assert_eq!(
            record_text(&r),
            "machine: fan\ntemperature C: all 6 missing\nvibration mm/s: min 1.0 max 1.0, 1.0 -> 1.0 (+0.0)\ncurrent A: all 6 missing\nnote: (none)"
        );
    }
}
