//! The one GPU worker: a thread that owns the [`Engine`] and the conversations' sessions, and
//! answers queued jobs one at a time.
//!
//! Sessions are matched by token prefix: a request whose conversation continues a kept session
//! (same image, same settings, its whole first prompt and more) reuses that session's KV cache;
//! otherwise a new session starts (its image may still come from the engine's image cache). At
//! most `max_sessions` are kept, least recently used dropped first.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;

use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedSender;

use crate::generate::{Conversation, GenerateOutput, Session, TurnSettings};
use crate::model::llava::Engine;

use super::api::ApiError;

/// One request for the worker.
pub struct Job {
    pub conversation: Conversation,
    pub settings: TurnSettings,
    pub stop: Vec<String>,
    /// `top_logprobs`: how many of the engine's top log-probabilities to report.
    pub top_logprobs: usize,
    /// Set when the client goes away: the answer stops before its next token.
    pub cancel: Arc<AtomicBool>,
    pub events: UnboundedSender<Event>,
}

/// What the worker reports about a job, in order: text pieces, then one end.
pub enum Event {
    Text(String),
    Done(Box<Finished>),
    Failed(ApiError),
}

pub struct Finished {
    pub output: GenerateOutput,
    /// The answer, cut before a stop string.
    pub text: String,
    /// "stop" (end of sequence or a stop string) or "length".
    pub finish_reason: &'static str,
    /// OpenAI's `logprobs` object, when asked for.
    pub logprobs: Option<Value>,
}

/// Counters `/health` reports (tests and `bench serve` read them).
#[derive(Default)]
pub struct Stats {
    pub completed: AtomicU64,
    pub failed: AtomicU64,
    /// Answers stopped because their client disconnected.
    pub cancelled: AtomicU64,
    /// Turns that reused a session's KV cache.
    pub session_hits: AtomicU64,
    pub queued: AtomicU64,
    /// GPU bytes alive (the engine's allocation tracker) after the last answered request.
    pub gpu_live_bytes: AtomicU64,
}

pub struct Worker {
    engine: Engine,
    /// Kept sessions, most recently used last.
    sessions: Vec<Session>,
    max_sessions: usize,
    stats: Arc<Stats>,
}

impl Worker {
    pub fn new(engine: Engine, max_sessions: usize, stats: Arc<Stats>) -> Self {
        Self {
            engine,
            sessions: Vec::new(),
            max_sessions,
            stats,
        }
    }

    /// Answer jobs until every sender is gone (the server shut down).
    pub fn run(mut self, jobs: Receiver<Job>) {
        while let Ok(job) = jobs.recv() {
            self.stats.queued.fetch_sub(1, Ordering::Relaxed);
            self.answer(job);
        }
    }

    fn answer(&mut self, job: Job) {
        if job.cancel.load(Ordering::Relaxed) {
            self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut session = self.take_session(&job.conversation, &job.settings);
        let mut text = StopText::new(&job.stop);
        let events = &job.events;
        let cancel = &job.cancel;
        let result = self.engine.turn(
            &mut session,
            &job.conversation,
            &job.settings,
            Some(cancel),
            |piece| {
                let (emit, stopped) = text.push(piece);
                // A receiver that is gone is a client that is gone.
                if (!emit.is_empty() && events.send(Event::Text(emit)).is_err()) || stopped {
                    cancel.store(true, Ordering::Relaxed);
                }
            },
        );
        let event = match result {
            Ok(output) => {
                if output.turn.reused_tokens > 0 {
                    self.stats.session_hits.fetch_add(1, Ordering::Relaxed);
                }
                let finish_reason = match (text.stopped, output.stop_reason.as_str()) {
                    (true, _) | (false, "eos") => "stop",
                    _ => "length",
                };
                if output.stop_reason == "cancelled" && !text.stopped {
                    self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.stats.completed.fetch_add(1, Ordering::Relaxed);
                }
                let rest = text.finish();
                if !rest.is_empty() {
                    let _ = events.send(Event::Text(rest));
                }
                let logprobs = job
                    .settings
                    .logprobs
                    .map(|_| self.logprobs(&output, job.top_logprobs));
                Event::Done(Box::new(Finished {
                    text: text.text,
                    finish_reason,
                    logprobs,
                    output,
                }))
            }
            Err(e) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                Event::Failed(ApiError::from_engine(&e))
            }
        };
        let _ = job.events.send(event);
        self.keep_session(session);
        let live = self.engine.gpu.memory_stats().live.total();
        self.stats.gpu_live_bytes.store(live, Ordering::Relaxed);
    }

