//! Continuous batching: handlers put jobs on a bounded queue; one worker thread owns the model
//! (the pipeline needs `&mut`) and runs a loop of decode steps over `--max-batch` slots. Before
//! each step it moves queued jobs into free slots (each joins with its own vision and prefill
//! run); each step gives every running job one token; a job leaves its slot the moment it ends,
//! so a short answer never waits for a long one and a new request never waits for a batch. The
//! pipeline keeps every row's positions and mask its own, so each answer is the one the request
//! gets alone, whenever it joined.
//!
//! `--batching static` is the earlier policy, kept to compare with: jobs join only when no slot
//! is busy (the worker blocks for one, takes every job already waiting up to the batch size),
//! and the batch runs until its last row ends.
//!
//! A job carries a cancel flag that its [`Ticket`] sets when dropped, which is what happens when
//! the client goes away (axum drops the handler future, hyper the SSE body). The worker skips
//! cancelled jobs in the queue and stops their rows before the next step.

use std::collections::VecDeque;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::pipeline::{Pipeline, Request, RequestError, RequestId, Response, Update};
use crate::serve::metrics::{CancelledAt, Metrics};

/// What the worker drives: the [`Pipeline`] in the server, a stand-in in tests. See
/// [`Pipeline::join`], [`Pipeline::step`] and [`Pipeline::cancel`].
pub trait Runner: Send + 'static {
    /// Most jobs the model can run at once, if it has a limit of its own.
    fn capacity(&self) -> Option<usize>;
    fn join(&mut self, request: &Request) -> Result<Update, RequestError>;
    fn step(&mut self) -> Vec<Update>;
    fn cancel(&mut self, id: RequestId);
    /// Forgets every running job (after a panic left their state unknown).
    fn clear(&mut self);
}

impl Runner for Pipeline {
    fn capacity(&self) -> Option<usize> {
        Pipeline::capacity(self)
    }

    fn join(&mut self, request: &Request) -> Result<Update, RequestError> {
        Pipeline::join(self, request)
    }

    fn step(&mut self) -> Vec<Update> {
        Pipeline::step(self)
    }

    fn cancel(&mut self, id: RequestId) {
        Pipeline::cancel(self, id)
    }

    fn clear(&mut self) {
        Pipeline::cancel_all(self)
    }
}

/// When queued jobs may join.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Batching {
    /// Into any free slot, before every step.
    Continuous,
    /// Only when every slot is free; the batch then runs until its last row ends.
    Static,
}

/// Why a job has no response.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Request(#[from] RequestError),
    /// The job panicked the worker while running alone (after a step with others panicked); the
    /// worker goes on with the other jobs.
    #[error("the model worker panicked while running this request: {0}")]
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
    queued: Instant,
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
    /// `--max-queue`: jobs that may wait while every slot is busy.
    max_queue: usize,
    slots: usize,
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
            queued: Instant::now(),
        };
        // Jobs bound for a free slot do not count against --max-queue: the worker takes them one
        // join (one prefill) at a time, and a burst must not be refused while slots are free.
        let busy = usize::try_from(self.metrics.slots_in_use.load(Ordering::Relaxed)).unwrap_or(0);
        let room = self.max_queue + self.slots.saturating_sub(busy);
        // Counted before sending so the worker's decrement never comes first.
        let waiting = self.metrics.queue_depth.fetch_add(1, Ordering::Relaxed);
        if usize::try_from(waiting).unwrap_or(0) >= room {
            self.metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
            return Err(SubmitError::Full);
        }
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

    /// Ends every job queued or running as [`JobError::ShutDown`] (rows stop before their next
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

/// Starts the worker thread with `slots` slots (at most the runner's capacity). It runs until every [`Queue`] clone is dropped
/// and the queue is drained, so joining it after the HTTP server stopped finishes the queued jobs.
pub fn start(
    runner: impl Runner,
    slots: usize,
    batching: Batching,
    max_queue: usize,
    metrics: Arc<Metrics>,
) -> std::io::Result<(Queue, JoinHandle<()>)> {
    let slots = slots.max(1);
    let (jobs, queue) = mpsc::sync_channel(max_queue + slots);
    let worker_metrics = Arc::clone(&metrics);
    let stopping = Arc::new(AtomicBool::new(false));
    let worker_stopping = Arc::clone(&stopping);
    let handle = std::thread::Builder::new().name("paligemma-worker".into()).spawn(move || {
        Worker {
            runner,
            queue,
            slots,
            batching,
            metrics: worker_metrics,
            stopping: worker_stopping,
            running: Vec::new(),
            alone: VecDeque::new(),
        }
        .work()
    })?;
    let queue = Queue {
        jobs,
        metrics,
        max_queue,
        slots,
        stopping,
    };
    Ok((queue, handle))
}

