//! Log lines written by a thread of their own, so that no worker ever waits
//! on the log: a reader that falls behind (a full pipe, a slow terminal, a
//! stopped log collector) costs log lines, counted and reported once it
//! catches up, rather than calls.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Lines waiting at most (a few MiB); past it, new lines are dropped.
const BACKLOG: usize = 16 * 1024;

/// How long the flush at exit waits for a reader that stopped.
const FLUSH_PATIENCE: Duration = Duration::from_secs(1);

enum Message {
    Line(Vec<u8>),
    /// Answered once everything before it is written.
    Flush(SyncSender<()>),
}

/// Hands log lines to the log thread; a `tracing_subscriber` writer.
#[derive(Clone)]
pub struct Logs {
    lines: SyncSender<Message>,
    dropped: Arc<AtomicU64>,
}

/// Writes out the lines still waiting when dropped (within a second).
pub struct FlushOnDrop(Logs);

impl Logs {
    /// Starts the thread that writes to `out`.
    pub fn start(out: impl Write + Send + 'static) -> std::io::Result<(Self, FlushOnDrop)> {
        let (lines, waiting) = sync_channel(BACKLOG);
        let logs = Logs { lines, dropped: Arc::default() };
        let dropped = logs.dropped.clone();
        std::thread::Builder::new().name("rolehost-log".into()).spawn(move || write_out(waiting, out, &dropped))?;
        Ok((logs.clone(), FlushOnDrop(logs)))
    }
}

/// How long the log thread lets lines gather after writing some: while it
/// sleeps rather than waits on the channel, a line costs its sender no
/// wake-up (a system call and a thread switch each).
const GATHER: Duration = Duration::from_millis(5);

/// The log thread: writes what waits in one go, then says how many lines
/// were dropped meanwhile, if any.
fn write_out(waiting: Receiver<Message>, out: impl Write, dropped: &AtomicU64) {
    let mut out = std::io::BufWriter::new(out);
    while let Ok(first) = waiting.recv() {
        let mut next = Some(first);
        while let Some(message) = next {
            match message {
                Message::Line(line) => {
                    let _ = out.write_all(&line);
                }
                Message::Flush(done) => {
                    let _ = out.flush();
                    let _ = done.send(());
                }
            }
            next = waiting.try_recv().ok();
        }
        let lost = dropped.swap(0, Ordering::Relaxed);
        if lost > 0 {
            let _ = writeln!(out, "rolehost: {lost} log lines dropped: the log's reader fell behind");
        }
        let _ = out.flush();
        std::thread::sleep(GATHER);
    }
}

/// Each event's formatted line arrives in one `write`.
impl Write for &Logs {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        if let Err(TrySendError::Full(_)) = self.lines.try_send(Message::Line(line.to_vec())) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = &'a Logs;

    fn make_writer(&'a self) -> Self::Writer {
        self
    }
}

impl Drop for FlushOnDrop {
    fn drop(&mut self) {
        let deadline = Instant::now() + FLUSH_PATIENCE;
        let (done, flushed) = sync_channel(1);
        let mut flush = Message::Flush(done);
        loop {
            match self.0.lines.try_send(flush) {
                Ok(()) => break,
                Err(TrySendError::Full(again)) if Instant::now() < deadline => {
                    flush = again;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(_) => return,
            }
        }
        let _ = flushed.recv_timeout(deadline.saturating_duration_since(Instant::now()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Collects what the log thread writes; `gate` holds every write until
    /// it is opened (it starts closed).
    #[derive(Clone, Default)]
    struct Sink {
        text: Arc<Mutex<Vec<u8>>>,
        gate: Arc<(Mutex<bool>, std::sync::Condvar)>,
    }

    impl Sink {
        fn open(&self) {
            *self.gate.0.lock().unwrap() = true;
            self.gate.1.notify_all();
        }

        fn text(&self) -> String {
            String::from_utf8(self.text.lock().unwrap().clone()).unwrap()
        }
    }

    impl Write for Sink {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            let (open, opened) = &*self.gate;
            drop(opened.wait_while(open.lock().unwrap(), |open| !*open).unwrap());
            self.text.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_come_out_in_order_by_the_time_the_flush_returns() {
        let sink = Sink::default();
        sink.open();
        let (logs, flush) = Logs::start(sink.clone()).unwrap();
        for n in 0..1000 {
            (&logs).write_all(format!("line {n}\n").as_bytes()).unwrap();
        }
        drop(flush);
        let expected: String = (0..1000).map(|n| format!("line {n}\n")).collect();
        assert_eq!(sink.text(), expected);
    }

    #[test]
    fn a_reader_that_falls_behind_costs_lines_not_time() {
        let sink = Sink::default();
        let (logs, flush) = Logs::start(sink.clone()).unwrap();
        let total = 3 * BACKLOG;
        // The writes return although nothing can be written out.
        let (done, written) = std::sync::mpsc::channel();
        let writer = logs.clone();
        std::thread::spawn(move || {
            for n in 0..total {
                (&writer).write_all(format!("line {n}\n").as_bytes()).unwrap();
            }
            done.send(()).unwrap();
        });
        written.recv_timeout(Duration::from_secs(30)).expect("a write waited for the reader");
        sink.open();
        drop(flush);
        let text = sink.text();
        let lines = text.lines().filter(|line| line.starts_with("line ")).count();
        let notice = text.lines().find_map(|line| line.strip_prefix("rolehost: ")).expect("no notice of dropped lines");
        let dropped: usize = notice.split(' ').next().unwrap().parse().unwrap();
        assert!(notice.ends_with("log lines dropped: the log's reader fell behind"), "{notice}");
        assert!(dropped > 0 && lines > 0, "{lines} written, {dropped} dropped");
        assert_eq!(lines + dropped, total, "every line is written or counted");
    }
}