    /// OpenAI's `logprobs.content`: per generated token its text, its log-probability (null
    /// when sampling chose a token outside the top ones the engine reported) and the `top`
    /// most likely tokens.
    fn logprobs(&self, output: &GenerateOutput, top: usize) -> Value {
        // A token as decoded text and its bytes (a byte-fallback token may be part of a
        // character: its text is then a replacement character, its bytes exact).
        let token = |id: u32| {
            let bytes = self.engine.tokenizer.token_bytes(id);
            (String::from_utf8_lossy(&bytes).into_owned(), bytes)
        };
        let steps = output.logprobs.as_deref().unwrap_or(&[]);
        let content: Vec<Value> = output
            .generated_ids
            .iter()
            .zip(steps)
            .map(|(&id, step)| {
                let chosen = step.iter().find(|t| t.id == id).map(|t| t.logprob);
                let tops: Vec<Value> = step
                    .iter()
                    .take(top)
                    .map(|t| {
                        let (text, bytes) = token(t.id);
                        json!({"token": text, "bytes": bytes, "logprob": t.logprob})
                    })
                    .collect();
                let (text, bytes) = token(id);
                json!({"token": text, "bytes": bytes, "logprob": chosen, "top_logprobs": tops})
            })
            .collect();
        json!({ "content": content })
    }

    /// The kept session that continues `conversation` with the longest reused prefix (taken out
    /// of the pool while it works), or a new one.
    fn take_session(&mut self, conversation: &Conversation, settings: &TurnSettings) -> Session {
        let best = self
            .sessions
            .iter()
            .enumerate()
            .filter_map(|(i, s)| Some((i, s.continues(&self.engine, conversation, settings)?)))
            .max_by_key(|&(_, reused)| reused);
        match best {
            Some((i, _)) => self.sessions.remove(i),
            None => Session::new(),
        }
    }

    fn keep_session(&mut self, session: Session) {
        if session.tokens().is_empty() {
            return;
        }
        self.sessions.push(session);
        if self.sessions.len() > self.max_sessions {
            self.sessions.remove(0);
        }
    }
}

/// The answer's text with OpenAI's `stop` strings applied: text is released only once no stop
/// string can begin in it, and nothing from the first stop string on is ever released.
struct StopText<'a> {
    stops: &'a [String],
    text: String,
    released: usize,
    stopped: bool,
}

impl<'a> StopText<'a> {
    fn new(stops: &'a [String]) -> Self {
        Self {
            stops,
            text: String::new(),
            released: 0,
            stopped: false,
        }
    }

    /// Add a decoded piece; returns the text now safe to send and whether a stop string ended
    /// the answer.
    fn push(&mut self, piece: &str) -> (String, bool) {
        if self.stopped {
            return (String::new(), true);
        }
        self.text.push_str(piece);
        let found = self
            .stops
            .iter()
            .filter_map(|s| self.text.find(s.as_str()))
            .min();
        if let Some(at) = found {
            self.text.truncate(at);
            self.stopped = true;
            return (self.release(at), true);
        }
        // Hold back what could be the start of a stop string.
        let hold = self.stops.iter().map(|s| s.len() - 1).max().unwrap_or(0);
        let mut safe = self.text.len().saturating_sub(hold);
        while !self.text.is_char_boundary(safe) {
            safe -= 1;
        }
        (self.release(safe.max(self.released)), false)
    }

    fn release(&mut self, upto: usize) -> String {
        let out = self.text[self.released..upto].to_string();
        self.released = upto;
        out
    }

    /// Whatever is still held back once the answer has ended.
    fn finish(&mut self) -> String {
        self.release(self.text.len())
    }
}

#[cfg(test)]
mod tests {
    use super::StopText;

    #[test]
    fn stop_strings_cut_the_text_even_across_pieces() {
        let stops = vec!["END".to_string()];
        let mut t = StopText::new(&stops);
        let mut out = String::new();
        for piece in ["hello E", "N", "D world"] {
            let (emit, stopped) = t.push(piece);
            out.push_str(&emit);
            if stopped {
                break;
            }
        }
        out.push_str(&t.finish());
        assert_eq!(out, "hello ");
        assert_eq!(t.text, "hello ");
        let none: Vec<String> = Vec::new();
        let mut t = StopText::new(&none);
        assert_eq!(t.push("abc").0, "abc");
    }
}