/// A job in a slot.
struct Running {
    id: RequestId,
    job: Job,
    /// Bytes of text the current run produced, and bytes sent: a job run again alone after a
    /// panic sends only what goes past what it had sent.
    produced: usize,
    sent: usize,
}

struct Worker<R: Runner> {
    runner: R,
    queue: Receiver<Job>,
    slots: usize,
    batching: Batching,
    metrics: Arc<Metrics>,
    stopping: Arc<AtomicBool>,
    running: Vec<Running>,
    /// Jobs to run again one at a time, each alone, because a step they shared panicked; with
    /// the bytes each had sent.
    alone: VecDeque<(Job, usize)>,
}

impl<R: Runner> Worker<R> {
    fn work(mut self) {
        loop {
            if !self.admit() {
                return;
            }
            self.drop_cancelled();
            if self.running.is_empty() {
                continue;
            }
            self.step();
        }
    }

    /// Moves jobs into free slots, as the policy allows; `false` once the queue is closed and
    /// nothing runs.
    fn admit(&mut self) -> bool {
        if self.running.is_empty() {
            if let Some((job, sent)) = self.alone.pop_front() {
                self.join(job, sent);
                self.metrics.slots_in_use.store(self.running.len() as i64, Ordering::Relaxed);
                return true;
            }
        } else if !self.alone.is_empty() || self.batching == Batching::Static {
            return true;
        }
        loop {
            // Every job that fits a free slot leaves the queue before any of them joins: a join
            // runs a prefill, and the queue must not fill up behind jobs that have a slot.
            let mut taken = Vec::new();
            while self.running.len() + taken.len() < self.slots {
                let job = if self.running.is_empty() && taken.is_empty() {
                    match self.queue.recv() {
                        Ok(job) => job,
                        Err(_) => return false,
                    }
                } else {
                    match self.queue.try_recv() {
                        Ok(job) => job,
                        Err(_) => break,
                    }
                };
                self.metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
                if job.reply.cancelled.load(Ordering::Relaxed) {
                    self.metrics.record_cancelled(CancelledAt::Queued);
                } else if self.stopping.load(Ordering::Relaxed) {
                    let _ = job.reply.events.send(Event::Done(Box::new(Err(JobError::ShutDown))));
                } else {
                    self.metrics.record_queued(job.queued.elapsed());
                    taken.push(job);
                }
            }
            if taken.is_empty() && !self.running.is_empty() {
                return true;
            }
            // Taken jobs hold their slots from now on, for the queue's room (Queue::submit).
            let holding = self.running.len() + taken.len();
            self.metrics.slots_in_use.store(holding as i64, Ordering::Relaxed);
            for job in taken {
                self.join(job, 0);
            }
            self.metrics.slots_in_use.store(self.running.len() as i64, Ordering::Relaxed);
            // Slots that jobs ended by their first token left free take more waiting jobs (static
            // batching too: this round began with every slot free).
            if self.running.len() >= self.slots {
                return true;
            }
        }
    }

    /// Runs `job`'s join (its vision and prefill); it takes a slot unless its first token ended it.
    fn join(&mut self, job: Job, sent: usize) {
        match panic::catch_unwind(AssertUnwindSafe(|| self.runner.join(&job.request))) {
            Ok(Ok(update)) => {
                self.running.push(Running {
                    id: update.id,
                    job,
                    produced: 0,
                    sent,
                });
                self.dispatch(update);
            }
            Ok(Err(e)) => {
                let _ = job.reply.events.send(Event::Done(Box::new(Err(e.into()))));
            }
            Err(payload) => {
                let _ = job
                    .reply
                    .events
                    .send(Event::Done(Box::new(Err(JobError::Panicked(message(payload))))));
            }
        }
    }

    /// Stops the rows of jobs whose client went away, or all of them past the shutdown grace.
    fn drop_cancelled(&mut self) {
        let stopping = self.stopping.load(Ordering::Relaxed);
        let mut k = 0;
        while k < self.running.len() {
            let cancelled = self.running[k].job.reply.cancelled.load(Ordering::Relaxed);
            if cancelled || stopping {
                let gone = self.running.remove(k);
                self.runner.cancel(gone.id);
                if cancelled {
                    self.metrics.record_cancelled(CancelledAt::Running);
                } else {
                    let _ = gone.job.reply.events.send(Event::Done(Box::new(Err(JobError::ShutDown))));
                }
            } else {
                k += 1;
            }
        }
        self.metrics.slots_in_use.store(self.running.len() as i64, Ordering::Relaxed);
    }

