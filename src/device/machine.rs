//! The device's state machine: a pure function of (state, button event, stored progress).

#[allow(unused_imports)]
use super::*;

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

    pub(super) fn enroll_at(&self, class: usize) -> State {
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
