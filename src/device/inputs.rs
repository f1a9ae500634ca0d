//! Buttons and screen requests on one channel into one device loop.

#[allow(unused_imports)]
use super::*;

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
