//! Log lines written by a thread of their own, so that no worker ever waits
//! on the log: a reader that falls behind (a full pipe, a slow terminal, a
//! stopped log collector) costs log lines, counted and reported once it
//! catches up, rather than calls.

use std::io::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Lines waiting at most, and their bytes (a role's log line may be
/// 64 KiB or more); past either, new lines are dropped.
const BACKLOG: usize = 16 * 1024;
const BACKLOG_BYTES: usize = 4 << 20;

/// How long the log thread lets lines gather after writing some: while it
/// sleeps rather than waits on the channel, a line costs its sender no
/// wake-up (a system call and a thread switch each).
const GATHER: Duration = Duration::from_millis(5);

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
    counts: Arc<Counts>,
}

#[derive(Default)]
struct Counts {
    /// Bytes of the lines waiting.
    waiting: AtomicUsize,
    /// Lines dropped since the last notice.
    dropped: AtomicU64,
}

/// Writes out the lines still waiting when dropped (within a second).
pub struct FlushOnDrop(Logs);

impl Logs {
    /// Starts the thread that writes to `out`.
    pub fn start(out: impl Write + Send + 'static) -> std::io::Result<(Self, FlushOnDrop)> {
        let (lines, waiting) = sync_channel(BACKLOG);
        let logs = Logs { lines, counts: Arc::default() };
        let counts = logs.counts.clone();
        std::thread::Builder::new().name("rolehost-log".into()).spawn(move || write_out(waiting, out, &counts))?;
        Ok((logs.clone(), FlushOnDrop(logs)))
    }
}

/// The log thread: writes what waits in one go, then says how many lines
/// were dropped meanwhile, if any.
fn write_out(waiting: Receiver<Message>, out: impl Write, counts: &Counts) {
    let mut out = std::io::BufWriter::new(out);
    while let Ok(first) = waiting.recv() {
        let mut next = Some(first);
        while let Some(message) = next {
            match message {
                Message::Line(line) => {
                    let _ = out.write_all(&line);
                    counts.waiting.fetch_sub(line.len(), Ordering::Relaxed);
                }
                Message::Flush(done) => {
                    report_dropped(&mut out, counts);
                    let _ = out.flush();
                    let _ = done.send(());
                }
            }
            next = waiting.try_recv().ok();
        }
        report_dropped(&mut out, counts);
        let _ = out.flush();
        std::thread::sleep(GATHER);
    }
}

fn report_dropped(out: &mut impl Write, counts: &Counts) {
    let lost = counts.dropped.swap(0, Ordering::Relaxed);
    if lost > 0 {
        let _ = writeln!(out, "rolehost: {lost} log lines dropped: the log's reader fell behind");
    }
}

/// Each event's formatted line arrives in one `write`.
impl Write for &Logs {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let counts = &self.counts;
        let before = counts.waiting.fetch_add(line.len(), Ordering::Relaxed);
        let sent = before + line.len() <= BACKLOG_BYTES && self.lines.try_send(Message::Line(line.to_vec())).is_ok();
        if !sent {
            counts.waiting.fetch_sub(line.len(), Ordering::Relaxed);
            counts.dropped.fetch_add(1, Ordering::Relaxed);
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

    /// Lets the log thread write, flushes, and counts the lines written
    /// (those starting with `prefix`) and those the notice says were
    /// dropped (0 without a notice).
    fn written_and_dropped(sink: &Sink, flush: FlushOnDrop, prefix: &str) -> (usize, usize) {
        sink.open();
        drop(flush);
        let text = sink.text();
        let written = text.lines().filter(|line| line.starts_with(prefix)).count();
        let notice = text.lines().find_map(|line| line.strip_prefix("rolehost: "));
        let dropped = notice.map_or(0, |notice| {
            assert!(notice.ends_with(" log lines dropped: the log's reader fell behind"), "{notice}");
            notice.split(' ').next().unwrap().parse().unwrap()
        });
        (written, dropped)
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
        let (lines, dropped) = written_and_dropped(&sink, flush, "line ");
        assert!(dropped > 0 && lines > 0, "{lines} written, {dropped} dropped");
        assert_eq!(lines + dropped, total, "every line is written or counted");
    }

    #[test]
    fn long_lines_wait_up_to_a_bound_in_bytes() {
        let sink = Sink::default();
        let (logs, flush) = Logs::start(sink.clone()).unwrap();
        let line = format!("{}\n", "x".repeat(64 * 1024 - 1));
        for _ in 0..100 {
            (&logs).write_all(line.as_bytes()).unwrap();
        }
        let (lines, dropped) = written_and_dropped(&sink, flush, "x");
        assert!(dropped > 0, "no line dropped");
        assert_eq!(lines + dropped, 100);
        assert!(lines <= BACKLOG_BYTES / line.len(), "{lines} lines of 64 KiB waited");
    }
}
