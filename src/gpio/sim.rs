//! Simulated buttons and LEDs for the `sim` board and tests.
//!
//! A button script has one command per line (`#` starts a comment):
//! ```text
//! press capture     # short press of the capture button
//! long capture      # long press
//! press next        # short press of next/confirm
//! long next
//! wait 250          # 250 ms without presses (simulated time)
//! ```
//! Every press is turned into a bouncing pin waveform and run through the real [`Debouncer`]
//! on a simulated clock, so the sim board exercises the same debounce code as the hardware.

use std::cell::Cell;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use super::{
    Button, ButtonEvent, ButtonInput, ButtonTiming, Debouncer, GpioError, Indication, Press,
    StatusLeds,
};

/// An input pin whose level the simulation sets.
#[derive(Clone, Default)]
pub struct SimPin(Rc<Cell<bool>>);

impl SimPin {
    pub fn set(&self, high: bool) {
        self.0.set(high)
    }
}

impl embedded_hal::digital::ErrorType for SimPin {
    type Error = Infallible;
}

impl embedded_hal::digital::InputPin for SimPin {
    fn is_high(&mut self) -> Result<bool, Infallible> {
        Ok(self.0.get())
    }
    fn is_low(&mut self) -> Result<bool, Infallible> {
        Ok(!self.0.get())
    }
}

/// One parsed script command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScriptItem {
    Press(Button, Press),
    Wait(u64),
}

/// Parse a button script; errors name the line.
pub fn parse_script(text: &str, origin: &str) -> Result<Vec<ScriptItem>, GpioError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let err = |reason: String| GpioError::Script {
            path: origin.to_owned(),
            line: i + 1,
            reason,
        };
        let mut w = line.split_whitespace();
        let (cmd, arg) = (w.next().unwrap_or(""), w.next().unwrap_or(""));
        if w.next().is_some() {
            return Err(err(format!("too many words in {line:?}")));
        }
        let item = match cmd {
            "press" | "long" => {
                let b = Button::parse(arg)
                    .ok_or_else(|| err(format!("unknown button {arg:?}: use capture or next")))?;
                ScriptItem::Press(
                    b,
                    if cmd == "press" {
                        Press::Short
                    } else {
                        Press::Long
                    },
                )
            }
            "wait" => ScriptItem::Wait(
                arg.parse()
                    .map_err(|_| err(format!("wait needs milliseconds, got {arg:?}")))?,
            ),
            _ => {
                return Err(err(format!(
                    "unknown command {cmd:?}: use press, long or wait"
                )));
            }
        };
        out.push(item);
    }
    Ok(out)
}

/// Scripted buttons.
pub struct SimButtons {
    events: VecDeque<ButtonEvent>,
}

impl SimButtons {
    /// Turn a script into debounced events by simulating bouncing contacts (1 ms sampling).
    pub fn from_script(
        text: &str,
        origin: &str,
        timing: ButtonTiming,
    ) -> Result<SimButtons, GpioError> {
        let items = parse_script(text, origin)?;
        let cap = SimPin::default();
        let nxt = SimPin::default();
        let mut dc = Debouncer::new(cap.clone(), false, timing);
        let mut dn = Debouncer::new(nxt.clone(), false, timing);
        let mut t = 0u64;
        let mut events = VecDeque::new();
        let mut step = |until: u64, t: &mut u64, out: &mut Vec<ButtonEvent>| {
            while *t < until {
                if let Ok(Some(p)) = dc.update(*t) {
                    out.push(ButtonEvent {
                        button: Button::Capture,
                        press: p,
                    });
                }
                if let Ok(Some(p)) = dn.update(*t) {
                    out.push(ButtonEvent {
                        button: Button::Next,
                        press: p,
                    });
                }
                *t += 1;
            }
        };
        for (n, item) in items.iter().enumerate() {
            let mut got = Vec::new();
            match *item {
                ScriptItem::Wait(ms) => step(t + ms, &mut t, &mut got),
                ScriptItem::Press(b, p) => {
                    let pin = if b == Button::Capture { &cap } else { &nxt };
                    let hold = match p {
                        Press::Short => (timing.long_press_ms / 4).max(timing.debounce_ms * 3),
                        Press::Long => timing.long_press_ms + 4 * timing.debounce_ms,
                    };
                    // bounce on contact: on/off/on 1 ms apart, then held
                    for (lvl, dt) in [(true, 1), (false, 1), (true, hold), (false, 1), (true, 1)] {
                        pin.set(lvl);
                        step(t + dt, &mut t, &mut got);
                    }
                    pin.set(false);
                    step(t + 3 * timing.debounce_ms, &mut t, &mut got);
                    if got
                        != [ButtonEvent {
                            button: b,
                            press: p,
                        }]
                    {
                        return Err(GpioError::Script {
                            path: origin.to_owned(),
                            line: n + 1,
                            reason: format!("simulated press {item:?} debounced to {got:?}"),
                        });
                    }
                }
            }
            events.extend(got);
        }
        Ok(SimButtons { events })
    }

    /// Events from a list (tests).
    pub fn from_events(events: impl IntoIterator<Item = ButtonEvent>) -> SimButtons {
        SimButtons {
            events: events.into_iter().collect(),
        }
    }

    pub fn remaining(&self) -> usize {
        self.events.len()
    }
}

impl ButtonInput for SimButtons {
    fn next_event(&mut self) -> Result<Option<ButtonEvent>, GpioError> {
        Ok(self.events.pop_front())
    }
}

/// LEDs that record and log what they show.
#[derive(Clone, Default)]
pub struct SimLeds {
    pub history: Arc<Mutex<Vec<Indication>>>,
}

impl StatusLeds for SimLeds {
    fn show(&mut self, ind: Indication) -> Result<(), GpioError> {
        log::info!("LED: {ind:?}");
        self.history.lock().expect("LED history lock").push(ind);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_presses_go_through_the_debouncer() {
        let s = "# enroll\npress capture\nlong capture   # hold\nwait 50\npress next\nlong next\n";
        let mut b = SimButtons::from_script(s, "t", ButtonTiming::default()).unwrap();
        let mut got = vec![];
        while let Some(e) = b.next_event().unwrap() {
            got.push((e.button, e.press));
        }
        assert_eq!(
            got,
            vec![
                (Button::Capture, Press::Short),
                (Button::Capture, Press::Long),
                (Button::Next, Press::Short),
                (Button::Next, Press::Long)
            ]
        );
    }

    #[test]
    fn script_errors_name_the_line() {
        let e = SimButtons::from_script(
            "press capture\npress elbow\n",
            "s.txt",
            ButtonTiming::default(),
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("s.txt:2"), "{e}");
        assert!(parse_script("wait soon", "x").is_err());
        assert!(parse_script("jump", "x").is_err());
    }
}
