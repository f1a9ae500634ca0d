//! What the screen can ask of the device besides button presses: edit the task (add, rename,
//! describe a class, mark it urgent), enroll a chosen class, remove a shot; and the snapshot of
//! the device's state that the screen shows. Every command runs on the device's thread, through
//! the same [`Device`] as the buttons, so a tap and a press see each other's effect at once.

use anyhow::{Result, anyhow, bail};
use serde::Serialize;

use super::{Device, State};
use crate::board::{TaskClass, check_description};
use crate::gpio::ButtonEvent;
use crate::store::{self, AuditEvent, ClassRecord};

/// A request to the device.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// The same as a hardware button.
    Button(ButtonEvent),
    /// Start (or continue) enrolling this class.
    EnrollClass(usize),
    /// Add a class at the end of the task.
    AddClass {
        name: String,
        description: Option<String>,
        urgent: bool,
    },
    /// Change a class: each `Some` field is set (`description: Some(None)` removes it).
    UpdateClass {
        class: usize,
        name: Option<String>,
        description: Option<Option<String>>,
        urgent: Option<bool>,
    },
    /// Remove one support shot of a class.
    /// Remove one support shot of a class; `retake`: then enroll that class again.
    RemoveShot {
        class: usize,
        capture_sha256: [u8; 32],
        retake: bool,
    },
}

/// The outcome of the last capture, for the screen.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LastCapture {
    pub capture_sha256: String,
    /// "shot", "decision" or "rejected".
    pub kind: &'static str,
    /// Class the shot was enrolled for.
    pub class: Option<String>,
    /// Why the quality gate rejected it.
    pub reason: Option<String>,
    pub time_unix_ms: u64,
}

/// A screening decision as shown.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ShownDecision {
    pub seq: u64,
    pub capture_sha256: String,
    pub classifier_id: String,
    pub label: String,
    pub top: usize,
    pub confidence: f32,
    pub probabilities: Vec<f32>,
    pub verdict: &'static str,
    /// Why the device refers (only for REFER).
    pub refer_reason: Option<String>,
    pub time_unix_ms: u64,
}

/// One support shot as shown.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ShownShot {
    pub capture_sha256: String,
    pub time_unix_ms: u64,
    /// Cosine similarity to the mean of the class's shots (how consistent it is).
    pub consistency: Option<f32>,
    /// The shot the support-set advice names as differing from the others.
    pub outlier: bool,
}

/// One class as shown.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ShownClass {
    pub name: String,
    pub description: Option<String>,
    pub urgent: bool,
    pub shots: Vec<ShownShot>,
}

/// What the screen shows; sent after every change.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Snapshot {
    /// "idle", "enroll", "synthesize" or "screen".
    pub state: &'static str,
    pub enroll_class: Option<usize>,
    pub task: String,
    pub shots_per_class: usize,
    pub max_shots: usize,
    pub classes: Vec<ShownClass>,
    pub classifier_id: Option<String>,
    pub refer_threshold: Option<f32>,
    pub last_capture: Option<LastCapture>,
    pub last_decision: Option<ShownDecision>,
    /// Support-set advice: which class needs more or more consistent shots, and why.
    pub advice: Vec<String>,
    /// The last error or warning the device gave (e.g. "storage full").
    pub message: Option<String>,
    pub decisions: usize,
    pub board: String,
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na * nb)
    }
}

fn mean(shots: &[&[f32]]) -> Option<Vec<f32>> {
    let first = shots.first()?;
    let mut m = vec![0.0f32; first.len()];
    for s in shots {
        for (a, b) in m.iter_mut().zip(s.iter()) {
            *a += b / shots.len() as f32;
        }
    }
    Some(m)
}

/// A shot whose cosine to its class mean is below this is called an outlier.
const OUTLIER_COSINE: f32 = 0.75;
/// Two class means closer than this are called easily confused.
const CONFUSABLE_COSINE: f32 = 0.95;

