//! `llava-wgpu chat`: a conversation in the terminal. Answers stream as they are decoded; each
//! turn reuses the session's KV cache. Commands: `/image FILE` (a new conversation about another
//! image), `/reset`, `/prune METHOD [keep=N] [stage1_keep=N] [stage2_layer=K]` (a new
//! conversation: the pruned set is fixed per conversation), `/stats`, `/help`, `/quit`. Ctrl-D
//! leaves; Ctrl-C stops an answer, or leaves at the prompt.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Result;

use llava_wgpu::generate::{Conversation, ImageInput, Session, TurnSettings};
use llava_wgpu::prune::{Method, PruneOptions};
use llava_wgpu::text::{Message, Role};
use llava_wgpu::{Engine, GenerateOutput};

const HELP: &str = "commands: /image FILE, /reset, /prune METHOD [keep=N] [stage1_keep=N] [stage2_layer=K], /stats, /help, /quit (Ctrl-D)";

struct Chat {
    engine: Engine,
    session: Session,
    messages: Vec<Message>,
    image: Option<PathBuf>,
    settings: TurnSettings,
    last: Option<GenerateOutput>,
    /// Set by Ctrl-C while an answer streams.
    cancel: Arc<AtomicBool>,
    generating: Arc<AtomicBool>,
}

/// Run the chat on stdin/stdout until end of input or `/quit`.
pub fn run(engine: Engine, image: Option<PathBuf>, settings: TurnSettings) -> Result<()> {
    let mut chat = Chat {
        engine,
        session: Session::new(),
        messages: Vec::new(),
        image,
        settings,
        last: None,
        cancel: Arc::new(AtomicBool::new(false)),
        generating: Arc::new(AtomicBool::new(false)),
    };
    chat.watch_interrupts();
    println!("llava-wgpu chat: ask about the image; {HELP}");
    if chat.image.is_none() {
        println!("no image yet: /image FILE");
    }
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        print!("> ");
        std::io::stdout().flush()?;
        let Some(line) = lines.next() else {
            println!();
            return Ok(());
        };
        let line = line?;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(command) = line.strip_prefix('/') {
            if !chat.command(command) {
                return Ok(());
            }
        } else if let Err(e) = chat.ask(line) {
            println!("error: {e}");
        }
    }
}

impl Chat {
    /// Ctrl-C stops the answer being generated, or ends the chat at the prompt.
    fn watch_interrupts(&self) {
        let (cancel, generating) = (self.cancel.clone(), self.generating.clone());
        std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async {
                while tokio::signal::ctrl_c().await.is_ok() {
                    if generating.load(Ordering::Relaxed) {
                        cancel.store(true, Ordering::Relaxed);
                    } else {
                        println!();
                        std::process::exit(0);
                    }
                }
            });
        });
    }

    /// Handle `/command`; false ends the chat.
    fn command(&mut self, command: &str) -> bool {
        let mut words = command.split_whitespace();
        match words.next().unwrap_or("") {
            "quit" | "exit" => return false,
            "help" => println!("{HELP}"),
            "reset" => {
                self.new_conversation();
                println!("(new conversation)");
            }
            "image" => {
                let path: Vec<&str> = words.collect();
                if path.is_empty() {
                    println!("usage: /image FILE");
                } else {
                    let path = PathBuf::from(path.join(" "));
                    if path.is_file() {
                        self.image = Some(path);
                        self.new_conversation();
                        println!(
                            "(new conversation about {})",
                            self.image.as_ref().unwrap().display()
                        );
                    } else {
                        println!("error: {} is not a file", path.display());
                    }
                }
            }
            "prune" => match parse_prune(words) {
                Ok(prune) => {
                    self.settings.prune = prune;
                    self.new_conversation();
                    println!("(new conversation with pruning {:?})", self.settings.prune);
                }
                Err(e) => println!("error: {e}"),
            },
            "stats" => self.stats(),
            other => println!("unknown command /{other}; {HELP}"),
        }
        true
    }

    fn new_conversation(&mut self) {
        self.session.reset();
        self.messages.clear();
        self.last = None;
    }

    fn ask(&mut self, question: &str) -> Result<()> {
        let Some(image) = self.image.clone() else {
            anyhow::bail!("no image: use /image FILE first");
        };
        self.messages.push(Message::new(Role::User, question));
        let conversation = Conversation {
            messages: self.messages.clone(),
            image: ImageInput::File(image),
            image_in: 0,
        };
        self.cancel.store(false, Ordering::Relaxed);
        self.generating.store(true, Ordering::Relaxed);
        let result = self.engine.turn(
            &mut self.session,
            &conversation,
            &self.settings,
            Some(&self.cancel),
            |piece| {
                print!("{piece}");
                let _ = std::io::stdout().flush();
            },
        );
        self.generating.store(false, Ordering::Relaxed);
        println!();
        match result {
            Ok(output) => {
                self.messages
                    .push(Message::new(Role::Assistant, output.text.trim()));
                self.last = Some(output);
                Ok(())
            }
            Err(e) => {
                self.messages.pop();
                Err(e.into())
            }
        }
    }

    fn stats(&self) {
        let Some(out) = &self.last else {
            println!("no answer yet");
            return;
        };
        let v = &out.visual_tokens;
        let t = &out.timings_ms;
        println!(
            "tokens: prompt {} (reused {}), generated {}; visual tokens: encoder {}, after stage 1 {}, after stage 2 {}; time to first token {:.1} ms; decode {:.1} tokens/s; conversation {} messages",
            out.prompt_tokens,
            out.turn.reused_tokens,
            out.generated_ids.len(),
            v.encoder,
            v.after_stage1,
            v.after_stage2,
            t.preprocess + t.vision + t.prefill,
            out.decode_tokens_per_second,
            self.messages.len(),
        );
    }
}

/// `/prune METHOD [keep=N] [stage1_keep=N] [stage2_layer=K]`.
fn parse_prune<'a>(mut words: impl Iterator<Item = &'a str>) -> Result<PruneOptions> {
    let method: Method = words
        .next()
        .ok_or_else(|| {
            anyhow::anyhow!("usage: /prune METHOD [keep=N] [stage1_keep=N] [stage2_layer=K]")
        })?
        .parse()?;
    let mut prune = PruneOptions {
        method,
        ..PruneOptions::default()
    };
    for word in words {
        let (key, value) = word
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("'{word}' is not key=value"))?;
        let n: usize = value
            .parse()
            .map_err(|_| anyhow::anyhow!("{key}: '{value}' is not a number"))?;
        match key {
            "keep" => prune.keep = Some(n),
            "stage1_keep" => prune.stage1_keep = Some(n),
            "stage2_layer" => prune.stage2_layer = Some(n),
            _ => anyhow::bail!("unknown /prune setting '{key}' (keep, stage1_keep, stage2_layer)"),
        }
    }
    Ok(prune)
}
