//! Routes `tracing` events to the server's log (TRITONSERVER_LogMessage), so backend
//! messages appear in tritonserver's output with its levels and `--log-*` switches.

use std::ffi::CString;
use std::fmt::Write as _;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

use super::sys;

struct TritonLog;

impl<S: Subscriber> Layer<S> for TritonLog {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let metadata = event.metadata();
        let level = match *metadata.level() {
            Level::ERROR => sys::TRITONSERVER_LOG_ERROR,
            Level::WARN => sys::TRITONSERVER_LOG_WARN,
            Level::INFO => sys::TRITONSERVER_LOG_INFO,
            _ => sys::TRITONSERVER_LOG_VERBOSE,
        };
        // SAFETY: a plain query with an enum value.
        if !unsafe { sys::TRITONSERVER_LogIsEnabled(level) } {
            return;
        }
        let mut message = MessageText(String::new());
        event.record(&mut message);
        let file = CString::new(metadata.file().unwrap_or("triton_llm")).unwrap_or_default();
        let text = CString::new(message.0.replace('\0', "\\0")).unwrap_or_default();
        let line = metadata.line().unwrap_or(0) as i32;
        // SAFETY: both strings are NUL-terminated and outlive the call; the returned
        // error (if any) is freed by check. A failed log line is dropped, not reported.
        let _ = unsafe {
            super::error::check(sys::TRITONSERVER_LogMessage(
                level,
                file.as_ptr(),
                line,
                text.as_ptr(),
            ))
        };
    }
}

/// "message key=value key=value".
struct MessageText(String);

impl Visit for MessageText {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.insert_str(0, value);
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0.insert_str(0, &format!("{value:?}"));
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }
}

/// Makes the server's log the process-wide `tracing` subscriber. A second call (the
/// backend initialised again in the same process) keeps the first one.
pub fn install() {
    let subscriber = tracing_subscriber::registry().with(TritonLog);
    let _ = tracing::subscriber::set_global_default(subscriber);
}
