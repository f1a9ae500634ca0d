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

mod commands;

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
use crate::pipeline::{ClassSupport, LoadOptions, Pipeline, SynthMode};
use crate::quality;
use crate::store::{
    self, ActiveRecord, AuditEvent, AuditLog, ClassRecord, ShotRecord, Store, StoreError, Verdict,
};
pub use commands::{Command, LastCapture, ShownClass, ShownDecision, ShownShot, Snapshot, advice};

/// Arguments of `sgps run`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RunArgs {
    /// Board profile (board/<name>.toml; installed devices: /etc/sgps/board.toml).
    #[arg(long, value_name = "FILE")]
    pub board: PathBuf,
    /// Button script for boards with simulated GPIO (lines: `press capture`, `long next`, `wait 100`).
    #[arg(long, value_name = "FILE")]
    pub script: Option<PathBuf>,
    /// Override the profile's storage directory.
    #[arg(long, value_name = "DIR")]
    pub storage_dir: Option<PathBuf>,
    /// Override the replay camera's frame directory (replay boards only).
    #[arg(long, value_name = "DIR")]
    pub replay_dir: Option<PathBuf>,
    /// Ask on the console (stdin) for the description of each class the task file leaves
    /// without one, when its enrollment starts.
    #[arg(long)]
    pub console: bool,
    /// Serve the screen on this address instead of the profile's `[ui] listen`
    /// (e.g. 127.0.0.1:0 for any free port), or `off`.
    #[arg(long, value_name = "ADDR|off")]
    pub ui: Option<String>,
    /// Models directory; overrides the profile (the CLI fills it from the global --models).
    #[arg(skip)]
    pub models_dir: Option<PathBuf>,
    /// Inference threads; overrides the profile (the CLI fills it from the global --threads).
    #[arg(skip)]
    pub threads: Option<usize>,
    /// Image-encoder variant; overrides the profile (global --image-variant).
    #[arg(skip)]
    pub image_variant: Option<String>,
    /// Text-encoder variant; overrides the profile (global --text-variant).
    #[arg(skip)]
    pub text_variant: Option<String>,
}

/// States of the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// No usable classifier; waiting for a capture press to start enrollment.
    Idle,
    /// Capturing support shot `shot` of class `class`.
    Enroll { class: usize, shot: usize },
    /// Synthesizing the classifier from the stored support set.
    Synthesize,
    /// Screening captures.
    Screen,
}

/// What the loop must do after a button event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    None,
    /// Capture a support shot for the class.
    CaptureShot {
        class: usize,
    },
    /// Capture and classify.
    CaptureScreen,
}

/// What the state machine needs to know about the stored task.
#[derive(Debug, Clone)]
pub struct Progress {
    /// Stored shots per class, in task order.
    pub shots: Vec<usize>,
    /// Shots wanted per class.
    pub per_class: usize,
    /// A classifier matching the task is active.
    pub has_classifier: bool,
}

impl Progress {
    /// First class (from `from`, wrapping) with fewer shots than wanted.
    pub fn next_incomplete(&self, from: usize) -> Option<usize> {
        let n = self.shots.len();
        (0..n)
            .map(|i| (from + i) % n)
            .find(|&c| self.shots[c] < self.per_class)
    }

    fn enroll_at(&self, class: usize) -> State {
        State::Enroll {
            class,
            shot: self.shots[class],
        }
    }
}

/// The pure transition function: (state, event) -> (state, action).
pub fn transition(state: State, ev: ButtonEvent, p: &Progress) -> (State, Action) {
    use Button::*;
    use Press::*;
    match (state, ev.button, ev.press) {
        (State::Idle, Capture, Short) => {
            let c = p.next_incomplete(0).unwrap_or(0);
            (p.enroll_at(c), Action::CaptureShot { class: c })
        }
        (State::Idle, Capture, Long) => {
            (p.enroll_at(p.next_incomplete(0).unwrap_or(0)), Action::None)
        }
        (State::Idle, Next, Long) if p.shots.iter().any(|&s| s > 0) => {
            (State::Synthesize, Action::None)
        }
        (State::Idle, Next, _) => (State::Idle, Action::None),
        (State::Enroll { class, .. }, Capture, Short) => (state, Action::CaptureShot { class }),
        (State::Enroll { class, .. }, Next, Short) => {
            (p.enroll_at((class + 1) % p.shots.len()), Action::None)
        }
        (State::Enroll { .. }, Next, Long) => (State::Synthesize, Action::None),
        (State::Enroll { .. }, Capture, Long) => (
            if p.has_classifier {
                State::Screen
            } else {
                State::Idle
            },
            Action::None,
        ),
        (State::Synthesize, _, _) => (State::Synthesize, Action::None),
        (State::Screen, Capture, Short) => (State::Screen, Action::CaptureScreen),
        (State::Screen, Capture, Long) => {
            (p.enroll_at(p.next_incomplete(0).unwrap_or(0)), Action::None)
        }
        (State::Screen, Next, Long) => (State::Synthesize, Action::None),
        (State::Screen, Next, Short) => (State::Screen, Action::None),
    }
}

