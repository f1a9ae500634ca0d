//! Buttons and LEDs on Linux character-device GPIO (`/dev/gpiochipN`) via `linux-embedded-hal`.
//!
//! The GPIO v1 character-device ABI used by `gpio-cdev` cannot set pull-up/down bias: buttons
//! need a pull resistor on the board (external, or set by the device tree / `config.txt`
//! `gpio=<n>=ip,pu` on a Raspberry Pi).

use linux_embedded_hal::CdevPin;
use linux_embedded_hal::gpio_cdev::{Chip, LineRequestFlags};

use super::{ButtonTiming, Debouncer, GpioError, MonotonicClock, PinLeds, PolledButtons};

const CONSUMER: &str = "sgps";

fn hw(what: String, e: impl std::fmt::Display) -> GpioError {
    GpioError::Hardware {
        what,
        reason: e.to_string(),
    }
}

fn request(
    chip: &mut Chip,
    chip_path: &str,
    line: u32,
    flags: LineRequestFlags,
    what: &str,
) -> Result<CdevPin, GpioError> {
    let w = || format!("{what} (line {line} on {chip_path})");
    let l = chip.get_line(line).map_err(|e| hw(w(), e))?;
    let h = l.request(flags, 0, CONSUMER).map_err(|e| hw(w(), e))?;
    CdevPin::new(h).map_err(|e| hw(w(), e))
}

/// Request the two button lines as inputs.
pub fn open_buttons(
    chip_path: &str,
    capture_line: u32,
    next_line: u32,
    active_low: bool,
    timing: ButtonTiming,
) -> Result<PolledButtons<CdevPin, CdevPin, MonotonicClock>, GpioError> {
    let mut chip = Chip::new(chip_path).map_err(|e| hw(format!("chip {chip_path}"), e))?;
    let c = request(
        &mut chip,
        chip_path,
        capture_line,
        LineRequestFlags::INPUT,
        "capture button",
    )?;
    let n = request(
        &mut chip,
        chip_path,
        next_line,
        LineRequestFlags::INPUT,
        "next button",
    )?;
    Ok(PolledButtons {
        capture: Debouncer::new(c, active_low, timing),
        next: Debouncer::new(n, active_low, timing),
        clock: MonotonicClock::default(),
        poll_ms: 5,
    })
}

/// Request the three LED lines as outputs (initially off).
pub fn open_leds(
    chip_path: &str,
    green: u32,
    amber: u32,
    red: u32,
    active_low: bool,
) -> Result<PinLeds<CdevPin, CdevPin, CdevPin>, GpioError> {
    let mut chip = Chip::new(chip_path).map_err(|e| hw(format!("chip {chip_path}"), e))?;
    let mut out = |line, what| -> Result<CdevPin, GpioError> {
        let w = || format!("{what} LED (line {line} on {chip_path})");
        let l = chip.get_line(line).map_err(|e| hw(w(), e))?;
        let h = l
            .request(LineRequestFlags::OUTPUT, active_low as u8, CONSUMER)
            .map_err(|e| hw(w(), e))?;
        CdevPin::new(h).map_err(|e| hw(w(), e))
    };
    Ok(PinLeds {
        green: out(green, "green")?,
        amber: out(amber, "amber")?,
        red: out(red, "red")?,
        active_low,
    })
}
