//! Buttons and status LEDs through `embedded-hal` 1.0 digital traits.
//!
//! - [`Debouncer`]: polls an [`InputPin`], accepts a level only after it was stable for
//!   `debounce_ms`, and reports short presses (on release) and long presses (as soon as the
//!   button has been held for `long_ms`).
//! - [`PinLeds`]: green / amber / red LEDs on three [`OutputPin`]s, exactly one lit at a time.
//! - [`sim`]: scripted buttons (driven through the same debouncer on a simulated clock) and
//!   recording LEDs; [`linux`]: character-device GPIO through `linux-embedded-hal`.

#[cfg(target_os = "linux")]
pub mod linux;
pub mod sim;

use embedded_hal::digital::{InputPin, OutputPin};
use serde::{Deserialize, Serialize};

/// The two buttons of the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Button {
    /// Capture a frame (enroll a shot, or screen).
    Capture,
    /// Next class / confirm.
    Next,
}

impl Button {
    pub fn parse(s: &str) -> Option<Button> {
        match s {
            "capture" => Some(Button::Capture),
            "next" | "confirm" => Some(Button::Next),
            _ => None,
        }
    }
}

/// Length of a press.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Press {
    Short,
    Long,
}

/// A debounced button event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ButtonEvent {
    pub button: Button,
    pub press: Press,
}

/// What the LEDs show.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Indication {
    Off,
    /// Confident, benign class.
    Green,
    /// Refer / attention (also: capture rejected, waiting for input in enrollment).
    Amber,
    /// Confident, class flagged urgent.
    Red,
}

/// Errors of button / LED hardware.
#[derive(Debug, thiserror::Error)]
pub enum GpioError {
    #[error("GPIO {what}: {reason}; check gpio.chip and the line offsets in the board profile")]
    Hardware { what: String, reason: String },
    #[error("button script {path}:{line}: {reason}")]
    Script {
        path: String,
        line: usize,
        reason: String,
    },
}

/// Milliseconds from an arbitrary origin.
pub trait Clock {
    fn now_ms(&mut self) -> u64;
}

/// Wall clock.
pub struct MonotonicClock(std::time::Instant);

impl Default for MonotonicClock {
    fn default() -> Self {
        MonotonicClock(std::time::Instant::now())
    }
}

impl Clock for MonotonicClock {
    fn now_ms(&mut self) -> u64 {
        self.0.elapsed().as_millis() as u64
    }
}

/// Debounce and press-length timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ButtonTiming {
    /// A level must be stable this long to count.
    pub debounce_ms: u64,
    /// Held at least this long = long press.
    pub long_press_ms: u64,
}

impl Default for ButtonTiming {
    fn default() -> Self {
        ButtonTiming {
            debounce_ms: 20,
            long_press_ms: 800,
        }
    }
}

/// Polled debouncer over one input pin.
pub struct Debouncer<P> {
    pin: P,
    active_low: bool,
    timing: ButtonTiming,
    stable: bool,
    candidate: bool,
    candidate_since: u64,
    pressed_at: u64,
    long_sent: bool,
}

impl<P: InputPin> Debouncer<P> {
    /// `active_low`: the pin reads low while the button is pressed (pull-up wiring).
    pub fn new(pin: P, active_low: bool, timing: ButtonTiming) -> Self {
        Debouncer {
            pin,
            active_low,
            timing,
            stable: false,
            candidate: false,
            candidate_since: 0,
            pressed_at: 0,
            long_sent: false,
        }
    }

