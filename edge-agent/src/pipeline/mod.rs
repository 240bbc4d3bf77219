//! Records in, decisions out, summaries (being written).
