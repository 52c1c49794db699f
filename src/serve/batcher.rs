//! Dynamic batching: handlers put jobs on a bounded queue; one worker thread owns the model
//! (`Pipeline::run` needs `&mut`), blocks for the first job, takes every job already waiting up to
//! the batch size, and runs them as one batch. The pipeline left-pads, so a batched answer is the
//! answer the request gets alone.
//!
//! A job carries a cancel flag that its [`Ticket`] sets when dropped, which is what happens when
//! the client goes away (axum drops the handler future, hyper the SSE body). The worker skips
//! cancelled jobs when forming a batch and stops their rows inside a running batch.

use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::pipeline::{Request, RequestError, Response};
use crate::serve::metrics::{CancelledAt, Metrics};

/// What the worker runs a batch with: `Pipeline::run_until` in the server, a stand-in in tests.
pub trait Runner: Send + 'static {
    fn run(&mut self, requests: &[Request], on_token: &mut dyn FnMut(usize, &str) -> bool) -> Vec<Result<Response, RequestError>>;
}

impl<F> Runner for F
where
    F: FnMut(&[Request], &mut dyn FnMut(usize, &str) -> bool) -> Vec<Result<Response, RequestError>> + Send + 'static,
{
    fn run(&mut self, requests: &[Request], on_token: &mut dyn FnMut(usize, &str) -> bool) -> Vec<Result<Response, RequestError>> {
        self(requests, on_token)
    }
}

/// Why a job has no response.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Request(#[from] RequestError),
    /// The batch panicked; every job of it gets this, the worker goes on with the next batch.
    #[error("the model worker panicked while running this request's batch: {0}")]
    Panicked(String),
    #[error("the model worker has stopped")]
    WorkerGone,
    /// The server was stopped and `--shutdown-timeout` passed before the job finished.
    #[error("the server is shutting down and its --shutdown-timeout passed before this request finished; retry on another server")]
    ShutDown,
}

/// What the worker sends back for a job.
#[derive(Debug)]
pub enum Event {
    /// Text a new token made final (never empty; see `prompt::TextStream`); the deltas of a job
    /// concatenated are its answer's text. Sent only for streaming jobs.
    Token(String),
    Done(Box<Result<Response, JobError>>),
}

struct Job {
    request: Request,
    reply: Reply,
}

/// Where a job's events go.
struct Reply {
    stream: bool,
    cancelled: Arc<AtomicBool>,
    events: UnboundedSender<Event>,
}

/// Why a job was not queued; both are a 503 the client may retry.
#[derive(Debug)]
pub enum SubmitError {
    Full,
    /// The worker thread is gone (it only stops after the server does).
    Stopped,
}

/// The handlers' side of the queue.
#[derive(Clone)]
pub struct Queue {
    jobs: SyncSender<Job>,
    metrics: Arc<Metrics>,
    /// Set by [`Queue::cancel_all`]: every job still queued or running ends as
    /// [`JobError::ShutDown`].
    stopping: Arc<AtomicBool>,
}

/// A submitted job: its events, and the cancel flag set when this is dropped unfinished.
pub struct Ticket {
    events: UnboundedReceiver<Event>,
    cancelled: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    done: bool,
}

impl Queue {
    /// Queues `request`; `stream` asks for [`Event::Token`]s before the [`Event::Done`].
    pub fn submit(&self, request: Request, stream: bool) -> Result<Ticket, SubmitError> {
        let (sender, events) = unbounded_channel();
        let cancelled = Arc::new(AtomicBool::new(false));
        let job = Job {
            request,
            reply: Reply {
                stream,
                cancelled: Arc::clone(&cancelled),
                events: sender,
            },
        };
        // Counted before sending so the worker's decrement never comes first.
        self.metrics.queue_depth.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.jobs.try_send(job) {
            self.metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
            return match e {
                TrySendError::Full(_) => Err(SubmitError::Full),
                TrySendError::Disconnected(_) => Err(SubmitError::Stopped),
            };
        }
        Ok(Ticket {
            events,
            cancelled,
            metrics: Arc::clone(&self.metrics),
            done: false,
        })
    }
}

impl Queue {
    /// Ends every job queued or running as [`JobError::ShutDown`] (rows stop at their next
    /// token), for a shutdown whose grace time is over.
    pub fn cancel_all(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }
}

impl Ticket {
    /// The next event; a worker that went away without answering reads as a failed job.
    pub async fn next(&mut self) -> Event {
        let event = self
            .events
            .recv()
            .await
            .unwrap_or_else(|| Event::Done(Box::new(Err(JobError::WorkerGone))));
        if matches!(event, Event::Done(_)) {
            self.done = true;
        }
        event
    }