/// State after a support shot for `class` was stored.
pub fn after_shot(class: usize, p: &Progress) -> State {
    if p.shots[class] < p.per_class {
        return p.enroll_at(class);
    }
    match p.next_incomplete(class + 1) {
        Some(c) => p.enroll_at(c),
        None => State::Synthesize,
    }
}

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
    pub decisions: Vec<Decision>,
    pub classifier_id: Option<String>,
    pub final_state: Option<State>,
    /// SHA-256 of the audit log's last record when the loop ended (the chain's head).
    pub audit_head: Option<[u8; 32]>,
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

/// Camera attempts per button press before giving up (transient errors only).
const CAPTURE_ATTEMPTS: usize = 4;

/// The device: hardware, store, pipeline and the state machine.
pub struct Device<'p> {
    pub profile: BoardProfile,
    pub task: TaskFile,
    pipeline: &'p Pipeline,
    camera: Box<dyn Camera>,
    leds: Box<dyn StatusLeds>,
    store: Store,
    audit: AuditLog,
    classes: Vec<ClassRecord>,
    classifier: Option<Classifier>,
    state: State,
    summary: Summary,
    console: Option<Box<dyn std::io::BufRead>>,
    asked: Vec<bool>,
    /// SHA-256 of the task file's content this device's task started from.
    task_source_sha256: [u8; 32],
    last_capture: Option<LastCapture>,
    last_decision: Option<ShownDecision>,
    /// The last error or warning shown to the person.
    message: Option<String>,
    thumbs_saved: usize,
}

/// Thumbnails saved between two prunings of the thumbnail directory.
const PRUNE_EVERY: usize = 50;

