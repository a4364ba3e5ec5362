//! `rolehost:state/log`, and the role's stdout and stderr: every line goes
//! to the host log tagged with the role, within a per-call byte budget.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

use super::CallCtx;
use crate::bindings::log::{Host, Level};

/// Longest line kept from stdout or stderr before it is cut.
const MAX_LINE_BYTES: usize = 8 << 10;

/// What a line costs on top of its bytes: about what the host log adds to
/// it (time, level, role), so that many empty or tiny lines cannot write
/// far more to the host log than the budget says.
pub const LINE_COST: usize = 64;

/// The log of one call: counts bytes against the role's budget and emits
/// lines to `tracing`. Cheap to clone; clones share the budget.
#[derive(Clone)]
pub struct CallLog(Arc<Mutex<LogState>>);

struct LogState {
    role: Arc<str>,
    max: usize,
    budget: usize,
    dropped: usize,
    partial: [Vec<u8>; 2],
}

/// Where a stream line came from.
#[derive(Clone, Copy)]
pub(crate) enum Stream {
    Stdout = 0,
    Stderr = 1,
}

impl CallLog {
    /// A log for one call of `role` that keeps at most `budget` bytes.
    pub fn new(role: &str, budget: usize) -> Self {
        Self(Arc::new(Mutex::new(LogState {
            role: role.into(),
            max: budget,
            budget,
            dropped: 0,
            partial: [Vec::new(), Vec::new()],
        })))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, LogState> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn line(&self, level: Level, message: &str) {
        self.state().emit(level, message.as_bytes());
    }

    /// A stdout or stderr sink for the WASI context.
    pub(crate) fn sink(&self, stream: Stream) -> LogSink {
        LogSink { log: self.clone(), stream }
    }

    fn write(&self, stream: Stream, mut bytes: &[u8]) {
        let mut state = self.state();
        let level = match stream {
            Stream::Stdout => Level::Info,
            Stream::Stderr => Level::Warn,
        };
        while !bytes.is_empty() {
            let (chunk, rest, complete) = match bytes.iter().position(|&b| b == b'\n') {
                Some(i) => (&bytes[..i], &bytes[i + 1..], true),
                None => (bytes, &[][..], false),
            };
            bytes = rest;
            if state.budget == 0 {
                state.dropped += chunk.len();
                continue;
            }
            let partial = &mut state.partial[stream as usize];
            let kept = chunk.len().min(MAX_LINE_BYTES.saturating_sub(partial.len()));
            partial.extend_from_slice(&chunk[..kept]);
            state.dropped += chunk.len() - kept;
            if complete || state.partial[stream as usize].len() >= MAX_LINE_BYTES {
                let line = std::mem::take(&mut state.partial[stream as usize]);
                if !line.is_empty() {
                    state.emit(level, &line);
                }
            }
        }
    }

    /// Emits unfinished lines and says how much was dropped; call once the
    /// call is over. The budget is then full again for a next call.
    pub fn finish(&self) {
        let mut state = self.state();
        for (i, level) in [(0, Level::Info), (1, Level::Warn)] {
            let line = std::mem::take(&mut state.partial[i]);
            if !line.is_empty() {
                state.emit(level, &line);
            }
        }
        if state.dropped > 0 {
            tracing::warn!(role = %state.role, dropped_bytes = state.dropped, "role log over its budget; lines dropped");
        }
        // A warm instance's next call starts with a full budget.
        state.budget = state.max;
        state.dropped = 0;
    }
}

impl LogState {
    /// Takes `len` bytes from the budget; false (and counted as dropped)
    /// when the budget is spent.
    fn take(&mut self, len: usize) -> bool {
        if len > self.budget {
            self.budget = 0;
            self.dropped += len;
            return false;
        }
        self.budget -= len;
        true
    }

    /// Writes one line to the host log, its control characters escaped so
    /// that it stays one line and cannot pass for another role's or the
    /// host's. It costs what is written, escapes included, plus
    /// [`LINE_COST`]; past the budget it is dropped.
    fn emit(&mut self, level: Level, line: &[u8]) {
        // Escapes only lengthen a line: one over the budget as it is goes
        // before an escaped copy (up to six times as long) is made.
        if line.len() + LINE_COST > self.budget {
            self.take(line.len() + LINE_COST);
            return;
        }
        let line = String::from_utf8_lossy(line);
        let message = match line.contains(char::is_control) {
            false => line,
            true => {
                let mut escaped = String::with_capacity(line.len() + 16);
                for c in line.chars() {
                    match c.is_control() {
                        true => escaped.extend(c.escape_default()),
                        false => escaped.push(c),
                    }
                }
                escaped.into()
            }
        };
        if !self.take(message.len() + LINE_COST) {
            return;
        }
        let role = &*self.role;
        match level {
            Level::Trace => tracing::trace!(target: "role", role, "{message}"),
            Level::Debug => tracing::debug!(target: "role", role, "{message}"),
            Level::Info => tracing::info!(target: "role", role, "{message}"),
            Level::Warn => tracing::warn!(target: "role", role, "{message}"),
            Level::Error => tracing::error!(target: "role", role, "{message}"),
        }
    }
}

impl Host for CallCtx {
    async fn log(&mut self, level: Level, message: String) -> wasmtime::Result<()> {
        self.log.line(level, &message);
        Ok(())
    }
}

/// The role's stdout or stderr. Never fails and never blocks: past the
/// budget, output is dropped rather than failing the guest's write.
pub(crate) struct LogSink {
    log: CallLog,
    stream: Stream,
}

impl IsTerminal for LogSink {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogSink {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(LogSink { log: self.log.clone(), stream: self.stream })
    }

    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(LogSink { log: self.log.clone(), stream: self.stream })
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for LogSink {
    async fn ready(&mut self) {}
}

impl OutputStream for LogSink {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.log.write(self.stream, &bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 << 10)
    }
}

impl AsyncWrite for LogSink {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.log.write(self.stream, buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A line costs what reaches the host log: escapes count, so a role
    /// cannot write several times its budget in escaped control bytes.
    #[test]
    fn escapes_count_against_the_budget() {
        // 900 bytes, 5400 once escaped: over a budget of 1000 (which then
        // takes nothing more), through the log interface and stdout alike.
        let controls = "\u{1f}".repeat(900);
        let log = CallLog::new("r", 1000);
        log.line(Level::Info, &controls);
        let spent = |log: &CallLog| {
            let state = log.state();
            (state.budget, state.dropped)
        };
        assert_eq!(spent(&log), (0, 900 * 6 + LINE_COST));
        let log = CallLog::new("r", 1000);
        log.write(Stream::Stdout, format!("{controls}\n").as_bytes());
        assert_eq!(spent(&log), (0, 900 * 6 + LINE_COST));
        // Plain text costs its bytes; a tab its escape.
        let log = CallLog::new("r", 1000);
        log.line(Level::Info, &"x".repeat(100));
        log.write(Stream::Stderr, b"tab\there\n");
        assert_eq!(log.state().budget, 1000 - (100 + LINE_COST) - ("tab\\there".len() + LINE_COST));
        // A line over the budget before its escapes is dropped unescaped:
        // it counts its own bytes, no escaped copy was made.
        let log = CallLog::new("r", 1000);
        log.line(Level::Info, &"\u{1f}".repeat(2000));
        assert_eq!(spent(&log), (0, 2000 + LINE_COST));
    }
}
