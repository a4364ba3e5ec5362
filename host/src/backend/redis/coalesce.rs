//! Auto-pipelining: single commands that concurrent calls issue at about
//! the same time leave as one pipeline, one socket write and one server
//! read, instead of one each. Each command still gets its own reply (a
//! server error for one never fails the others); pipelines and
//! transactions the backend builds itself pass straight through.
//!
//! A command whose caller has given up (its timeout fired, its call was
//! dropped) before the batch is sent is left out, and a batch whose
//! callers have all given up while it waits for the connection (say, a
//! reconnect) is not sent at all: a caller told `unavailable` must not
//! have its write land later, perhaps over a newer one.

use std::sync::{Arc, Mutex};

use redis::aio::ConnectionLike;
use redis::{Cmd, Pipeline, RedisError, RedisFuture, RedisResult, Value};
use tokio::sync::oneshot;

/// A connection whose single commands are gathered into pipelines.
#[derive(Clone)]
pub(super) struct Coalescing<C> {
    conn: C,
    queue: Arc<Mutex<Batch>>,
}

type Reply = oneshot::Sender<RedisResult<Value>>;

/// The commands waiting for the next flush, with where each reply goes.
#[derive(Default)]
struct Batch {
    cmds: Vec<Cmd>,
    replies: Vec<Reply>,
}

impl<C: ConnectionLike + Clone + Send + Sync + 'static> Coalescing<C> {
    pub(super) fn new(conn: C) -> Self {
        Self { conn, queue: Arc::default() }
    }

    /// Queues `cmd`; the first command of a batch schedules its flush.
    fn enqueue(&self, cmd: &Cmd) -> oneshot::Receiver<RedisResult<Value>> {
        let (reply, answer) = oneshot::channel();
        let first = {
            let mut batch = lock(&self.queue);
            batch.cmds.push(cmd.clone());
            batch.replies.push(reply);
            batch.replies.len() == 1
        };
        if first {
            tokio::spawn(flush(self.conn.clone(), self.queue.clone()));
        }
        answer
    }
}

/// Sends what gathered in `queue` while other ready tasks ran, and hands
/// each command its reply. Runs as its own task, so a caller that gives up
/// (its timeout) never strands the others' commands.
async fn flush<C: ConnectionLike>(mut conn: C, queue: Arc<Mutex<Batch>>) {
    // Let the other runnable tasks add their commands first.
    tokio::task::yield_now().await;
    let Batch { mut cmds, mut replies } = std::mem::take(&mut *lock(&queue));
    if replies.iter().any(Reply::is_closed) {
        (cmds, replies) = cmds.into_iter().zip(replies).filter(|(_, reply)| !reply.is_closed()).unzip();
    }
    let send = async {
        match cmds.as_slice() {
            [] => Ok(Vec::new()),
            [cmd] => conn.req_packed_command(cmd).await.map(|value| vec![value]),
            _ => {
                let (count, mut pipe) = (cmds.len(), Pipeline::with_capacity(cmds.len()));
                for cmd in cmds {
                    pipe.add_command(cmd);
                }
                conn.req_packed_commands(&pipe, 0, count).await
            }
        }
    };
    let everyone_gone = async {
        for reply in replies.iter_mut() {
            reply.closed().await;
        }
    };
    let answers = tokio::select! {
        answers = send => answers,
        () = everyone_gone => return,
    };
    let answers = answers.and_then(|values| {
        if values.len() == replies.len() {
            return Ok(values);
        }
        let wrong = format!("Redis sent {} replies to {} pipelined commands", values.len(), replies.len());
        Err(RedisError::from(std::io::Error::other(wrong)))
    });
    match answers {
        Ok(values) => replies.into_iter().zip(values).for_each(|(reply, value)| drop(reply.send(Ok(value)))),
        Err(error) => replies.into_iter().for_each(|reply| drop(reply.send(Err(error.clone())))),
    }
}