    fn step(&mut self) {
        let rows = self.running.len();
        let started = Instant::now();
        match panic::catch_unwind(AssertUnwindSafe(|| self.runner.step())) {
            Ok(updates) => {
                self.metrics.record_step(rows, started.elapsed());
                for update in updates {
                    self.dispatch(update);
                }
            }
            Err(payload) => {
                // The runner's state is unknown: start over, each job alone, so that only a job
                // that panics alone fails.
                self.runner.clear();
                let running = std::mem::take(&mut self.running);
                if let [one] = running.as_slice() {
                    let failed = Err(JobError::Panicked(message(payload)));
                    let _ = one.job.reply.events.send(Event::Done(Box::new(failed)));
                } else {
                    self.alone.extend(running.into_iter().map(|r| (r.job, r.sent)));
                }
            }
        }
        self.metrics.slots_in_use.store(self.running.len() as i64, Ordering::Relaxed);
    }

    /// Sends `update`'s text (past what was sent) and, at the end, the answer.
    fn dispatch(&mut self, update: Update) {
        let Some(k) = self.running.iter().position(|r| r.id == update.id) else {
            return;
        };
        let running = &mut self.running[k];
        let before = running.produced;
        running.produced += update.delta.len();
        if running.job.reply.stream && running.produced > running.sent {
            if let Some(new) = update.delta.get(running.sent.saturating_sub(before)..) {
                let _ = running.job.reply.events.send(Event::Token(new.to_string()));
                running.sent = running.produced;
            }
        }
        if let Some(result) = update.done {
            let done = self.running.remove(k);
            // Counted before the answer goes out: a client reading /metrics after its answer sees it.
            self.metrics.slots_in_use.store(self.running.len() as i64, Ordering::Relaxed);
            if let Ok(response) = &result {
                self.metrics.record_generated(response.token_ids.len());
            }
            let result = result.map_err(JobError::from);
            let _ = done.job.reply.events.send(Event::Done(Box::new(result)));
        }
    }
}

