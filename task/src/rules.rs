//! The ground-truth label rules of TASK.md: first matching step wins.
//!
//! A pure function of a record. Max, first and last ignore `null` samples. The thresholds
//! are the task's, written once here.

use serde::{Deserialize, Serialize};

use crate::{
    notes,
    record::{Record, stats},
};

/// The decision for one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Label {
    /// Nothing to do.
    Normal,
    /// Schedule a human check.
    Inspect,
    /// Reduce load now.
    Throttle,
    /// Stop the machine now.
    Shutdown,
}

impl Label {
    /// Every label, in the order the model scores them.
    pub const ALL: [Label; 4] = [Label::Normal, Label::Inspect, Label::Throttle, Label::Shutdown];

    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Label::Normal => "normal",
            Label::Inspect => "inspect",
            Label::Throttle => "throttle",
            Label::Shutdown => "shutdown",
        }
    }

    /// Index in [`Label::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for Label {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Label {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Label::ALL
            .into_iter()
            .find(|l| l.as_str() == s)
            .ok_or_else(|| format!("unknown label {s:?} (expected normal, inspect, throttle or shutdown)"))
    }
}

/// Shutdown: max temperature at or above this (°C).
pub const SHUTDOWN_TEMP_C: f64 = 95.0;
/// Shutdown: max vibration at or above this (mm/s).
pub const SHUTDOWN_VIBRATION: f64 = 11.2;
/// Shutdown: max current at or above this share of rated current.
pub const SHUTDOWN_CURRENT_RATIO: f64 = 1.5;
/// Throttle: temperature rise (last − first) at or above this (°C)…
pub const THROTTLE_TEMP_RISE_C: f64 = 8.0;
/// …while max temperature is at or above this (°C).
pub const THROTTLE_TEMP_C: f64 = 80.0;
/// Throttle: max current at or above this share of rated current.
pub const THROTTLE_CURRENT_RATIO: f64 = 1.2;
/// Throttle: max pressure at or above this (bar).
pub const THROTTLE_PRESSURE_BAR: f64 = 9.0;
/// Inspect: max vibration at or above this (mm/s).
pub const INSPECT_VIBRATION: f64 = 4.5;
/// Inspect: pressure drop (first − last) at or above this (bar).
pub const INSPECT_PRESSURE_DROP_BAR: f64 = 1.5;

/// Which step of the rules decided, for explanations and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// 1: the note reports a hazard.
    Hazard,
    /// 2: the note reports maintenance or a test.
    Maintenance,
    /// 3: a shutdown limit.
    ShutdownLimit,
    /// 4: a throttle limit.
    ThrottleLimit,
    /// 5: an inspect condition.
    Inspect,
    /// 6: nothing matched.
    Otherwise,
}

impl Step {
    /// Every step, in rule order.
    pub const ALL: [Step; 6] = [
        Step::Hazard,
        Step::Maintenance,
        Step::ShutdownLimit,
        Step::ThrottleLimit,
        Step::Inspect,
        Step::Otherwise,
    ];

    /// A short name: `hazard`, `maintenance`, `shutdown-limit`, `throttle-limit`, `inspect`,
    /// `otherwise`.
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Hazard => "hazard",
            Step::Maintenance => "maintenance",
            Step::ShutdownLimit => "shutdown-limit",
            Step::ThrottleLimit => "throttle-limit",
            Step::Inspect => "inspect",
            Step::Otherwise => "otherwise",
        }
    }
}

/// The label of a record and the step that chose it.
pub fn decide(r: &Record) -> (Label, Step) {
    let facts = notes::read(&r.note);
    if facts.hazard {
        return (Label::Shutdown, Step::Hazard);
    }
    if facts.maintenance {
        return (Label::Normal, Step::Maintenance);
    }
    let temp = stats(&r.temp_c);
    let vib = stats(&r.vibration_mm_s);
    let cur = stats(&r.current_a);
    let pres = r.pressure_bar.as_ref().and_then(stats);
    let max = |s: Option<crate::record::Stats>| s.map(|s| s.max);
    let ge = |v: Option<f64>, limit: f64| v.is_some_and(|v| v >= limit);
    let rated = r.rated_current_a;

    if ge(max(temp), SHUTDOWN_TEMP_C)
        || ge(max(vib), SHUTDOWN_VIBRATION)
        || ge(max(cur), SHUTDOWN_CURRENT_RATIO * rated)
    {
        return (Label::Shutdown, Step::ShutdownLimit);
    }
    let rise = temp.map(|t| t.last - t.first);
    if (ge(rise, THROTTLE_TEMP_RISE_C) && ge(max(temp), THROTTLE_TEMP_C))
        || ge(max(cur), THROTTLE_CURRENT_RATIO * rated)
        || ge(max(pres), THROTTLE_PRESSURE_BAR)
    {
        return (Label::Throttle, Step::ThrottleLimit);
    }
    let drop = pres.map(|p| p.first - p.last);
    let any_null = [Some(&r.temp_c), Some(&r.vibration_mm_s), Some(&r.current_a), r.pressure_bar.as_ref()]
        .into_iter()
        .flatten()
        .any(|s| s.iter().any(Option::is_none));
    if ge(max(vib), INSPECT_VIBRATION) || facts.symptom || ge(drop, INSPECT_PRESSURE_DROP_BAR) || any_null {
        return (Label::Inspect, Step::Inspect);
    }
    (Label::Normal, Step::Otherwise)
}