/// The shot of a class (3 or more shots) that stands out: its cosine to the class mean is
/// below [`OUTLIER_COSINE`] and 0.1 below the median of the others'. Returns (index, cosine).
pub fn outlier(embs: &[&[f32]]) -> Option<(usize, f32)> {
    if embs.len() < 3 {
        return None;
    }
    let m = mean(embs)?;
    let cos: Vec<f32> = embs.iter().map(|e| cosine(e, &m)).collect();
    let (worst, &low) = cos.iter().enumerate().min_by(|a, b| a.1.total_cmp(b.1))?;
    let mut rest: Vec<f32> = cos
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != worst)
        .map(|(_, &c)| c)
        .collect();
    rest.sort_by(f32::total_cmp);
    let median = rest[rest.len() / 2];
    (low < OUTLIER_COSINE && low < median - 0.1).then_some((worst, low))
}

/// Support-set advice for classes (task order): missing shots, inconsistent shots, classes the
/// encoder sees as alike.
pub fn advice(classes: &[ClassRecord], per_class: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut means = Vec::new();
    for c in classes {
        let embs: Vec<&[f32]> = c.shots.iter().map(|s| s.embedding.as_slice()).collect();
        if c.shots.len() < per_class {
            out.push(format!(
                "{}: {} of {per_class} shots; capture {} more",
                c.name,
                c.shots.len(),
                per_class - c.shots.len()
            ));
        }
        if let Some((worst, cos)) = outlier(&embs) {
            out.push(format!(
                "{}: shot {} differs from the others (similarity {cos:.2}); remove it or add more typical shots",
                c.name,
                worst + 1
            ));
        }
        let m = mean(&embs);
        means.push(m);
    }
    for i in 0..classes.len() {
        for j in i + 1..classes.len() {
            if let (Some(a), Some(b)) = (&means[i], &means[j]) {
                let c = cosine(a, b);
                if c > CONFUSABLE_COSINE {
                    out.push(format!(
                        "{} and {} look alike to the device (similarity {c:.2}); add shots that show how they differ",
                        classes[i].name, classes[j].name
                    ));
                }
            }
        }
    }
    out
}

