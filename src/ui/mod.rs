//! What the user sees: consumers of the executor's [`RunEvent`]s.
//!
//! Each output is a [`Reporter`]: the terminal display (prefixed logs, spinners, the
//! summary table), the `--json` stream and the merged JUnit file. They all read the same
//! event stream, in the order the executor emitted it.

mod json;
mod junit_writer;
mod terminal;

pub use json::JsonReporter;
pub use junit_writer::JunitWriter;
pub use terminal::{ColorChoice, TerminalReporter};

use std::time::Duration;

use tokio::sync::mpsc::UnboundedReceiver;

use crate::run::events::RunEvent;

pub trait Reporter: Send {
    fn event(&mut self, event: &RunEvent);
    /// Called once after the last event.
    fn finish(&mut self) -> anyhow::Result<()> {
        Ok(())
    }
}

/// Feed every event to every reporter until the executor's side of the channel closes.
pub async fn drive(
    mut rx: UnboundedReceiver<RunEvent>,
    mut reporters: Vec<Box<dyn Reporter>>,
) -> anyhow::Result<()> {
    while let Some(event) = rx.recv().await {
        for r in reporters.iter_mut() {
            r.event(&event);
        }
    }
    for r in reporters.iter_mut() {
        r.finish()?;
    }
    Ok(())
}

/// `1.2s`, `45.0s`, `3m 05s`, `1h 02m`.
pub fn format_duration(d: Duration) -> String {
    let secs = d.as_secs();
    if secs < 60 {
        format!("{:.1}s", d.as_secs_f64())
    } else if secs < 3600 {
        format!("{}m {:02}s", secs / 60, secs % 60)
    } else {
        format!("{}h {:02}m", secs / 3600, (secs % 3600) / 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_naturally() {
        assert_eq!(format_duration(Duration::from_millis(1234)), "1.2s");
        assert_eq!(format_duration(Duration::from_secs(185)), "3m 05s");
        assert_eq!(format_duration(Duration::from_secs(3720)), "1h 02m");
    }
}