    /// Waits for the answer, skipping token events.
    pub async fn wait(mut self) -> Result<Response, JobError> {
        loop {
            if let Event::Done(result) = self.next().await {
                return *result;
            }
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.done {
            self.cancelled.store(true, Ordering::Relaxed);
            self.metrics.record_client_disconnect();
        }
    }
}

/// Starts the worker thread. It runs until every [`Queue`] clone is dropped and the queue is
/// drained, so joining it after the HTTP server stopped finishes the queued jobs.
pub fn start(runner: impl Runner, max_batch: usize, max_queue: usize, metrics: Arc<Metrics>) -> std::io::Result<(Queue, JoinHandle<()>)> {
    let (jobs, queue) = mpsc::sync_channel(max_queue);
    let worker_metrics = Arc::clone(&metrics);
    let stopping = Arc::new(AtomicBool::new(false));
    let worker_stopping = Arc::clone(&stopping);
    let handle = std::thread::Builder::new()
        .name("paligemma-worker".into())
        .spawn(move || work(runner, &queue, max_batch.max(1), &worker_metrics, &worker_stopping))?;
    Ok((Queue { jobs, metrics, stopping }, handle))
}

fn work(mut runner: impl Runner, queue: &Receiver<Job>, max_batch: usize, metrics: &Metrics, stopping: &AtomicBool) {
    while let Ok(first) = queue.recv() {
        let mut batch = Vec::with_capacity(max_batch);
        take(first, &mut batch, metrics, stopping);
        while batch.len() < max_batch {
            match queue.try_recv() {
                Ok(job) => take(job, &mut batch, metrics, stopping),
                Err(_) => break,
            }
        }
        if !batch.is_empty() {
            run_batch(&mut runner, batch, metrics, stopping);
        }
    }
}

/// Moves `job` off the queue into `batch`, unless its client has gone or the server is past its
/// shutdown grace time.
fn take(job: Job, batch: &mut Vec<Job>, metrics: &Metrics, stopping: &AtomicBool) {
    metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
    if job.reply.cancelled.load(Ordering::Relaxed) {
        metrics.record_cancelled(CancelledAt::Queued);
    } else if stopping.load(Ordering::Relaxed) {
        let _ = job.reply.events.send(Event::Done(Box::new(Err(JobError::ShutDown))));
    } else {
        batch.push(job);
    }
}

fn run_batch(runner: &mut impl Runner, batch: Vec<Job>, metrics: &Metrics, stopping: &AtomicBool) {
    let (requests, jobs): (Vec<Request>, Vec<Reply>) = batch.into_iter().map(|j| (j.request, j.reply)).unzip();
    metrics.in_flight.store(requests.len() as i64, Ordering::Relaxed);
    // Bytes of text sent per job, and bytes the current run has produced: a job run again after
    // its batch panicked sends only what goes past the first run.
    let mut sent = vec![0usize; jobs.len()];
    let mut results = run_catching(runner, &requests, &jobs, &mut sent, stopping, |i| i);
    if requests.len() > 1 && results.iter().all(|r| matches!(r, Err(JobError::Panicked(_)))) {
        // One request may have made the batch panic: run each alone so only that one fails.
        results = (0..requests.len())
            .map(|i| {
                run_catching(runner, &requests[i..=i], &jobs, &mut sent, stopping, |_| i)
                    .pop()
                    .unwrap_or_else(|| Err(JobError::Panicked("no result".into())))
            })
            .collect();
    }
    metrics.in_flight.store(0, Ordering::Relaxed);
    let generated: usize = results.iter().filter_map(|r| r.as_ref().ok()).map(|r| r.token_ids.len()).sum();
    let rate = results
        .iter()
        .find_map(|r| r.as_ref().ok())
        .and_then(|r| r.timings.decode_tokens_per_s(jobs.len()));
    metrics.record_batch(jobs.len(), generated, rate);
    for (job, mut result) in jobs.iter().zip(results) {
        if matches!(result, Err(JobError::Request(RequestError::Stopped))) {
            if job.cancelled.load(Ordering::Relaxed) {
                metrics.record_cancelled(CancelledAt::Running);
            } else {
                // Not its client: the shutdown stopped it.
                result = Err(JobError::ShutDown);
            }
        }
        let _ = job.events.send(Event::Done(Box::new(result)));
    }
}

/// Runs `requests` (whose row `k` is job `job_of(k)`), a panic becoming every row's error.
fn run_catching(
    runner: &mut impl Runner,
    requests: &[Request],
    jobs: &[Reply],
    sent: &mut [usize],
    stopping: &AtomicBool,
    job_of: impl Fn(usize) -> usize,
) -> Vec<Result<Response, JobError>> {
    let mut produced = vec![0usize; requests.len()];
    let mut on_token = |row: usize, delta: &str| -> bool {
        let (Some(job), Some(done)) = (jobs.get(job_of(row)), produced.get_mut(row)) else {
            return true;
        };
        if job.cancelled.load(Ordering::Relaxed) || stopping.load(Ordering::Relaxed) {
            return false;
        }
        let before = *done;
        *done += delta.len();
        let already = &mut sent[job_of(row)];
        if job.stream && *done > *already {
            if let Some(new) = delta.get(already.saturating_sub(before)..) {
                let _ = job.events.send(Event::Token(new.to_string()));
                *already = *done;
            }
        }
        true
    };
    match panic::catch_unwind(AssertUnwindSafe(|| runner.run(requests, &mut on_token))) {
        Ok(results) => {
            let mut results: Vec<_> = results.into_iter().map(|r| r.map_err(JobError::from)).collect();
            results.resize_with(requests.len(), || {
                Err(JobError::Panicked("the runner returned fewer results than requests".into()))
            });
            results
        }
        Err(payload) => {
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".into());
            requests.iter().map(|_| Err(JobError::Panicked(message.clone()))).collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;
    use crate::generate::Timings;
    use crate::pipeline::ImageInput;

    fn request(prompt: &str) -> Request {
        Request::new(ImageInput::Bytes(Vec::new()), prompt)
    }

    fn response(text: &str) -> Response {
        Response {
            text: text.into(),
            token_ids: vec![1; text.len()],
            detections: Vec::new(),
            segments: Vec::new(),
            malformed_objects: 0,
            finished: true,
            image_size: [1, 1],
            prompt_tokens: 1,
            timings: Timings::default(),
            image: None,
        }
    }

    fn block_on<T>(future: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(future)
    }

    /// A runner that echoes prompts as text, streams them a character at a time, records batch
    /// sizes and, after streaming, panics when a prompt of the batch is "panic".
    fn echo(sizes: Arc<Mutex<Vec<usize>>>) -> impl Runner {
        move |requests: &[Request], on_token: &mut dyn FnMut(usize, &str) -> bool| {
            sizes.lock().unwrap().push(requests.len());
            let results = requests
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    for end in 1..=r.prompt.len() {
                        if !on_token(i, &r.prompt[end - 1..end]) {
                            return Err(RequestError::Stopped);
                        }
                    }
                    Ok(response(&r.prompt))
                })
                .collect();
            assert!(requests.iter().all(|r| r.prompt != "panic"), "asked to panic");
            results
        }
    }

    /// A runner that waits for `release` before its first batch, so the jobs queued meanwhile
    /// form one batch.
    fn gated(inner: impl Runner) -> (impl Runner, std::sync::mpsc::Sender<()>) {
        let (release, gate) = std::sync::mpsc::channel::<()>();
        let gate = Mutex::new(gate);
        let mut inner = inner;
        let mut first = true;
        let runner = move |requests: &[Request], on_token: &mut dyn FnMut(usize, &str) -> bool| {
            if std::mem::take(&mut first) {
                gate.lock().unwrap().recv().unwrap();
            }
            inner.run(requests, on_token)
        };
        (runner, release)
    }

    fn collect(mut ticket: Ticket) -> (Vec<String>, Result<Response, JobError>) {
        let mut deltas = Vec::new();
        let answer = block_on(async {
            loop {
                match ticket.next().await {
                    Event::Token(delta) => deltas.push(delta),
                    Event::Done(result) => return *result,
                }
            }
        });
        (deltas, answer)
    }

    #[test]
    fn a_request_that_panics_its_batch_fails_alone_and_streams_are_not_repeated() {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let metrics = Arc::new(Metrics::new(3));
        let (runner, release) = gated(echo(Arc::clone(&sizes)));
        let (queue, worker) = start(runner, 3, 8, Arc::clone(&metrics)).unwrap();
        // The worker takes "hold" and waits; the next three are queued and run together.
        let hold = queue.submit(request("hold"), false).unwrap();
        wait_until_queue_is_empty(&metrics);
        let tickets: Vec<Ticket> = ["ab", "panic", "cd"]
            .iter()
            .map(|p| queue.submit(request(p), true).unwrap())
            .collect();
        release.send(()).unwrap();
        assert_eq!(block_on(hold.wait()).unwrap().text, "hold");
        let mut outcomes: Vec<_> = tickets.into_iter().map(collect).collect();
        let (cd_deltas, cd) = outcomes.pop().unwrap();
        let (_, panicked) = outcomes.pop().unwrap();
        let (ab_deltas, ab) = outcomes.pop().unwrap();
        assert!(
            matches!(&panicked, Err(JobError::Panicked(m)) if m.contains("asked to panic")),
            "{panicked:?}"
        );
        assert_eq!(
            (ab.unwrap().text, ab_deltas),
            ("ab".to_string(), vec!["a".to_string(), "b".to_string()])
        );
        assert_eq!(
            (cd.unwrap().text, cd_deltas),
            ("cd".to_string(), vec!["c".to_string(), "d".to_string()])
        );
        drop(queue);
        worker.join().unwrap();
        // The batch of three, then each of them alone.
        assert_eq!(*sizes.lock().unwrap(), [1, 3, 1, 1, 1]);
    }

    #[test]
    fn jobs_waiting_together_run_as_one_batch_up_to_the_limit() {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let metrics = Arc::new(Metrics::new(2));
        // Hold the worker until three jobs wait: a runner that blocks on its first call.
        let (runner, release) = gated(echo(Arc::clone(&sizes)));
        let (queue, worker) = start(runner, 2, 8, Arc::clone(&metrics)).unwrap();
        let tickets: Vec<Ticket> = ["a", "bb", "ccc", "dddd"]
            .iter()
            .map(|p| queue.submit(request(p), false).unwrap())
            .collect();
        release.send(()).unwrap();
        let texts: Vec<String> = tickets.into_iter().map(|t| block_on(t.wait()).unwrap().text).collect();
        assert_eq!(texts, ["a", "bb", "ccc", "dddd"]);
        drop(queue);
        worker.join().unwrap();
        let sizes = sizes.lock().unwrap().clone();
        assert_eq!(sizes.iter().sum::<usize>(), 4);
        assert!(sizes.iter().all(|&n| n <= 2), "{sizes:?}");
        assert!(sizes.contains(&2), "{sizes:?}");
    }

    #[test]
    fn a_panicking_batch_fails_its_jobs_and_the_worker_goes_on() {
        let metrics = Arc::new(Metrics::new(1));
        let (queue, worker) = start(echo(Arc::default()), 1, 8, metrics).unwrap();
        let failed = block_on(queue.submit(request("panic"), false).unwrap().wait());
        assert!(
            matches!(&failed, Err(JobError::Panicked(m)) if m.contains("asked to panic")),
            "{failed:?}"
        );
        let ok = block_on(queue.submit(request("fine"), false).unwrap().wait()).unwrap();
        assert_eq!(ok.text, "fine");
        drop(queue);
        worker.join().unwrap();
    }

    #[test]
    fn streaming_jobs_get_each_tokens_addition_then_the_answer() {
        let metrics = Arc::new(Metrics::new(1));
        let (queue, worker) = start(echo(Arc::default()), 1, 8, metrics).unwrap();
        let (deltas, answer) = collect(queue.submit(request("abc"), true).unwrap());
        assert_eq!(deltas, ["a", "b", "c"]);
        assert_eq!(answer.unwrap().text, "abc");
        drop(queue);
        worker.join().unwrap();
    }

    fn wait_until_queue_is_empty(metrics: &Metrics) {
        while metrics.queue_depth.load(Ordering::Relaxed) != 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_dropped_ticket_is_skipped_in_the_queue_and_a_full_queue_refuses() {
        let metrics = Arc::new(Metrics::new(1));
        let (release, gate) = std::sync::mpsc::channel::<()>();
        let gate = Mutex::new(gate);
        let mut inner = echo(Arc::default());
        let runner = move |requests: &[Request], on_token: &mut dyn FnMut(usize, &str) -> bool| {
            if requests[0].prompt == "hold" {
                gate.lock().unwrap().recv().unwrap();
            }
            inner.run(requests, on_token)
        };
        let (queue, worker) = start(runner, 1, 1, Arc::clone(&metrics)).unwrap();
        let hold = queue.submit(request("hold"), false).unwrap();
        // The worker took "hold" off the queue, so the next job is the one queued.
        wait_until_queue_is_empty(&metrics);
        let gone = queue.submit(request("gone"), false).unwrap();
        assert!(queue.submit(request("refused"), false).is_err(), "a queue of 1 takes one job");
        drop(gone);
        release.send(()).unwrap();
        assert_eq!(block_on(hold.wait()).unwrap().text, "hold");
        wait_until_queue_is_empty(&metrics);
        let after = block_on(queue.submit(request("after"), false).unwrap().wait()).unwrap();
        assert_eq!(after.text, "after");
        drop(queue);
        worker.join().unwrap();
        let text = metrics.render();
        assert!(text.contains("paligemma_cancelled_total{stage=\"queued\"} 1\n"), "{text}");
        assert!(text.contains("paligemma_client_disconnects_total 1\n"), "{text}");
    }
}