impl Device<'_> {
    /// The state as the screen shows it.
    pub fn snapshot(&self) -> Snapshot {
        let classes = self
            .classes
            .iter()
            .zip(&self.task.classes)
            .map(|(r, t)| {
                let embs: Vec<&[f32]> = r.shots.iter().map(|s| s.embedding.as_slice()).collect();
                let m = if embs.len() >= 2 { mean(&embs) } else { None };
                let odd = outlier(&embs).map(|(i, _)| i);
                ShownClass {
                    name: t.name.clone(),
                    description: r.description.clone(),
                    urgent: t.urgent,
                    shots: r
                        .shots
                        .iter()
                        .enumerate()
                        .map(|(k, s)| ShownShot {
                            capture_sha256: hex::encode(s.capture_sha256),
                            time_unix_ms: s.time_unix_ms,
                            consistency: m.as_ref().map(|m| cosine(&s.embedding, m)),
                            outlier: odd == Some(k),
                        })
                        .collect(),
                }
            })
            .collect();
        let (state, enroll_class) = match self.state {
            State::Idle => ("idle", None),
            State::Enroll { class, .. } => ("enroll", Some(class)),
            State::Synthesize => ("synthesize", None),
            State::Screen => ("screen", None),
        };
        Snapshot {
            state,
            enroll_class,
            task: self.task.name.clone(),
            shots_per_class: self.profile.shots_per_class,
            max_shots: self.pipeline.manifest().synthesizer.max_shots,
            classes,
            classifier_id: self.classifier.as_ref().map(|c| c.id.clone()),
            refer_threshold: self.classifier.as_ref().map(|c| c.refer_threshold),
            last_capture: self.last_capture.clone(),
            last_decision: self.last_decision.clone(),
            advice: advice(&self.classes, self.profile.shots_per_class),
            message: self.message.clone(),
            decisions: self.summary.decisions_made,
            board: self.profile.name.clone(),
        }
    }

    /// Run one command (a button press or a screen request). An error is a refusal with a
    /// message for the person (e.g. a class name that is taken); nothing was changed then.
    pub fn command(&mut self, cmd: Command) -> Result<()> {
        match cmd {
            Command::Button(ev) => self.handle(ev),
            Command::EnrollClass(class) => {
                self.check_class(class)?;
                let shot = self.classes[class].shots.len();
                self.set_state(State::Enroll { class, shot });
                Ok(())
            }
            Command::AddClass {
                name,
                description,
                urgent,
            } => {
                let mut task = self.task.clone();
                task.classes.push(TaskClass {
                    name: name.clone(),
                    description: description.filter(|d| !d.trim().is_empty()),
                    urgent,
                });
                let origin = (0..self.classes.len()).map(Some).chain([None]).collect();
                self.edit_task(task, origin, &format!("class {name} added"))?;
                let class = self.classes.len() - 1;
                self.classifier = None;
                self.set_state(State::Enroll { class, shot: 0 });
                Ok(())
            }
            Command::UpdateClass {
                class,
                name,
                description,
                urgent,
            } => {
                self.check_class(class)?;
                let mut task = self.task.clone();
                let old = task.classes[class].name.clone();
                let mut what = Vec::new();
                let mut resynth = false;
                if let Some(n) = name
                    && n != old
                {
                    what.push(format!("renamed to {n}"));
                    task.classes[class].name = n;
                    resynth = true;
                }
                if let Some(d) = description {
                    let d = d.filter(|d| !d.trim().is_empty());
                    if let Some(d) = &d {
                        check_description(d).map_err(|e| anyhow!(e))?;
                    }
                    if d != task.classes[class].description {
                        what.push("description changed".to_string());
                        resynth = true;
                    }
                    task.classes[class].description = d;
                }
                if let Some(u) = urgent
                    && u != task.classes[class].urgent
                {
                    what.push(format!("urgent = {u}"));
                    task.classes[class].urgent = u;
                }
                if what.is_empty() {
                    return Ok(());
                }
                let origin = (0..self.classes.len()).map(Some).collect();
                self.edit_task(task, origin, &format!("class {old}: {}", what.join(", ")))?;
                if resynth {
                    self.after_support_change()?;
                }
                Ok(())
            }
            Command::RemoveShot {
                class,
                capture_sha256,
                retake,
            } => {
                self.check_class(class)?;
                let mut rec = self.classes[class].clone();
                let before = rec.shots.len();
                rec.shots.retain(|s| s.capture_sha256 != capture_sha256);
                if rec.shots.len() == before {
                    bail!(
                        "class {} has no shot {}; reload the page",
                        rec.name,
                        hex::encode(capture_sha256)
                    );
                }
                self.store.save_class(&rec)?;
                let name = rec.name.to_string();
                let shot = rec.shots.len();
                self.classes[class] = rec;
                self.audit.append(AuditEvent::Note(format!(
                    "task: class {name}: shot {} removed{}",
                    hex::encode(capture_sha256),
                    if retake { " (retake)" } else { "" }
                )))?;
                if retake {
                    // the classifier no longer matches; the next shot (and synthesis) follows
                    self.classifier = None;
                    self.set_state(State::Enroll { class, shot });
                    Ok(())
                } else {
                    self.after_support_change()
                }
            }
        }
    }

    fn check_class(&self, class: usize) -> Result<()> {
        if class >= self.classes.len() {
            bail!(
                "there is no class {class} (the task has {}); reload the page",
                self.classes.len()
            );
        }
        Ok(())
    }

    /// Replace the task after an edit on the device: validate, store the class records and the
    /// task, audit it. `origin[i]` is the index in the current task that new class `i` comes
    /// from (its shots are kept), `None` for a new class.
    fn edit_task(
        &mut self,
        task: crate::board::TaskFile,
        origin: Vec<Option<usize>>,
        what: &str,
    ) -> Result<()> {
        task.validate().map_err(|e| anyhow!(e))?;
        let enc = self.pipeline.encoder_sha256().to_owned();
        let mut classes = Vec::with_capacity(task.classes.len());
        for (tc, from) in task.classes.iter().zip(&origin) {
            let mut rec = match from {
                Some(i) => self.classes[*i].clone(),
                None => ClassRecord {
                    name: store::label(&tc.name)?,
                    description: None,
                    urgent: false,
                    encoder_sha256: enc.clone(),
                    shots: Vec::new(),
                },
            };
            rec.name = store::label(&tc.name)?;
            rec.description = tc.description.clone();
            rec.urgent = tc.urgent;
            classes.push(rec);
        }
        for rec in &classes {
            if !self.classes.contains(rec) {
                self.store.save_class(rec)?;
            }
        }
        self.store.save_task(&store::TaskRecord {
            source_sha256: self.task_source_sha256,
            task: task.clone(),
        })?;
        // the record of a renamed class goes only once the new one and the task are stored
        for old in &self.task.classes {
            if !task.classes.iter().any(|t| t.name == old.name) {
                self.store.remove_class(&old.name)?;
            }
        }
        self.task = task;
        self.classes = classes;
        self.asked = vec![false; self.classes.len()];
        self.audit
            .append(AuditEvent::Note(format!("task: {what}")))?;
        log::info!("task edited on the device: {what}");
        Ok(())
    }

    /// After a support set, a name or a description changed outside enrollment: re-synthesize
    /// when every class has shots (the old classifier no longer matches), otherwise enroll the
    /// first class without shots.
    fn after_support_change(&mut self) -> Result<()> {
        let p = self.progress();
        if matches!(self.state, State::Enroll { .. }) {
            // enrolling: synthesis follows the last shot, or a long press of next
            self.classifier = None;
            return Ok(());
        }
        match p.shots.iter().position(|&s| s == 0) {
            None => {
                self.set_state(State::Synthesize);
                self.synthesize()
            }
            Some(c) => {
                self.classifier = None;
                self.set_state(p.enroll_at(c));
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quality::QualityMetrics;
    use crate::store::ShotRecord;

    fn class(name: &str, embs: &[[f32; 3]]) -> ClassRecord {
        ClassRecord {
            name: store::label(name).unwrap(),
            description: None,
            urgent: false,
            encoder_sha256: String::new(),
            shots: embs
                .iter()
                .map(|e| ShotRecord {
                    capture_sha256: [0; 32],
                    time_unix_ms: 0,
                    width: 1,
                    height: 1,
                    quality: QualityMetrics::default(),
                    embedding: e.to_vec(),
                })
                .collect(),
        }
    }

    #[test]
    fn advice_names_missing_outlying_and_confusable_classes() {
        let a = class("a", &[[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 0.0, 1.0]]);
        let b = class("b", &[[0.0, 1.0, 0.0]]);
        let c = class("c", &[[0.05, 1.0, 0.0], [0.0, 1.0, 0.05]]);
        let adv = advice(&[a, b, c], 3);
        assert!(
            adv.iter().any(|s| s.starts_with("b: 1 of 3 shots")),
            "{adv:?}"
        );
        assert!(
            adv.iter().any(|s| s.starts_with("a: shot 3 differs")),
            "{adv:?}"
        );
        assert!(
            adv.iter().any(|s| s.starts_with("b and c look alike")),
            "{adv:?}"
        );
        assert!(!adv.iter().any(|s| s.starts_with("a: 3 of")), "{adv:?}");
        let good = class("g", &[[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.95, 0.0, 0.1]]);
        let other = class("h", &[[0.0, 1.0, 0.0], [0.0, 0.9, 0.1], [0.1, 0.9, 0.0]]);
        assert!(advice(&[good, other], 3).is_empty());
    }
}