impl<'p> Device<'p> {
    /// Open the store and restore the task's support sets and the active classifier.
    pub fn new(
        profile: BoardProfile,
        task: TaskFile,
        pipeline: &'p Pipeline,
        camera: Box<dyn Camera>,
        leds: Box<dyn StatusLeds>,
    ) -> Result<Device<'p>> {
        let store = Store::open(&profile.storage_dir)
            .with_context(|| format!("opening storage {}", profile.storage_dir.display()))?;
        let (audit, rep) = store.open_audit()?;
        let audit = audit
            .with_segment_bytes(profile.audit.segment_kib * 1024)
            .with_max_bytes(profile.audit.max_mib * 1024 * 1024);
        log::info!(
            "audit log {}: {} records, {} damaged, {} torn bytes cut",
            audit.path().display(),
            rep.records,
            rep.damaged.len(),
            rep.torn_tail_bytes
        );
        let task_source_sha256 = task.sha256();
        let task = match store.task() {
            Ok(Some(r)) if r.source_sha256 == task_source_sha256 => {
                log::info!(
                    "task {}: as edited on the device ({} classes)",
                    r.task.name,
                    r.task.classes.len()
                );
                r.task
            }
            Ok(Some(r)) => {
                log::warn!(
                    "the task file changed since task {} was edited on the device: the task file wins",
                    r.task.name
                );
                task
            }
            Ok(None) => task,
            Err(e) => {
                log::warn!("{e}; using the task file");
                task
            }
        };
        let (stored, bad) = store.load_classes();
        for e in bad {
            log::warn!("{e}");
        }
        let enc = pipeline.encoder_sha256().to_owned();
        let mut classes = Vec::new();
        for tc in &task.classes {
            let mut rec = stored
                .iter()
                .find(|r| r.name.as_str() == tc.name)
                .cloned()
                .unwrap_or(ClassRecord {
                    name: store::label(&tc.name)?,
                    description: None,
                    urgent: false,
                    encoder_sha256: enc.clone(),
                    shots: Vec::new(),
                });
            if rec.encoder_sha256 != enc && !rec.shots.is_empty() {
                log::warn!(
                    "class {}: {} stored shots were embedded by another image encoder; they are dropped, re-enroll",
                    tc.name,
                    rec.shots.len()
                );
                rec.shots.clear();
                rec.encoder_sha256 = enc.clone();
            }
            // the task file's description wins; one typed on the console earlier is kept otherwise
            if tc.description.is_some() {
                rec.description = tc.description.clone();
            }
            rec.urgent = tc.urgent;
            classes.push(rec);
        }
        let mut dev = Device {
            profile,
            task,
            pipeline,
            camera,
            leds,
            store,
            audit,
            classes,
            classifier: None,
            state: State::Idle,
            summary: Summary::default(),
            console: None,
            asked: Vec::new(),
            task_source_sha256,
            last_capture: None,
            last_decision: None,
            message: None,
            thumbs_saved: 0,
        };
        dev.asked = vec![false; dev.classes.len()];
        dev.classifier = dev.restore_classifier();
        dev.leds.show(Indication::Off)?;
        let stale = dev.classifier.as_ref().is_some_and(|c| {
            c.classes
                .iter()
                .zip(&dev.classes)
                .any(|(a, b)| a.description != b.description)
                || c.shots
                    .iter()
                    .zip(&dev.classes)
                    .any(|(&k, b)| k as usize != b.shots.len())
        });
        if let Some(c) = &dev.classifier {
            dev.summary.classifier_id = Some(c.id.clone());
            dev.set_state(State::Screen);
        } else {
            dev.set_state(State::Idle);
        }
        if stale {
            // descriptions in the task file or the stored shots changed since the classifier was
            // made (e.g. power was lost between storing a shot and synthesizing)
            log::info!(
                "the stored support set differs from the active classifier's: re-synthesizing"
            );
            dev.set_state(State::Synthesize);
            dev.synthesize()?;
        }
        Ok(dev)
    }

    fn restore_classifier(&self) -> Option<Classifier> {
        let active = match self.store.active() {
            Ok(Some(a)) => a,
            Ok(None) => return None,
            Err(e) => {
                log::warn!("{e}");
                return None;
            }
        };
        let path = self.store.classifier_dir().join(&active.file);
        match self.pipeline.load_classifier(&path) {
            Ok(c) => {
                let names: Vec<&str> = self.task.classes.iter().map(|c| c.name.as_str()).collect();
                if c.class_names() == names {
                    log::info!("restored classifier {} ({} classes)", c.id, names.len());
                    Some(c)
                } else {
                    log::info!(
                        "stored classifier {} is for classes {:?}, the task has {:?}: enrollment needed",
                        c.id,
                        c.class_names(),
                        names
                    );
                    None
                }
            }
            Err(e) => {
                log::warn!("stored classifier not usable: {e}");
                None
            }
        }
    }

    fn progress(&self) -> Progress {
        Progress {
            shots: self.classes.iter().map(|c| c.shots.len()).collect(),
            per_class: self.profile.shots_per_class,
            has_classifier: self.classifier.is_some(),
        }
    }

    fn set_state(&mut self, s: State) {
        if s != self.state || matches!(s, State::Enroll { .. }) {
            match s {
                State::Enroll { class, shot } => log::info!(
                    "state {:?} -> Enroll: class {} ({}/{}), shot {}/{}",
                    self.state,
                    self.task.classes[class].name,
                    class + 1,
                    self.task.classes.len(),
                    shot + 1,
                    self.profile.shots_per_class
                ),
                _ => log::info!("state {:?} -> {s:?}", self.state),
            }
        }
        self.state = s;
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// Read class descriptions from this console when a class without one is enrolled.
    pub fn with_console(mut self, console: Box<dyn std::io::BufRead>) -> Self {
        self.console = Some(console);
        self
    }

    fn ask_description(&mut self) -> Result<()> {
        let State::Enroll { class, .. } = self.state else {
            return Ok(());
        };
        if self.classes[class].description.is_some() || self.asked[class] {
            return Ok(());
        }
        let Some(console) = self.console.as_mut() else {
            return Ok(());
        };
        self.asked[class] = true;
        let name = self.task.classes[class].name.clone();
        print!("Clinical description of class {name} (Enter = none): ");
        std::io::Write::flush(&mut std::io::stdout())?;
        let mut line = String::new();
        console
            .read_line(&mut line)
            .context("reading a description from the console")?;
        let text = line.trim();
        if text.is_empty() {
            log::info!("class {name}: no description");
            return Ok(());
        }
        let mut rec = self.classes[class].clone();
        rec.description = Some(text.to_owned());
        self.store.save_class(&rec)?;
        self.classes[class] = rec;
        log::info!("class {name}: description entered on the console");
        Ok(())
    }

    pub fn classifier(&self) -> Option<&Classifier> {
        self.classifier.as_ref()
    }

    /// Handle one button event (and run synthesis when the machine enters that state).
    pub fn handle(&mut self, ev: ButtonEvent) -> Result<()> {
        log::debug!("button {:?} {:?} in {:?}", ev.button, ev.press, self.state);
        let (next, action) = transition(self.state, ev, &self.progress());
        self.set_state(next);
        let mut r = match action {
            Action::None => self.ask_description(),
            Action::CaptureShot { class } => self
                .ask_description()
                .and_then(|()| self.enroll_shot(class)),
            Action::CaptureScreen => self.screen(),
        };
        if r.is_ok() && self.state == State::Synthesize {
            r = self.synthesize();
        }
        if r.is_ok() {
            r = self.ask_description();
        }
        match r {
            Err(e) if is_no_space(&e) => {
                // keep running: everything stored before is intact; the operator must free space
                self.summary.storage_errors += 1;
                log::error!("{e:#}");
                self.message = Some(format!("{e:#}"));
                println!("ERROR {e:#}");
                self.leds.show(Indication::Amber)?;
                if self.state == State::Synthesize {
                    let back = if self.classifier.is_some() {
                        State::Screen
                    } else {
                        State::Idle
                    };
                    self.set_state(back);
                }
                Ok(())
            }
            other => other,
        }
    }

    /// Capture a frame with retries on transient camera errors; `None` when no frame came.
    fn capture(&mut self) -> Result<Option<RgbImage>> {
        for attempt in 1..=CAPTURE_ATTEMPTS {
            match self.camera.capture() {
                Ok(img) => return Ok(Some(img)),
                Err(e @ CameraError::Exhausted { .. }) => return Err(e.into()),
                Err(e) if e.is_transient() => {
                    self.summary.camera_errors += 1;
                    log::warn!("capture attempt {attempt}/{CAPTURE_ATTEMPTS}: {e}");
                }
                Err(e) => return Err(e.into()),
            }
        }
        log::error!(
            "no frame from {} after {CAPTURE_ATTEMPTS} attempts; press capture again",
            self.camera.describe()
        );
        self.leds.show(Indication::Amber)?;
        Ok(None)
    }

    /// Capture and gate; `None` when rejected (reason logged and audited).
    fn gated_capture(&mut self) -> Result<Option<(RgbImage, [u8; 32], quality::QualityMetrics)>> {
        let Some(img) = self.capture()? else {
            return Ok(None);
        };
        let sha = store::capture_sha256(&img);
        match quality::check(&img, &self.profile.gate) {
            Ok(m) => Ok(Some((img, sha, m))),
            Err(r) => {
                self.summary.rejected += 1;
                log::warn!("{r}");
                println!("REJECTED {}: {}", r.reason.as_str(), r.message);
                self.audit.append(AuditEvent::Rejected {
                    capture_sha256: sha,
                    reason: r.to_string(),
                })?;
                self.save_thumbnail(&sha, &img);
                self.last_capture = Some(LastCapture {
                    capture_sha256: hex::encode(sha),
                    kind: "rejected",
                    class: None,
                    reason: Some(r.message.clone()),
                    time_unix_ms: store::audit::now_unix_ms(),
                });
                self.leds.show(Indication::Amber)?;
                Ok(None)
            }
        }
    }

    /// Keep a small JPEG of a capture for the screen and reports; a failure is only logged (the
    /// audit log holds the capture's SHA-256, which is the evidence).
    fn save_thumbnail(&mut self, sha: &[u8; 32], img: &RgbImage) {
        if let Err(e) = self.store.save_thumbnail(sha, img) {
            log::warn!("thumbnail not stored: {e}");
            return;
        }
        self.thumbs_saved += 1;
        if self.thumbs_saved.is_multiple_of(PRUNE_EVERY) {
            let keep: Vec<[u8; 32]> = self
                .classes
                .iter()
                .flat_map(|c| c.shots.iter().map(|s| s.capture_sha256))
                .collect();
            match self.store.prune_thumbnails(&keep) {
                Ok(0) => {}
                Ok(n) => log::info!("deleted the {n} oldest decision thumbnails"),
                Err(e) => log::warn!("pruning thumbnails: {e}"),
            }
        }
    }

    fn enroll_shot(&mut self, class: usize) -> Result<()> {
        let max = self.pipeline.manifest().synthesizer.max_shots;
        if self.classes[class].shots.len() >= max {
            log::warn!(
                "class {} already has {max} shots (the synthesizer's maximum)",
                self.task.classes[class].name
            );
            self.leds.show(Indication::Amber)?;
            return Ok(());
        }
        let Some((img, sha, metrics)) = self.gated_capture()? else {
            return Ok(());
        };
        let embedding = self
            .pipeline
            .embed_images(std::slice::from_ref(&img))?
            .remove(0);
        let mut rec = self.classes[class].clone();
        rec.shots.push(ShotRecord {
            capture_sha256: sha,
            time_unix_ms: store::audit::now_unix_ms(),
            width: img.width(),
            height: img.height(),
            quality: metrics,
            embedding,
        });
        self.store.save_class(&rec)?;
        let shot = rec.shots.len();
        self.classes[class] = rec;
        self.summary.shots_enrolled += 1;
        self.audit.append(AuditEvent::Enrolled {
            class: self.task.classes[class].name.clone(),
            shot: shot as u16,
            capture_sha256: sha,
        })?;
        println!("ENROLLED {} shot {shot}", self.task.classes[class].name);
        self.save_thumbnail(&sha, &img);
        self.last_capture = Some(LastCapture {
            capture_sha256: hex::encode(sha),
            kind: "shot",
            class: Some(self.task.classes[class].name.clone()),
            reason: None,
            time_unix_ms: store::audit::now_unix_ms(),
        });
        self.message = None;
        self.leds.show(Indication::Green)?;
        let next = after_shot(class, &self.progress());
        self.set_state(next);
        Ok(())
    }

    /// Build the synthesizer input from the stored support set (text embedded in one batch,
    /// in task order, exactly like `Pipeline::embed_support`).
    pub fn support(&self) -> Result<Vec<ClassSupport>> {
        support_from_records(self.pipeline, &self.classes)
    }

    fn synthesize(&mut self) -> Result<()> {
        let support = self.support()?;
        let result = self.pipeline.synthesize(&support, SynthMode::ImagesAndText);
        let clf = match result {
            Ok(c) => c,
            Err(e) => {
                log::error!("synthesis failed: {e}");
                self.leds.show(Indication::Amber)?;
                let back = match self.progress().next_incomplete(0) {
                    Some(c) => self.progress().enroll_at(c),
                    None if self.classifier.is_some() => State::Screen,
                    None => State::Idle,
                };
                self.set_state(back);
                return Ok(());
            }
        };
        let file = self.store.save_classifier(&clf)?;
        let mut names = heapless::Vec::new();
        for c in &self.classes {
            names
                .push(c.name.clone())
                .map_err(|_| anyhow!("too many classes"))?;
        }
        self.store.set_active(&ActiveRecord {
            classifier_id: clf.id.clone(),
            file,
            encoder_sha256: clf.encoder_sha256.clone(),
            classes: names,
            created_unix_ms: store::audit::now_unix_ms(),
        })?;
        self.audit.append(AuditEvent::Synthesized {
            classifier_id: clf.id.clone(),
            classes: self.task.classes.iter().map(|c| c.name.clone()).collect(),
            shots: self.classes.iter().map(|c| c.shots.len() as u16).collect(),
        })?;
        println!(
            "SYNTHESIZED classifier {} ({} classes)",
            clf.id,
            clf.num_classes()
        );
        self.summary.syntheses += 1;
        self.summary.classifier_id = Some(clf.id.clone());
        self.classifier = Some(clf);
        self.leds.show(Indication::Off)?;
        self.set_state(State::Screen);
        Ok(())
    }

    fn screen(&mut self) -> Result<()> {
        let Some(clf) = &self.classifier else {
            bail!("screening without a classifier (state machine bug)");
        };
        let clf_id = clf.id.clone();
        let Some((img, sha, _)) = self.gated_capture()? else {
            return Ok(());
        };
        let emb = self
            .pipeline
            .embed_images(std::slice::from_ref(&img))?
            .remove(0);
        let clf = self.classifier.as_ref().expect("checked above");
        let pred = clf.predict(&emb);
        let threshold = clf.refer_threshold;
        let v = verdict(&pred, &self.task);
        // audit first: a decision that cannot be recorded is not shown as a result
        let seq = self.audit.append(AuditEvent::Decision {
            capture_sha256: sha,
            classifier_id: clf_id.clone(),
            probabilities: pred.probabilities.clone(),
            top: pred.top as u16,
            label: pred.top_label.clone(),
            verdict: v,
        })?;
        self.leds.show(indication(v))?;
        self.save_thumbnail(&sha, &img);
        let now = store::audit::now_unix_ms();
        self.last_capture = Some(LastCapture {
            capture_sha256: hex::encode(sha),
            kind: "decision",
            class: None,
            reason: None,
            time_unix_ms: now,
        });
        self.last_decision = Some(ShownDecision {
            seq,
            capture_sha256: hex::encode(sha),
            classifier_id: clf_id,
            label: pred.top_label.clone(),
            top: pred.top,
            confidence: pred.confidence,
            probabilities: pred.probabilities.clone(),
            verdict: v.as_str(),
            refer_reason: pred.refer.then(|| {
                format!(
                    "the most likely class, {}, has probability {:.2}, below this classifier's threshold {:.2}: the device is not sure, a specialist should look",
                    pred.top_label, pred.confidence, threshold
                )
            }),
            time_unix_ms: now,
        });
        self.message = None;
        println!(
            "DECISION #{seq} {} p={:.3} verdict={} capture={}",
            pred.top_label,
            pred.confidence,
            v.as_str(),
            hex::encode(&sha[..8])
        );
        log::info!(
            "decision: {} (p = {:.3}) -> {}",
            pred.top_label,
            pred.confidence,
            v.as_str()
        );
        self.summary.decisions.push(Decision {
            capture_sha256: sha,
            prediction: pred,
            verdict: v,
        });
        Ok(())
    }

    /// Run until the button input ends.
    pub fn run(mut self, buttons: &mut dyn ButtonInput) -> Result<Summary> {
        self.audit.append(AuditEvent::Note(format!(
            "start: board {}, task {}",
            self.profile.name, self.task.name
        )))?;
        while let Some(ev) = buttons.next_event()? {
            self.handle(ev)?;
        }
        log::info!("button input ended in state {:?}", self.state);
        self.summary.final_state = Some(self.state);
        self.summary.audit_head = Some(self.audit.head_sha256());
        Ok(self.summary)
    }
}