    /// Sample the pin once (one pin read) at time `now_ms`; returns a press when one completes.
    pub fn update(&mut self, now_ms: u64) -> Result<Option<Press>, P::Error> {
        let high = self.pin.is_high()?;
        let pressed = high != self.active_low;
        if pressed != self.candidate {
            self.candidate = pressed;
            self.candidate_since = now_ms;
        }
        let mut event = None;
        if self.candidate != self.stable
            && now_ms.saturating_sub(self.candidate_since) >= self.timing.debounce_ms
        {
            self.stable = self.candidate;
            if self.stable {
                self.pressed_at = self.candidate_since;
                self.long_sent = false;
            } else if !self.long_sent {
                event = Some(Press::Short);
            }
        }
        if self.stable
            && self.candidate
            && !self.long_sent
            && now_ms.saturating_sub(self.pressed_at) >= self.timing.long_press_ms
        {
            self.long_sent = true;
            event = Some(Press::Long);
        }
        Ok(event)
    }

    /// The debounced state.
    pub fn is_pressed(&self) -> bool {
        self.stable
    }

    /// Give the pin back (tests: `done()` on a mock).
    pub fn release(self) -> P {
        self.pin
    }
}

/// Something that shows an [`Indication`].
pub trait StatusLeds {
    fn show(&mut self, ind: Indication) -> Result<(), GpioError>;
}

/// A source of debounced button events.
pub trait ButtonInput {
    /// Block until the next event; `Ok(None)` when the input has ended (end of a script).
    fn next_event(&mut self) -> Result<Option<ButtonEvent>, GpioError>;
}

/// Three LEDs on output pins; exactly one lit (or none for [`Indication::Off`]).
pub struct PinLeds<G, A, R> {
    pub green: G,
    pub amber: A,
    pub red: R,
    /// The LED lights when its pin is low.
    pub active_low: bool,
}

impl<G: OutputPin, A: OutputPin, R: OutputPin> PinLeds<G, A, R> {
    fn set<P: OutputPin>(
        pin: &mut P,
        on: bool,
        active_low: bool,
        name: &str,
    ) -> Result<(), GpioError> {
        use embedded_hal::digital::Error as _;
        let r = if on != active_low {
            pin.set_high()
        } else {
            pin.set_low()
        };
        r.map_err(|e| GpioError::Hardware {
            what: format!("{name} LED"),
            reason: format!("{:?}", e.kind()),
        })
    }
}

impl<G: OutputPin, A: OutputPin, R: OutputPin> StatusLeds for PinLeds<G, A, R> {
    fn show(&mut self, ind: Indication) -> Result<(), GpioError> {
        let al = self.active_low;
        Self::set(&mut self.green, ind == Indication::Green, al, "green")?;
        Self::set(&mut self.amber, ind == Indication::Amber, al, "amber")?;
        Self::set(&mut self.red, ind == Indication::Red, al, "red")
    }
}

/// Real buttons: two debouncers polled every `poll_ms` on the wall clock.
pub struct PolledButtons<C, N, K> {
    pub capture: Debouncer<C>,
    pub next: Debouncer<N>,
    pub clock: K,
    pub poll_ms: u64,
}