/// The ground-truth label of a record.
pub fn label(r: &Record) -> Label {
    decide(r).0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Kind, SAMPLES};

    fn flat(v: f64) -> [Option<f64>; SAMPLES] {
        [Some(v); SAMPLES]
    }

    fn base() -> Record {
        Record {
            device_id: "pump-1".into(),
            kind: Kind::Pump,
            ts: "2026-11-29T10:00:00Z".into(),
            temp_c: flat(60.0),
            vibration_mm_s: flat(2.0),
            current_a: flat(10.0),
            rated_current_a: 12.0,
            pressure_bar: Some(flat(6.0)),
            note: String::new(),
        }
    }

    fn with(f: impl FnOnce(&mut Record)) -> Record {
        let mut r = base();
        f(&mut r);
        r
    }

    #[test]
    fn each_step_fires_on_its_own() {
        let cases: Vec<(Record, Label, Step)> = vec![
            (base(), Label::Normal, Step::Otherwise),
            (with(|r| r.note = "smoke from the housing".into()), Label::Shutdown, Step::Hazard),
            (with(|r| r.note = "refrigerant leaking at valve".into()), Label::Shutdown, Step::Hazard),
            (with(|r| r.note = "in maintenance window".into()), Label::Normal, Step::Maintenance),
            (with(|r| r.temp_c[3] = Some(95.0)), Label::Shutdown, Step::ShutdownLimit),
            (with(|r| r.vibration_mm_s[0] = Some(11.2)), Label::Shutdown, Step::ShutdownLimit),
            (with(|r| r.current_a[5] = Some(18.0)), Label::Shutdown, Step::ShutdownLimit),
            (
                with(|r| r.temp_c = [Some(75.0), Some(77.0), Some(79.0), Some(81.0), Some(82.0), Some(83.0)]),
                Label::Throttle,
                Step::ThrottleLimit,
            ),
            (with(|r| r.current_a[2] = Some(14.4)), Label::Throttle, Step::ThrottleLimit),
            (with(|r| r.pressure_bar.as_mut().unwrap()[1] = Some(9.0)), Label::Throttle, Step::ThrottleLimit),
            (with(|r| r.vibration_mm_s[4] = Some(4.5)), Label::Inspect, Step::Inspect),
            (with(|r| r.note = "grinding noise".into()), Label::Inspect, Step::Inspect),
            (
                with(|r| {
                    r.pressure_bar = Some([Some(7.0), Some(6.5), Some(6.2), Some(6.0), Some(5.8), Some(5.5)])
                }),
                Label::Inspect,
                Step::Inspect,
            ),
            (with(|r| r.current_a[1] = None), Label::Inspect, Step::Inspect),
        ];
        for (r, want, step) in cases {
            assert_eq!(decide(&r), (want, step), "{r:?}");
        }
    }

    #[test]
    fn thresholds_are_inclusive_and_just_below_does_not_fire() {
        assert_eq!(label(&with(|r| r.temp_c[3] = Some(94.99))), Label::Normal);
        assert_eq!(label(&with(|r| r.vibration_mm_s[3] = Some(4.49))), Label::Normal);
        assert_eq!(label(&with(|r| r.current_a[3] = Some(14.39))), Label::Normal);
        assert_eq!(label(&with(|r| r.pressure_bar.as_mut().unwrap()[3] = Some(8.99))), Label::Normal);
        // A rise of 8 °C that stays below 80 °C is not a throttle.
        let warm = [Some(70.0), Some(72.0), Some(74.0), Some(76.0), Some(77.0), Some(79.9)];
        assert_eq!(label(&with(|r| r.temp_c = warm)), Label::Normal);
    }

    #[test]
    fn precedence_first_matching_step_wins() {
        // Hazard beats maintenance and limits.
        let r = with(|r| {
            r.note = "maintenance window, but sparks at terminal box".into();
            r.temp_c[0] = Some(99.0);
        });
        assert_eq!(decide(&r), (Label::Shutdown, Step::Hazard));
        // Maintenance overrides shutdown limits (a calibration run may read anything).
        let r = with(|r| {
            r.note = "sensor test in progress".into();
            r.vibration_mm_s[0] = Some(20.0);
        });
        assert_eq!(decide(&r), (Label::Normal, Step::Maintenance));
        // Shutdown limit beats throttle limit.
        let r = with(|r| {
            r.current_a[0] = Some(19.0);
            r.pressure_bar.as_mut().unwrap()[0] = Some(9.5);
        });
        assert_eq!(decide(&r), (Label::Shutdown, Step::ShutdownLimit));
        // Throttle beats inspect.
        let r = with(|r| {
            r.note = "loud knocking".into();
            r.pressure_bar.as_mut().unwrap()[0] = Some(9.5);
        });
        assert_eq!(decide(&r), (Label::Throttle, Step::ThrottleLimit));
    }

    #[test]
    fn negated_hazards_do_not_trigger() {
        for note in
            ["no smoke seen", "leak test passed", "no sign of fire", "NO SPARKS", "checked for leaks none"]
        {
            assert_eq!(label(&with(|r| r.note = note.into())), Label::Normal, "{note}");
        }
    }

    #[test]
    fn dropouts_are_ignored_by_max_first_last() {
        let r = with(|r| {
            r.temp_c = [None, Some(81.0), Some(84.0), Some(86.0), Some(89.5), None];
        });
        // Rise 8.5 from the first to the last present sample, max 89.5 → throttle (not inspect).
        assert_eq!(decide(&r), (Label::Throttle, Step::ThrottleLimit));
    }
}