/// What the device loop reacts to when buttons and the screen share it.
pub enum Input {
    Button(ButtonEvent),
    /// The button input ended (the end of a sim board's script).
    ButtonsEnded,
    /// Reading the buttons failed.
    ButtonError(crate::gpio::GpioError),
    /// A request from the screen, answered with the state after it or why it was refused.
    Request(Command, mpsc::Sender<Result<Snapshot, String>>),
}

impl Device<'_> {
    /// Run on merged inputs (buttons read on another thread, screen requests) until the
    /// channel closes or, with `end_with_buttons`, the button input ends. `publish` sees the
    /// state after start-up and after every input.
    pub fn run_inputs(
        mut self,
        inputs: mpsc::Receiver<Input>,
        end_with_buttons: bool,
        publish: &dyn Fn(&Snapshot),
    ) -> Result<Summary> {
        self.audit.append(AuditEvent::Note(format!(
            "start: board {}, task {}",
            self.profile.name, self.task.name
        )))?;
        publish(&self.snapshot());
        while let Ok(input) = inputs.recv() {
            match input {
                Input::Button(ev) => self.handle(ev)?,
                Input::ButtonsEnded if end_with_buttons => break,
                Input::ButtonsEnded => log::info!("button input ended; the screen stays served"),
                Input::ButtonError(e) => return Err(e.into()),
                Input::Request(cmd, reply) => {
                    let press = matches!(cmd, Command::Button(_));
                    match self.command(cmd) {
                        Ok(()) => {
                            let _ = reply.send(Ok(self.snapshot()));
                        }
                        // a tap on capture fails as the button does (the service restarts)
                        Err(e) if press => {
                            let _ = reply.send(Err(format!("{e:#}")));
                            return Err(e);
                        }
                        Err(e) => {
                            log::warn!("screen request refused: {e:#}");
                            let _ = reply.send(Err(format!("{e:#}")));
                        }
                    }
                }
            }
            publish(&self.snapshot());
        }
        log::info!("device loop ended in state {:?}", self.state);
        self.summary.final_state = Some(self.state);
        self.summary.audit_head = Some(self.audit.head_sha256());
        Ok(self.summary)
    }
}

