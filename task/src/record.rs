//! The telemetry record: one JSON object per machine per minute.
//!
//! Records arrive from untrusted sources (MQTT, files), so parsing checks every field and
//! reports the first problem by name; it never panics. A series has exactly
//! [`SAMPLES`] samples, each a finite number or `null` (sensor dropout).

use serde::{Deserialize, Serialize};

/// Samples per series.
pub const SAMPLES: usize = 6;
/// Longest accepted record in bytes.
pub const MAX_RECORD_BYTES: usize = 64 << 10;

/// Kind of machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A pump (has pressure).
    Pump,
    /// A compressor (has pressure).
    Compressor,
    /// A motor.
    Motor,
    /// A fan.
    Fan,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 4] = [Kind::Pump, Kind::Compressor, Kind::Motor, Kind::Fan];

    /// Whether records of this kind carry `pressure_bar`.
    pub fn has_pressure(self) -> bool {
        matches!(self, Kind::Pump | Kind::Compressor)
    }

    /// Lowercase name as in the JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Pump => "pump",
            Kind::Compressor => "compressor",
            Kind::Motor => "motor",
            Kind::Fan => "fan",
        }
    }
}

/// A series of samples; `None` is a dropout.
pub type Series = [Option<f64>; SAMPLES];

/// One validated telemetry record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Machine identifier.
    pub device_id: String,
    /// Kind of machine.
    pub kind: Kind,
    /// Timestamp as sent (RFC 3339).
    pub ts: String,
    /// Temperature in °C.
    pub temp_c: Series,
    /// Vibration velocity in mm/s.
    pub vibration_mm_s: Series,
    /// Motor current in A.
    pub current_a: Series,
    /// Rated current in A (> 0).
    pub rated_current_a: f64,
    /// Pressure in bar, for pumps and compressors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pressure_bar: Option<Series>,
    /// Free-text note, possibly empty.
    #[serde(default)]
    pub note: String,
}

/// Why a record was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RecordError {
    /// Larger than [`MAX_RECORD_BYTES`].
    #[error("record is {0} bytes, larger than {MAX_RECORD_BYTES}")]
    TooLarge(usize),
    /// Not JSON, or a field of the wrong type or missing.
    #[error("invalid record: {0}")]
    Json(String),
    /// A field has a value outside its domain.
    #[error("invalid {field}: {reason}")]
    Field {
        /// Field name.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
}

impl Record {
    /// Parses and validates one record from untrusted bytes.
    pub fn parse(bytes: &[u8]) -> Result<Record, RecordError> {
        if bytes.len() > MAX_RECORD_BYTES {
            return Err(RecordError::TooLarge(bytes.len()));
        }
        let record: Record = serde_json::from_slice(bytes).map_err(|e| RecordError::Json(e.to_string()))?;
        record.validate()?;
        Ok(record)
    }

    /// Checks the invariants serde cannot express.
    pub fn validate(&self) -> Result<(), RecordError> {
        let field = |field, reason: &str| Err(RecordError::Field { field, reason: reason.to_string() });
        if self.device_id.is_empty() || self.device_id.len() > 128 {
            return field("device_id", "must be 1-128 characters");
        }
        if self.ts.len() > 64 {
            return field("ts", "must be at most 64 characters");
        }
        if !(self.rated_current_a.is_finite() && self.rated_current_a > 0.0) {
            return field("rated_current_a", "must be a positive number");
        }
        if self.note.len() > 4096 {
            return field("note", "must be at most 4096 bytes");
        }
        let series: [(&'static str, Option<&Series>); 4] = [
            ("temp_c", Some(&self.temp_c)),
            ("vibration_mm_s", Some(&self.vibration_mm_s)),
            ("current_a", Some(&self.current_a)),
            ("pressure_bar", self.pressure_bar.as_ref()),
        ];
        for (name, s) in series {
            if let Some(s) = s
                && s.iter().flatten().any(|v| !v.is_finite() || v.abs() > 1e6)
            {
                return field(name, "samples must be finite numbers of magnitude below 1e6");
            }
        }
        if self.kind.has_pressure() && self.pressure_bar.is_none() {
            return field("pressure_bar", "is required for pumps and compressors");
        }
        Ok(())
    }

    /// Serialises the record as one JSON line (no trailing newline).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a record always serialises")
    }
}

/// Statistics of one series, ignoring dropouts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    /// Smallest sample.
    pub min: f64,
    /// Largest sample.
    pub max: f64,
    /// First present sample.
    pub first: f64,
    /// Last present sample.
    pub last: f64,
    /// Number of dropouts.
    pub dropouts: usize,
}

/// Statistics of `series`, or `None` when every sample dropped out.
pub fn stats(series: &Series) -> Option<Stats> {
    let present: Vec<f64> = series.iter().flatten().copied().collect();
    let (&first, &last) = (present.first()?, present.last()?);
    Some(Stats {
        min: present.iter().copied().fold(f64::INFINITY, f64::min),
        max: present.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        first,
        last,
        dropouts: SAMPLES - present.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"device_id":"pump-0042","kind":"pump","ts":"2026-11-29T10:00:00Z",
 "temp_c":[61.2,61.9,62.5,63.0,63.8,64.1],
 "vibration_mm_s":[2.1,2.3,2.2,2.4,2.2,2.3],
 "current_a":[10.1,10.3,10.2,10.4,10.2,10.3], "rated_current_a":12.0,
 "pressure_bar":[6.1,6.0,6.1,6.0,6.1,6.0],
 "note":"slight rattling near the coupling"}"#;

    #[test]
    fn parses_the_task_md_example() {
        let r = Record::parse(GOOD.as_bytes()).unwrap();
        assert_eq!(r.kind, Kind::Pump);
        assert_eq!(stats(&r.temp_c).unwrap().max, 64.1);
        assert_eq!(Record::parse(r.to_json().as_bytes()).unwrap(), r);
    }

    #[test]
    fn refuses_malformed_records_by_field() {
        let cases = [
            ("not json", "invalid record"),
            (&GOOD.replace("[61.2,", "[\"hot\","), "invalid record"),
            (&GOOD.replace("61.2,61.9,", "61.9,"), "invalid record"),
            (&GOOD.replace("\"pump\"", "\"boiler\""), "invalid record"),
            (&GOOD.replace("12.0", "-1"), "rated_current_a"),
            (&GOOD.replace("\"pump-0042\"", "\"\""), "device_id"),
            (&GOOD.replace(" \"pressure_bar\":[6.1,6.0,6.1,6.0,6.1,6.0],\n", ""), "pressure_bar"),
        ];
        for (text, expected) in cases {
            let err = Record::parse(text.as_bytes()).unwrap_err().to_string();
            assert!(err.contains(expected), "{err} for {text}");
        }
        assert!(matches!(Record::parse(&vec![b' '; MAX_RECORD_BYTES + 1]), Err(RecordError::TooLarge(_))));
    }

    #[test]
    fn stats_ignore_dropouts() {
        let s = stats(&[None, Some(3.0), Some(1.0), None, Some(2.0), None]).unwrap();
        assert_eq!((s.min, s.max, s.first, s.last, s.dropouts), (1.0, 3.0, 3.0, 2.0, 3));
        assert!(stats(&[None; SAMPLES]).is_none());
    }
}