fn message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into())
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;
    use crate::engine::Timings;
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

    /// A stand-in engine: a request's answer is its prompt, one character per token (the first
    /// at its join). It records the prompts decoded at each step, panics in a step that holds a
    /// "panic" prompt, and blocks the first step that holds a "hold" prompt until released.
    struct Echo {
        live: Vec<(RequestId, String, usize)>,
        next: u64,
        steps: Steps,
        gate: Option<Mutex<std::sync::mpsc::Receiver<()>>>,
    }

    /// The prompts of each step's rows.
    type Steps = Arc<Mutex<Vec<Vec<String>>>>;

    fn echo() -> (Echo, Steps, std::sync::mpsc::Sender<()>) {
        let steps = Arc::new(Mutex::new(Vec::new()));
        let (release, gate) = std::sync::mpsc::channel();
        let runner = Echo {
            live: Vec::new(),
            next: 0,
            steps: Arc::clone(&steps),
            gate: Some(Mutex::new(gate)),
        };
        (runner, steps, release)
    }

    impl Echo {
        fn update(&mut self, k: usize) -> Update {
            let (id, prompt, done) = &mut self.live[k];
            let delta = prompt[*done..*done + 1].to_string();
            *done += 1;
            let (id, finished) = (*id, *done == prompt.len());
            let answer = finished.then(|| Ok(response(&self.live.remove(k).1)));
            Update { id, delta, done: answer }
        }
    }

    impl Runner for Echo {
        fn capacity(&self) -> Option<usize> {
            None
        }

        fn join(&mut self, request: &Request) -> Result<Update, RequestError> {
            if request.prompt == "hold-join" {
                if let Some(gate) = self.gate.take() {
                    gate.lock().unwrap().recv().unwrap();
                }
            }
            self.next += 1;
            self.live.push((RequestId(self.next), request.prompt.clone(), 0));
            Ok(self.update(self.live.len() - 1))
        }

        fn step(&mut self) -> Vec<Update> {
            let prompts: Vec<String> = self.live.iter().map(|l| l.1.clone()).collect();
            self.steps.lock().unwrap().push(prompts.clone());
            if prompts.iter().any(|p| p == "hold") {
                if let Some(gate) = self.gate.take() {
                    gate.lock().unwrap().recv().unwrap();
                }
            }
            assert!(prompts.iter().all(|p| p != "panic"), "asked to panic");
            let ids: Vec<RequestId> = self.live.iter().map(|l| l.0).collect();
            ids.into_iter()
                .map(|id| {
                    let k = self.live.iter().position(|l| l.0 == id).unwrap();
                    self.update(k)
                })
                .collect()
        }

        fn cancel(&mut self, id: RequestId) {
            self.live.retain(|l| l.0 != id);
        }

        fn clear(&mut self) {
            self.live.clear();
        }
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

    fn wait_until_queue_is_empty(metrics: &Metrics) {
        while metrics.queue_depth.load(Ordering::Relaxed) != 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_request_that_panics_a_step_fails_alone_and_streams_are_not_repeated() {
        let (runner, steps, release) = echo();
        let metrics = Arc::new(Metrics::new(4));
        let (queue, worker) = start(runner, 4, Batching::Static, 8, Arc::clone(&metrics)).unwrap();
        // The worker takes "hold" and waits in its first step; the next three queue and join
        // together once it has ended.
        let hold = queue.submit(request("hold"), false).unwrap();
        wait_until_queue_is_empty(&metrics);
        let tickets: Vec<Ticket> = ["abc", "panic", "cd"]
            .iter()
            .map(|p| queue.submit(request(p), true).unwrap())
            .collect();
        release.send(()).unwrap();
        assert_eq!(block_on(hold.wait()).unwrap().text, "hold");
        let mut outcomes: Vec<_> = tickets.into_iter().map(collect).collect();
        let (cd_deltas, cd) = outcomes.pop().unwrap();
        let (_, panicked) = outcomes.pop().unwrap();
        let (abc_deltas, abc) = outcomes.pop().unwrap();
        assert!(
            matches!(&panicked, Err(JobError::Panicked(m)) if m.contains("asked to panic")),
            "{panicked:?}"
        );
        assert_eq!((abc.unwrap().text, abc_deltas.concat()), ("abc".to_string(), "abc".to_string()));
        assert_eq!((cd.unwrap().text, cd_deltas.concat()), ("cd".to_string(), "cd".to_string()));
        assert_eq!(abc_deltas, ["a", "b", "c"], "each character once, across the rerun");
        drop(queue);
        worker.join().unwrap();
        // The shared step panicked; then each ran alone: "abc" for two steps, "panic" alone
        // (which panics again), "cd" for one step.
        let steps = steps.lock().unwrap().clone();
        let shared = vec!["abc".to_string(), "panic".into(), "cd".into()];
        let at = steps.iter().position(|s| *s == shared).expect("a step of the three");
        assert_eq!(
            steps[at + 1..],
            [vec!["abc".to_string()], vec!["abc".into()], vec!["panic".into()], vec!["cd".into()]]
        );
    }

    #[test]
    fn a_job_joins_the_running_batch_at_the_next_step_and_a_short_one_leaves_first() {
        let (runner, steps, release) = echo();
        let metrics = Arc::new(Metrics::new(2));
        let (queue, worker) = start(runner, 2, Batching::Continuous, 8, Arc::clone(&metrics)).unwrap();
        let hold = queue.submit(request("hold"), true).unwrap();
        wait_until_queue_is_empty(&metrics);
        // Queued while "hold" is mid-answer: each takes the free slot as soon as there is one.
        let tickets: Vec<Ticket> = ["ab", "c", "defgh"]
            .iter()
            .map(|p| queue.submit(request(p), false).unwrap())
            .collect();
        release.send(()).unwrap();
        let texts: Vec<String> = tickets.into_iter().map(|t| block_on(t.wait()).unwrap().text).collect();
        assert_eq!(texts, ["ab", "c", "defgh"]);
        assert_eq!(block_on(hold.wait()).unwrap().text, "hold");
        drop(queue);
        worker.join().unwrap();
        let steps = steps.lock().unwrap().clone();
        assert!(steps.iter().all(|s| s.len() <= 2), "{steps:?}");
        // "ab" joined "hold" before hold ended ...
        assert!(steps.contains(&vec!["hold".to_string(), "ab".into()]), "{steps:?}");
        // ... and "defgh" ran beside "hold" after "ab" and "c" (one token each) had left.
        assert!(steps.contains(&vec!["hold".to_string(), "defgh".into()]), "{steps:?}");
        assert_eq!(metrics.slots_in_use.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn static_batching_takes_waiting_jobs_together_and_none_while_a_batch_runs() {
        let (runner, steps, release) = echo();
        let metrics = Arc::new(Metrics::new(2));
        let (queue, worker) = start(runner, 2, Batching::Static, 8, Arc::clone(&metrics)).unwrap();
        let hold = queue.submit(request("hold"), false).unwrap();
        wait_until_queue_is_empty(&metrics);
        let tickets: Vec<Ticket> = ["ab", "cd", "ef"]
            .iter()
            .map(|p| queue.submit(request(p), false).unwrap())
            .collect();
        release.send(()).unwrap();
        let texts: Vec<String> = tickets.into_iter().map(|t| block_on(t.wait()).unwrap().text).collect();
        assert_eq!(texts, ["ab", "cd", "ef"]);
        assert_eq!(block_on(hold.wait()).unwrap().text, "hold");
        drop(queue);
        worker.join().unwrap();
        let steps = steps.lock().unwrap().clone();
        assert!(steps.iter().all(|s| !(s.contains(&"hold".to_string()) && s.len() > 1)), "{steps:?}");
        assert!(steps.contains(&vec!["ab".to_string(), "cd".into()]), "{steps:?}");
        assert!(steps.contains(&vec!["ef".to_string()]), "{steps:?}");
    }

    #[test]
    fn a_burst_that_fits_the_free_slots_is_never_refused_for_a_full_queue() {
        let (runner, _, release) = echo();
        let metrics = Arc::new(Metrics::new(4));
        let (queue, worker) = start(runner, 4, Batching::Continuous, 1, Arc::clone(&metrics)).unwrap();
        // The worker is inside the first job's join (its prefill) while the others arrive.
        let first = queue.submit(request("hold-join"), false).unwrap();
        wait_until_queue_is_empty(&metrics);
        let others: Vec<Ticket> = ["ab", "cd", "ef"]
            .iter()
            .map(|p| queue.submit(request(p), false).unwrap())
            .collect();
        assert!(
            queue.submit(request("one too many"), false).is_ok(),
            "--max-queue 1 on top of the free slots"
        );
        assert!(matches!(queue.submit(request("refused"), false), Err(SubmitError::Full)));
        release.send(()).unwrap();
        assert_eq!(block_on(first.wait()).unwrap().text, "hold-join");
        let texts: Vec<String> = others.into_iter().map(|t| block_on(t.wait()).unwrap().text).collect();
        assert_eq!(texts, ["ab", "cd", "ef"]);
        drop(queue);
        worker.join().unwrap();
    }

    #[test]
    fn a_job_that_panics_alone_fails_and_the_worker_goes_on() {
        let (runner, _, _) = echo();
        let metrics = Arc::new(Metrics::new(1));
        let (queue, worker) = start(runner, 1, Batching::Continuous, 8, metrics).unwrap();
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
        let (runner, _, _) = echo();
        let metrics = Arc::new(Metrics::new(1));
        let (queue, worker) = start(runner, 1, Batching::Continuous, 8, metrics).unwrap();
        let (deltas, answer) = collect(queue.submit(request("abc"), true).unwrap());
        assert_eq!(deltas, ["a", "b", "c"]);
        assert_eq!(answer.unwrap().text, "abc");
        drop(queue);
        worker.join().unwrap();
    }

    #[test]
    fn a_dropped_ticket_is_skipped_in_the_queue_or_stopped_in_its_slot_and_a_full_queue_refuses() {
        let (runner, steps, release) = echo();
        let metrics = Arc::new(Metrics::new(1));
        let (queue, worker) = start(runner, 1, Batching::Continuous, 1, Arc::clone(&metrics)).unwrap();
        let hold = queue.submit(request("hold"), false).unwrap();
        // The worker took "hold" off the queue, so the next job is the one queued.
        wait_until_queue_is_empty(&metrics);
        let gone = queue.submit(request("gone"), false).unwrap();
        assert!(queue.submit(request("refused"), false).is_err(), "a queue of 1 takes one job");
        drop(gone);
        drop(hold);
        release.send(()).unwrap();
        wait_until_queue_is_empty(&metrics);
        let after = block_on(queue.submit(request("after"), false).unwrap().wait()).unwrap();
        assert_eq!(after.text, "after");
        drop(queue);
        worker.join().unwrap();
        let text = metrics.render();
        assert!(text.contains("paligemma_cancelled_total{stage=\"queued\"} 1\n"), "{text}");
        assert!(text.contains("paligemma_cancelled_total{stage=\"running\"} 1\n"), "{text}");
        assert!(text.contains("paligemma_client_disconnects_total 2\n"), "{text}");
        // "hold" stopped after its one blocked step; "gone" never ran.
        let steps = steps.lock().unwrap().clone();
        assert_eq!(steps.iter().filter(|s| s.contains(&"hold".to_string())).count(), 1, "{steps:?}");
        assert!(!steps.iter().any(|s| s.contains(&"gone".to_string())), "{steps:?}");
    }
}