/// Read buttons on their own thread into the device's input channel.
pub fn forward_buttons(
    mut buttons: Box<dyn ButtonInput + Send>,
    tx: mpsc::Sender<Input>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        loop {
            let msg = match buttons.next_event() {
                Ok(Some(ev)) => Input::Button(ev),
                Ok(None) => Input::ButtonsEnded,
                Err(e) => Input::ButtonError(e),
            };
            let last = !matches!(msg, Input::Button(_));
            if tx.send(msg).is_err() || last {
                return;
            }
        }
    })
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

/// Synthesizer input from stored class records: shots as stored, descriptions embedded in one
/// batch in class order.
pub fn support_from_records(
    pipeline: &Pipeline,
    classes: &[ClassRecord],
) -> Result<Vec<ClassSupport>> {
    let mut out: Vec<ClassSupport> = classes
        .iter()
        .map(|c| ClassSupport {
            name: c.name.to_string(),
            description: c.description.clone(),
            text_embedding: None,
            shots: c.shots.iter().map(|s| s.embedding.clone()).collect(),
        })
        .collect();
    pipeline.embed_descriptions(&mut out)?;
    Ok(out)
}

/// Build the camera a profile describes.
pub fn open_camera(profile: &BoardProfile) -> Result<Box<dyn Camera>> {
    match &profile.camera {
        CameraConfig::Replay {
            dir,
            looping,
            timeout_ms,
            faults,
        } => {
            let faults = faults
                .iter()
                .map(|f| Fault::parse(f).map_err(|e| anyhow!(e)))
                .collect::<Result<Vec<_>>>()?;
            let cam = ReplayCamera::open(dir, *looping, Duration::from_millis(*timeout_ms))?
                .with_faults(faults);
            log::info!(
                "replay camera: {} frames from {}",
                cam.frames().len(),
                dir.display()
            );
            Ok(Box::new(cam))
        }
        #[cfg(all(feature = "v4l2", target_os = "linux"))]
        CameraConfig::V4l2 {
            device,
            format,
            width,
            height,
            timeout_ms,
        } => {
            use crate::camera::v4l2::{PixelFormat, V4l2Camera};
            let fmt = PixelFormat::parse(format).map_err(|e| anyhow!(e))?;
            Ok(Box::new(V4l2Camera::new(
                device,
                fmt,
                *width,
                *height,
                Duration::from_millis(*timeout_ms),
            )))
        }
        #[cfg(not(all(feature = "v4l2", target_os = "linux")))]
        CameraConfig::V4l2 { .. } => {
            bail!(
                "this sgps was built without the `v4l2` feature (or not for Linux); rebuild with --features v4l2"
            )
        }
    }
}