/// The batch, even after a panic elsewhere while it was held: it is always
/// left whole, so there is nothing to repair.
fn lock(queue: &Mutex<Batch>) -> std::sync::MutexGuard<'_, Batch> {
    queue.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl<C: ConnectionLike + Clone + Send + Sync + 'static> ConnectionLike for Coalescing<C> {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        let answer = self.enqueue(cmd);
        Box::pin(async move {
            answer.await.unwrap_or_else(|_| {
                Err(RedisError::from(std::io::Error::other("the pipelined command was dropped unsent")))
            })
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        self.conn.req_packed_commands(pipeline, offset, count)
    }

    fn get_db(&self) -> i64 {
        self.conn.get_db()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use redis::aio::MultiplexedConnection;
    use rolehost_tests::RedisServer;

    use super::*;

    /// A real connection that counts what reaches it.
    #[derive(Clone)]
    struct Counted {
        conn: MultiplexedConnection,
        singles: Arc<AtomicUsize>,
        pipelined: Arc<Mutex<Vec<usize>>>,
    }

    impl ConnectionLike for Counted {
        fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
            self.singles.fetch_add(1, Ordering::SeqCst);
            self.conn.req_packed_command(cmd)
        }

        fn req_packed_commands<'a>(
            &'a mut self,
            pipe: &'a Pipeline,
            offset: usize,
            count: usize,
        ) -> RedisFuture<'a, Vec<Value>> {
            self.pipelined.lock().unwrap().push(count);
            self.conn.req_packed_commands(pipe, offset, count)
        }

        fn get_db(&self) -> i64 {
            self.conn.get_db()
        }
    }

    async fn counted(server: &RedisServer) -> Counted {
        let client = redis::Client::open(server.url(0)).unwrap();
        let conn = client.get_multiplexed_async_connection().await.unwrap();
        Counted { conn, singles: Arc::default(), pipelined: Arc::default() }
    }

    // One thread: the callers below all queue their commands before the
    // flush runs, so the batch is exactly what they sent.
    #[tokio::test]
    async fn concurrent_commands_leave_as_one_pipeline_with_their_own_replies() {
        let Some(server) = RedisServer::start() else { return };
        let counted = counted(&server).await;
        let conn = Coalescing::new(counted.clone());
        redis::cmd("SET").arg("text").arg("not a number").exec_async(&mut conn.clone()).await.unwrap();
        counted.singles.store(0, Ordering::SeqCst);
        let mut callers = tokio::task::JoinSet::new();
        for i in 0..100i64 {
            let mut conn = conn.clone();
            callers.spawn(async move {
                if i % 10 == 9 {
                    let error = redis::cmd("INCR").arg("text").query_async::<i64>(&mut conn).await.unwrap_err();
                    assert!(error.to_string().contains("not an integer"), "{error}");
                } else {
                    let value: i64 =
                        redis::cmd("INCRBY").arg(format!("n{i}")).arg(i).query_async(&mut conn).await.unwrap();
                    assert_eq!(value, i);
                }
            });
        }
        while let Some(caller) = callers.join_next().await {
            caller.unwrap();
        }
        assert_eq!(*counted.pipelined.lock().unwrap(), [100], "one pipeline of every command");
        assert_eq!(counted.singles.load(Ordering::SeqCst), 0);
        // A command alone goes out as itself.
        let value: i64 = redis::cmd("INCR").arg("n1").query_async(&mut conn.clone()).await.unwrap();
        assert_eq!((value, counted.singles.load(Ordering::SeqCst)), (2, 1));
    }

    /// A real connection that holds every request until its gate opens,
    /// as a connection waiting for a reconnect does.
    #[derive(Clone)]
    struct Gated {
        conn: MultiplexedConnection,
        gate: Arc<tokio::sync::Semaphore>,
    }

    impl ConnectionLike for Gated {
        fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
            Box::pin(async move {
                drop(self.gate.acquire().await);
                self.conn.req_packed_command(cmd).await
            })
        }

        fn req_packed_commands<'a>(
            &'a mut self,
            pipe: &'a Pipeline,
            offset: usize,
            count: usize,
        ) -> RedisFuture<'a, Vec<Value>> {
            Box::pin(async move {
                drop(self.gate.acquire().await);
                self.conn.req_packed_commands(pipe, offset, count).await
            })
        }

        fn get_db(&self) -> i64 {
            self.conn.get_db()
        }
    }

    #[tokio::test]
    async fn commands_whose_callers_gave_up_are_never_sent() {
        let Some(server) = RedisServer::start() else { return };
        let plain = counted(&server).await.conn;
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let conn = Coalescing::new(Gated { conn: plain.clone(), gate: gate.clone() });
        let incr = |key: &'static str| {
            let mut conn = conn.clone();
            async move { redis::cmd("INCR").arg(key).query_async::<i64>(&mut conn).await }
        };
        // Alone and in a batch, the callers give up while the connection
        // is held; then it comes back.
        let patience = std::time::Duration::from_millis(50);
        assert!(tokio::time::timeout(patience, incr("alone")).await.is_err());
        let batch = tokio::time::timeout(patience, async { tokio::join!(incr("a"), incr("b"), incr("c")) });
        assert!(batch.await.is_err());
        // One caller waits: its command goes out, the others' do not.
        let waiting = tokio::spawn(incr("waited"));
        tokio::time::sleep(patience).await;
        gate.add_permits(1000);
        assert_eq!(waiting.await.unwrap().unwrap(), 1);
        tokio::time::sleep(patience).await;
        for key in ["alone", "a", "b", "c"] {
            let value: Option<i64> = redis::cmd("GET").arg(key).query_async(&mut plain.clone()).await.unwrap();
            assert_eq!(value, None, "`INCR {key}` ran after its caller gave up");
        }
    }

    #[tokio::test]
    async fn a_lost_server_fails_every_gathered_command() {
        let Some(mut server) = RedisServer::start() else { return };
        let conn = Coalescing::new(counted(&server).await);
        server.kill();
        let mut callers = tokio::task::JoinSet::new();
        for i in 0..20 {
            let mut conn = conn.clone();
            callers.spawn(async move { redis::cmd("GET").arg(i).query_async::<Option<String>>(&mut conn).await });
        }
        while let Some(caller) = callers.join_next().await {
            let error = caller.unwrap().unwrap_err();
            assert!(error.is_io_error() || error.is_connection_dropped() || error.is_unrecoverable_error(), "{error}");
        }
    }
}