impl<C: InputPin, N: InputPin, K: Clock> ButtonInput for PolledButtons<C, N, K> {
    fn next_event(&mut self) -> Result<Option<ButtonEvent>, GpioError> {
        let hw = |what: &str, e: embedded_hal::digital::ErrorKind| GpioError::Hardware {
            what: format!("{what} button"),
            reason: format!("{e:?}"),
        };
        use embedded_hal::digital::Error as _;
        loop {
            let now = self.clock.now_ms();
            if let Some(p) = self
                .capture
                .update(now)
                .map_err(|e| hw("capture", e.kind()))?
            {
                return Ok(Some(ButtonEvent {
                    button: Button::Capture,
                    press: p,
                }));
            }
            if let Some(p) = self.next.update(now).map_err(|e| hw("next", e.kind()))? {
                return Ok(Some(ButtonEvent {
                    button: Button::Next,
                    press: p,
                }));
            }
            std::thread::sleep(std::time::Duration::from_millis(self.poll_ms));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use embedded_hal_mock::eh1::digital::{Mock as PinMock, State, Transaction as T};

    const TIMING: ButtonTiming = ButtonTiming {
        debounce_ms: 20,
        long_press_ms: 500,
    };

    /// Feed `levels` (one read each, `dt` ms apart) through a debouncer over a mock pin that
    /// expects exactly those reads; returns (time, press) events.
    fn run(levels: &[(State, u64)], active_low: bool) -> Vec<(u64, Press)> {
        let mut expectations = vec![];
        let mut times = vec![];
        let mut t = 0;
        for &(s, n) in levels {
            for _ in 0..n {
                expectations.push(T::get(s));
                times.push(t);
                t += 5;
            }
        }
        let pin = PinMock::new(&expectations);
        let mut d = Debouncer::new(pin, active_low, TIMING);
        let mut out = vec![];
        for now in times {
            if let Some(p) = d.update(now).unwrap() {
                out.push((now, p));
            }
        }
        d.release().done();
        out
    }

    use State::{High, Low};

    #[test]
    fn clean_short_press_active_low() {
        // idle high, pressed (low) for 100 ms, released
        let ev = run(&[(High, 4), (Low, 20), (High, 10)], true);
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].1, Press::Short);
        // release edge at t = 120 ms, accepted after 20 ms of stability
        assert_eq!(ev[0].0, 140);
    }

    #[test]
    fn bouncing_contacts_give_one_press() {
        let ev = run(
            &[
                (High, 2),
                (Low, 1),
                (High, 1),
                (Low, 1),
                (High, 1),
                (Low, 30),
                (High, 1),
                (Low, 1),
                (High, 10),
            ],
            true,
        );
        assert_eq!(
            ev.iter().map(|e| e.1).collect::<Vec<_>>(),
            vec![Press::Short]
        );
    }

    #[test]
    fn glitch_shorter_than_debounce_is_ignored() {
        let ev = run(&[(High, 5), (Low, 3), (High, 10)], true);
        assert!(ev.is_empty(), "{ev:?}");
    }

    #[test]
    fn long_press_fires_once_while_held_and_no_short_on_release() {
        // held 150 reads * 5 ms = 750 ms > 500 ms
        let ev = run(&[(Low, 150), (High, 10)], false);
        assert!(ev.is_empty(), "active-high wiring: low = released");
        let ev = run(&[(Low, 2), (High, 150), (Low, 10)], false);
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert_eq!(ev[0].1, Press::Long);
        // pressed at t = 10, long fires at t = 510
        assert_eq!(ev[0].0, 510);
    }

    #[test]
    fn press_just_under_long_threshold_is_short() {
        // held 99 reads = 495 ms (debounced from the first stable edge) -> short
        let ev = run(&[(High, 2), (Low, 99), (High, 10)], true);
        assert_eq!(
            ev.iter().map(|e| e.1).collect::<Vec<_>>(),
            vec![Press::Short]
        );
    }

    #[test]
    fn leds_light_exactly_one() {
        use embedded_hal_mock::eh1::digital::Transaction as T;
        let g = PinMock::new(&[T::set(High), T::set(Low)]);
        let a = PinMock::new(&[T::set(Low), T::set(Low)]);
        let r = PinMock::new(&[T::set(Low), T::set(High)]);
        let mut leds = PinLeds {
            green: g,
            amber: a,
            red: r,
            active_low: false,
        };
        leds.show(Indication::Green).unwrap();
        leds.show(Indication::Red).unwrap();
        leds.green.done();
        leds.amber.done();
        leds.red.done();
        // active-low wiring inverts the levels
        let g = PinMock::new(&[T::set(High)]);
        let a = PinMock::new(&[T::set(Low)]);
        let r = PinMock::new(&[T::set(High)]);
        let mut leds = PinLeds {
            green: g,
            amber: a,
            red: r,
            active_low: true,
        };
        leds.show(Indication::Amber).unwrap();
        leds.green.done();
        leds.amber.done();
        leds.red.done();
    }
}