/// Build buttons and LEDs; a sim board needs a script.
pub fn open_gpio(
    profile: &BoardProfile,
    script: Option<&Path>,
) -> Result<(Box<dyn ButtonInput + Send>, Box<dyn StatusLeds>)> {
    match &profile.gpio {
        GpioConfig::Sim { timing } => {
            let Some(path) = script else {
                if profile.ui.is_some() {
                    log::info!("board {}: no button script, the screen only", profile.name);
                    let none = SimButtons::from_script("", "(none)", *timing)?;
                    return Ok((Box::new(none), Box::new(SimLeds::default())));
                }
                bail!(
                    "board {} has simulated buttons: pass --script FILE (lines like `press capture`, `long next`, `wait 100`)",
                    profile.name
                )
            };
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading button script {}", path.display()))?;
            let b = SimButtons::from_script(&text, &path.display().to_string(), *timing)?;
            log::info!(
                "button script {}: {} presses",
                path.display(),
                b.remaining()
            );
            Ok((Box::new(b), Box::new(SimLeds::default())))
        }
        #[cfg(target_os = "linux")]
        GpioConfig::Cdev {
            chip,
            capture_line,
            next_line,
            green_line,
            amber_line,
            red_line,
            buttons_active_low,
            leds_active_low,
            timing,
        } => {
            if script.is_some() {
                log::warn!(
                    "--script is ignored: board {} has real buttons",
                    profile.name
                );
            }
            let b = crate::gpio::linux::open_buttons(
                chip,
                *capture_line,
                *next_line,
                *buttons_active_low,
                *timing,
            )?;
            let l = crate::gpio::linux::open_leds(
                chip,
                *green_line,
                *amber_line,
                *red_line,
                *leds_active_low,
            )?;
            Ok((Box::new(b), Box::new(l)))
        }
        #[cfg(not(target_os = "linux"))]
        GpioConfig::Cdev { .. } => bail!("character-device GPIO needs Linux"),
    }
}

