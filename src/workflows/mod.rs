//! Multi-step flows built from jobs and the rooms below them. Today: [`intake`], which turns verified
//! storage events into `ingest_object` jobs.

pub mod intake;
