//! The point-of-care loop (`sgps run --board <profile>`): an explicit state machine driven by
//! button events, frames from the camera, the quality gate and the one shared [`Pipeline`].
//!
//! ```text
//!       capture (1st shot)           shot k+1 == K for every class / long next
//!   Idle ───────────────▶ Enroll(class i, shot k) ───────────────────────────▶ Synthesize
//!    ▲                     │  ▲  short next: next class                            │ ok
//!    │ long capture        │  └─ capture: capture, gate, embed, store shot         ▼
//!    └─────────────────────┘                                   long capture ◀── Screen ◀─┐
//!                                                            (add shots/classes)  │ capture │
//!                                                                                 └─────────┘
//! ```
//! Screening captures, gates, embeds, classifies with the synthesized classifier, shows the
//! verdict on the LEDs (green = confident benign, amber = refer, red = confident urgent class),
//! prints it on the console and appends it to the audit log. Every state change is logged.
//!
//! Files: `machine` (the pure transition function), `actions` (the loop's state and actions: [`Device`]),
//! `inputs` (buttons and screen requests on one channel), `commands` (what the screen may ask),
//! `hardware` (camera and GPIO from a profile), `run` (`sgps run`).

mod actions;
mod commands;
mod hardware;
mod inputs;
mod machine;
mod run;

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use image::RgbImage;

use crate::board::{BoardProfile, CameraConfig, GpioConfig, TaskFile};
use crate::camera::{Camera, CameraError, Fault, ReplayCamera};
use crate::classifier::{Classifier, Prediction};
use crate::gpio::sim::{SimButtons, SimLeds};
use crate::gpio::{Button, ButtonEvent, ButtonInput, Indication, Press, StatusLeds};
use crate::pipeline::{ClassSupport, LoadOptions, Pipeline, Shots, SupportInput, SynthMode};
use crate::quality;
use crate::store::{
    self, ActiveRecord, AuditEvent, AuditLog, ClassRecord, ShotRecord, Store, StoreError, Verdict,
};
pub use commands::{Command, LastCapture, ShownClass, ShownDecision, ShownShot, Snapshot, advice};

pub use actions::Device;
pub use hardware::{open_camera, open_gpio};
pub use inputs::{Input, forward_buttons};
pub use machine::{Action, Progress, State, after_shot, transition};
pub use run::{RunOptions, run};

/// One screening decision.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub capture_sha256: [u8; 32],
    pub prediction: Prediction,
    pub verdict: Verdict,
}

/// What a session did (returned when the button input ends).
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub shots_enrolled: usize,
    pub rejected: usize,
    pub camera_errors: usize,
    pub syntheses: usize,
    /// Actions refused because the storage was full.
    pub storage_errors: usize,
    /// Screening decisions made (all of them; the audit log has every one).
    pub decisions_made: usize,
    /// The most recent decisions, at most [`RECENT_DECISIONS`] (every one of a short session),
    /// so that a device screening for months keeps its memory flat.
    pub decisions: Vec<Decision>,
    pub classifier_id: Option<String>,
    pub final_state: Option<State>,
    /// SHA-256 of the audit log's last record when the loop ended (the chain's head).
    pub audit_head: Option<[u8; 32]>,
}

/// Decisions a [`Summary`] keeps in memory (the oldest go first).
pub const RECENT_DECISIONS: usize = 256;

impl Summary {
    /// Count a decision and keep it among the recent ones.
    pub fn record(&mut self, d: Decision) {
        self.decisions_made += 1;
        if self.decisions.len() >= RECENT_DECISIONS {
            self.decisions.remove(0);
        }
        self.decisions.push(d);
    }
}

/// The verdict for a prediction under a task.
pub fn verdict(pred: &Prediction, task: &TaskFile) -> Verdict {
    if pred.refer {
        Verdict::Refer
    } else if task.classes.get(pred.top).is_some_and(|c| c.urgent) {
        Verdict::Urgent
    } else {
        Verdict::Benign
    }
}

fn indication(v: Verdict) -> Indication {
    match v {
        Verdict::Benign => Indication::Green,
        Verdict::Refer => Indication::Amber,
        Verdict::Urgent => Indication::Red,
    }
}

/// True when an error (anywhere in its chain) is a full filesystem.
pub fn is_no_space(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<StoreError>()
            .is_some_and(StoreError::is_no_space)
            || c.downcast_ref::<std::io::Error>().is_some_and(|io| {
                io.raw_os_error() == Some(28) || io.kind() == std::io::ErrorKind::StorageFull
            })
    })
}

/// Synthesizer input from stored class records: shots as stored, descriptions embedded in class
/// order (the pipeline's one support builder).
pub fn support_from_records(
    pipeline: &Pipeline,
    classes: &[ClassRecord],
) -> Result<Vec<ClassSupport>> {
    Ok(pipeline.support(
        classes
            .iter()
            .map(|c| {
                SupportInput::new(
                    c.name.as_str(),
                    c.description.clone(),
                    Shots::Embedded(c.shots.iter().map(|s| s.embedding.clone()).collect()),
                )
            })
            .collect(),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_session_keeps_only_the_recent_decisions_in_memory() {
        // The soak run found the summary growing by every decision (RSS rising in doubling
        // steps at 9k, 17k and 33k decisions): a device screening for months must not.
        let mut s = Summary::default();
        for i in 0..1000u32 {
            s.record(Decision {
                capture_sha256: [0; 32],
                prediction: Prediction {
                    probabilities: vec![1.0],
                    top: 0,
                    top_label: i.to_string(),
                    confidence: 1.0,
                    refer: false,
                },
                verdict: Verdict::Benign,
            });
        }
        assert_eq!(s.decisions_made, 1000);
        assert_eq!(s.decisions.len(), RECENT_DECISIONS);
        assert_eq!(
            s.decisions[0].prediction.top_label,
            (1000 - RECENT_DECISIONS).to_string()
        );
        assert_eq!(s.decisions.last().unwrap().prediction.top_label, "999");
        assert!(s.decisions.capacity() <= 2 * RECENT_DECISIONS);
    }
}