/// `sgps run` from the command line: global flags given explicitly (`--models`, `--threads`,
/// variants) override the board profile; otherwise the profile decides.
pub fn run_cli(
    args: &RunArgs,
    models: Option<&Path>,
    opts: &LoadOptions,
) -> Result<std::process::ExitCode> {
    let mut a = args.clone();
    a.models_dir = models.map(Path::to_path_buf).or(a.models_dir);
    a.threads = opts.threads.or(a.threads);
    a.image_variant = opts.image_variant.clone().or(a.image_variant);
    a.text_variant = opts.text_variant.clone().or(a.text_variant);
    run(&a).map(|_| std::process::ExitCode::SUCCESS)
}

/// `sgps run`: load the profile, the task, the pipeline and the hardware, then run the loop.
pub fn run(args: &RunArgs) -> Result<Summary> {
    let mut profile = BoardProfile::load(&args.board)?;
    if let Some(d) = &args.storage_dir {
        profile.storage_dir = d.clone();
    }
    if let Some(d) = &args.models_dir {
        profile.models_dir = d.clone();
    }
    if let Some(t) = args.threads {
        profile.threads = Some(t);
    }
    if let Some(v) = &args.image_variant {
        profile.image_variant = Some(v.clone());
    }
    if let Some(v) = &args.text_variant {
        profile.text_variant = Some(v.clone());
    }
    if let Some(d) = &args.replay_dir {
        match &mut profile.camera {
            CameraConfig::Replay { dir, .. } => *dir = d.clone(),
            CameraConfig::V4l2 { .. } => {
                bail!("--replay-dir needs a board with a replay camera (e.g. board/sim.toml)")
            }
        }
    }
    log::info!(
        "board {} ({}), storage {}",
        profile.name,
        args.board.display(),
        profile.storage_dir.display()
    );
    let task = profile.load_task()?;
    let pipeline = Pipeline::load(
        &profile.models_dir,
        &LoadOptions {
            image_variant: profile.image_variant.clone(),
            text_variant: profile.text_variant.clone(),
            threads: profile.threads,
        },
    )
    .with_context(|| format!("loading models from {}", profile.models_dir.display()))?;
    let ui = match args.ui.as_deref() {
        Some("off") => None,
        Some(addr) => {
            let mut c = profile.ui.clone().unwrap_or_default();
            c.listen = addr.to_owned();
            c.validate().map_err(|e| anyhow!("--ui {addr}: {e}"))?;
            Some(c)
        }
        None => profile.ui.clone(),
    };
    if ui.is_none() && matches!(profile.gpio, GpioConfig::Sim { .. }) && args.script.is_none() {
        bail!(
            "board {} has simulated buttons and no screen: pass --script FILE (lines like `press capture`, `long next`, `wait 100`) or serve the screen with --ui 127.0.0.1:8080",
            profile.name
        );
    }
    profile.ui = ui.clone();
    let camera = open_camera(&profile)?;
    let (buttons, leds) = open_gpio(&profile, args.script.as_deref())?;
    let info = crate::ui::DeviceInfo {
        board: profile.name.clone(),
        sgps_version: env!("CARGO_PKG_VERSION"),
        models_dir: profile.models_dir.display().to_string(),
        image_encoder: format!("variant {}", pipeline.image_encoder().variant),
        image_encoder_sha256: pipeline.encoder_sha256().to_owned(),
        text_encoder: format!(
            "variant {}, SHA-256 {}",
            pipeline.text_encoder().variant,
            pipeline.text_encoder().sha256
        ),
        synthesizer_sha256: pipeline.manifest().synthesizer.sha256.clone(),
        storage_dir: profile.storage_dir.display().to_string(),
    };
    let storage_dir = profile.storage_dir.clone();
    let mut dev = Device::new(profile, task, &pipeline, camera, leds)?;
    if args.console {
        dev = dev.with_console(Box::new(std::io::BufReader::new(std::io::stdin())));
    }
    let summary = match ui {
        None => {
            let mut buttons = buttons;
            dev.run(buttons.as_mut())?
        }
        Some(cfg) => {
            let (tx, rx) = mpsc::channel();
            let hub = std::sync::Arc::new(crate::ui::Hub::default());
            hub.publish(&dev.snapshot());
            let ctx = crate::ui::Context {
                inputs: tx.clone(),
                hub: hub.clone(),
                storage_dir,
                export_dir: cfg.export_dir.clone(),
                pairing_token: cfg.pairing_token.clone(),
                info,
            };
            match crate::ui::serve(&cfg, ctx) {
                Ok(s) => {
                    println!(
                        "UI http://{}/ (the clinician's screen; open it in a browser)",
                        s.addr
                    );
                    log::info!("screen served on http://{}/", s.addr);
                }
                // the device still works with its buttons; say so loudly
                Err(e) => {
                    log::error!("the screen is not served: {e}");
                    println!("UI unavailable: {e}");
                }
            }
            forward_buttons(buttons, tx);
            // a scripted session ends with its script; otherwise run until stopped
            dev.run_inputs(rx, args.script.is_some(), &|s| hub.publish(s))?
        }
    };
    println!(
        "SESSION shots={} rejected={} camera_errors={} syntheses={} decisions={} classifier={}",
        summary.shots_enrolled,
        summary.rejected,
        summary.camera_errors,
        summary.syntheses,
        summary.decisions.len(),
        summary.classifier_id.as_deref().unwrap_or("-")
    );
    if let Some(h) = summary.audit_head {
        let h = hex::encode(h);
        println!(
            "AUDIT head sha256 {h} (note it: sgps audit verify --expect-head {h} <storage dir> later shows whether records were removed)"
        );
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(button: Button, press: Press) -> ButtonEvent {
        ButtonEvent { button, press }
    }
    const CAP: ButtonEvent = ButtonEvent {
        button: Button::Capture,
        press: Press::Short,
    };

    fn prog(shots: &[usize], has: bool) -> Progress {
        Progress {
            shots: shots.to_vec(),
            per_class: 2,
            has_classifier: has,
        }
    }

    #[test]
    fn enrollment_walks_classes_then_synthesizes() {
        let p = prog(&[0, 0, 0], false);
        // the first capture press starts enrollment with the first shot
        let (s, a) = transition(State::Idle, CAP, &p);
        assert_eq!(
            (s, a),
            (
                State::Enroll { class: 0, shot: 0 },
                Action::CaptureShot { class: 0 }
            )
        );
        let (s, a) = transition(s, CAP, &p);
        assert_eq!(a, Action::CaptureShot { class: 0 });
        assert_eq!(s, State::Enroll { class: 0, shot: 0 });
        assert_eq!(
            after_shot(0, &prog(&[1, 0, 0], false)),
            State::Enroll { class: 0, shot: 1 }
        );
        assert_eq!(
            after_shot(0, &prog(&[2, 0, 0], false)),
            State::Enroll { class: 1, shot: 0 }
        );
        assert_eq!(
            after_shot(2, &prog(&[2, 1, 2], false)),
            State::Enroll { class: 1, shot: 1 }
        );
        assert_eq!(after_shot(2, &prog(&[2, 2, 2], false)), State::Synthesize);
    }

    #[test]
    fn buttons_in_enroll_and_screen() {
        let p = prog(&[2, 1, 0], true);
        let e = State::Enroll { class: 2, shot: 0 };
        assert_eq!(
            transition(e, ev(Button::Next, Press::Short), &p).0,
            State::Enroll { class: 0, shot: 2 }
        );
        assert_eq!(
            transition(e, ev(Button::Next, Press::Long), &p).0,
            State::Synthesize
        );
        assert_eq!(
            transition(e, ev(Button::Capture, Press::Long), &p).0,
            State::Screen
        );
        assert_eq!(
            transition(
                e,
                ev(Button::Capture, Press::Long),
                &prog(&[0, 0, 0], false)
            )
            .0,
            State::Idle
        );
        assert_eq!(
            transition(State::Screen, CAP, &p),
            (State::Screen, Action::CaptureScreen)
        );
        // long capture in Screen: add shots / classes, starting with the first incomplete class
        assert_eq!(
            transition(State::Screen, ev(Button::Capture, Press::Long), &p).0,
            State::Enroll { class: 1, shot: 1 }
        );
        // long next in Screen re-synthesizes from the stored support set (no capture)
        assert_eq!(
            transition(State::Screen, ev(Button::Next, Press::Long), &p),
            (State::Synthesize, Action::None)
        );
        // Idle: long next synthesizes only with some shots stored
        assert_eq!(
            transition(
                State::Idle,
                ev(Button::Next, Press::Long),
                &prog(&[0, 0], false)
            )
            .0,
            State::Idle
        );
        assert_eq!(
            transition(
                State::Idle,
                ev(Button::Next, Press::Long),
                &prog(&[1, 0], false)
            )
            .0,
            State::Synthesize
        );
    }
}
