//! The device: hardware, store, pipeline and the state machine, and what it does on each event.

#[allow(unused_imports)]
use super::*;

/// Camera attempts per button press before giving up (transient errors only).
const CAPTURE_ATTEMPTS: usize = 4;

/// The device: hardware, store, pipeline and the state machine.
pub struct Device<'p> {
    pub profile: BoardProfile,
    pub task: TaskFile,
    pub(super) pipeline: &'p Pipeline,
    pub(super) camera: Box<dyn Camera>,
    pub(super) leds: Box<dyn StatusLeds>,
    pub(super) store: Store,
    pub(super) audit: AuditLog,
    pub(super) classes: Vec<ClassRecord>,
    pub(super) classifier: Option<Classifier>,
    pub(super) state: State,
    pub(super) summary: Summary,
    pub(super) console: Option<Box<dyn std::io::BufRead>>,
    pub(super) asked: Vec<bool>,
    /// SHA-256 of the task file's content this device's task started from.
    pub(super) task_source_sha256: [u8; 32],
    pub(super) last_capture: Option<LastCapture>,
    pub(super) last_decision: Option<ShownDecision>,
    /// The last error or warning shown to the person.
    pub(super) message: Option<String>,
    pub(super) thumbs_saved: usize,
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

    pub(super) fn restore_classifier(&self) -> Option<Classifier> {
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

    pub(super) fn progress(&self) -> Progress {
        Progress {
            shots: self.classes.iter().map(|c| c.shots.len()).collect(),
            per_class: self.profile.shots_per_class,
            has_classifier: self.classifier.is_some(),
        }
    }

    pub(super) fn set_state(&mut self, s: State) {
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

    pub(super) fn ask_description(&mut self) -> Result<()> {
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
    pub(super) fn capture(&mut self) -> Result<Option<RgbImage>> {
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
    pub(super) fn gated_capture(
        &mut self,
    ) -> Result<Option<(RgbImage, [u8; 32], quality::QualityMetrics)>> {
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

    /// Keep a small JPEG of a capture for the screen and reports ([`store::Store::keep_thumbnail`]:
    /// its SHA-256 chained in the audit log first); a failure is only logged (the audit log holds
    /// the capture's SHA-256, which is the evidence).
    pub(super) fn save_thumbnail(&mut self, sha: &[u8; 32], img: &RgbImage) {
        if let Err(e) = self.store.keep_thumbnail(&mut self.audit, sha, img) {
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
            match self.store.prune_thumbnails(&keep, store::MAX_THUMBS) {
                Ok(0) => {}
                Ok(n) => log::info!("deleted the {n} oldest decision thumbnails"),
                Err(e) => log::warn!("pruning thumbnails: {e}"),
            }
        }
    }

    pub(super) fn enroll_shot(&mut self, class: usize) -> Result<()> {
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

    /// The synthesizer input from the stored support set (through `Pipeline::support`).
    pub fn support(&self) -> Result<Vec<ClassSupport>> {
        support_from_records(self.pipeline, &self.classes)
    }

    pub(super) fn synthesize(&mut self) -> Result<()> {
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

    pub(super) fn screen(&mut self) -> Result<()> {
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
        self.summary.record(Decision {
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
