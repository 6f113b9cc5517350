//! `llava-wgpu chat`: a conversation in the terminal, with line editing and history (rustyline:
//! Up recalls the previous line). Answers stream as they are decoded; each turn reuses the
//! session's KV cache. A question may come with no image, or with the images `--image` and
//! `/image FILE` attached to it. Commands: `/image FILE`, `/reset`, `/prune METHOD [keep=N]
//! [stage1_keep=N] [stage2_layer=K] [keep_mass=P] [keep_floor=N] [important_ratio=R] [merge=on]` (a new conversation: each image is pruned once, when it
//! is first prefilled), `/stats`, `/help`, `/quit`. Ctrl-D leaves; Ctrl-C stops an answer, or
//! leaves at the prompt. Errors go to stderr, after the answer's line has ended.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Result;
use rustyline::error::ReadlineError;

use llava_wgpu::generate::{Conversation, ImageInput, Session, TurnSettings};
use llava_wgpu::prune::{Method, PruneOptions};
use llava_wgpu::text::{Message, Role};
use llava_wgpu::{Engine, GenerateOutput};

use super::flags::in_flags;

const HELP: &str = "commands: /image FILE (attach to the next question), /reset, /prune METHOD [keep=N] [stage1_keep=N] [stage2_layer=K] [keep_mass=P] [keep_floor=N] [important_ratio=R] [merge=on], /stats, /help, /quit (Ctrl-D)";

/// What the chat starts with: images for the first question and a system message.
pub struct Start {
    pub images: Vec<PathBuf>,
    pub system: Option<String>,
}

struct Chat {
    engine: Engine,
    session: Session,
    system: Option<String>,
    messages: Vec<Message>,
    /// The conversation's images so far, in order.
    images: Vec<ImageInput>,
    /// Images the next question carries.
    pending: Vec<PathBuf>,
    settings: TurnSettings,
    last: Option<GenerateOutput>,
    /// Set by Ctrl-C while an answer streams.
    cancel: Arc<AtomicBool>,
    generating: Arc<AtomicBool>,
}

/// That `path` is an image the engine can read (checked when it is given, not at the next
/// question).
pub fn check_image(path: &Path) -> llava_wgpu::Result<()> {
    llava_wgpu::vision::probe_image(path).map(|_| ())
}

/// Run the chat on the terminal (or piped stdin) until end of input or `/quit`.
pub fn run(engine: Engine, start: Start, settings: TurnSettings) -> Result<()> {
    let mut chat = Chat {
        engine,
        session: Session::new(),
        system: start.system,
        messages: Vec::new(),
        images: Vec::new(),
        pending: start.images,
        settings,
        last: None,
        cancel: Arc::new(AtomicBool::new(false)),
        generating: Arc::new(AtomicBool::new(false)),
    };
    chat.watch_interrupts();
    println!("llava-wgpu chat: ask anything, with or without an image; {HELP}");
    let mut editor = rustyline::DefaultEditor::new()?;
    // rustyline prints no prompt when stdin is a pipe; a transcript keeps it.
    let piped = !std::io::stdin().is_terminal();
    loop {
        let prompt = chat.prompt();
        if piped {
            print!("{prompt}");
            std::io::stdout().flush()?;
        }
        let line = match editor.readline(&prompt) {
            Ok(line) => line,
            Err(ReadlineError::Eof | ReadlineError::Interrupted) => {
                println!();
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let _ = editor.add_history_entry(line);
        if let Some(command) = line.strip_prefix('/') {
            if !chat.command(command) {
                return Ok(());
            }
        } else if let Err(e) = chat.ask(line) {
            eprintln!("error: {e}");
        }
    }
}

impl Chat {
    /// `> `, or `[2 images] > ` when images wait for the next question.
    fn prompt(&self) -> String {
        match self.pending.len() {
            0 => "> ".to_string(),
            1 => "[1 image] > ".to_string(),
            n => format!("[{n} images] > "),
        }
    }

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
        let (name, rest) = command.split_once(' ').unwrap_or((command, ""));
        match name {
            "quit" | "exit" => return false,
            "help" => println!("{HELP}"),
            "reset" => {
                self.new_conversation();
                println!("(new conversation)");
            }
            "image" => self.attach(rest.trim()),
            "prune" => match parse_prune(rest.split_whitespace()).and_then(|prune| {
                self.engine
                    .check_prune(&prune)
                    .map_err(|e| anyhow::anyhow!(in_flags(&e)))?;
                Ok(prune)
            }) {
                Ok(prune) => {
                    self.settings.prune = prune;
                    self.new_conversation();
                    println!(
                        "(new conversation, pruning: {})",
                        describe_prune(&self.settings.prune)
                    );
                }
                Err(e) => eprintln!("error: {e}"),
            },
            "stats" => self.stats(),
            other => eprintln!("error: unknown command /{other}; {HELP}"),
        }
        true
    }

    /// `/image FILE`: checked now, attached to the next question.
    fn attach(&mut self, path: &str) {
        if path.is_empty() {
            eprintln!("error: usage: /image FILE");
            return;
        }
        let path = PathBuf::from(path);
        if self.images.len() + self.pending.len() >= self.settings.max_images {
            eprintln!(
                "error: the conversation already holds {} images, --max-images allows {} (/reset starts a new one)",
                self.images.len() + self.pending.len(),
                self.settings.max_images
            );
            return;
        }
        match check_image(&path) {
            Ok(()) => {
                println!("({} attached to your next question)", path.display());
                self.pending.push(path);
            }
            Err(e) => eprintln!("error: /image: {e}"),
        }
    }

    fn new_conversation(&mut self) {
        self.session.reset();
        self.messages.clear();
        self.images.clear();
        self.pending.clear();
        self.last = None;
    }

    /// The conversation so far with `question` (and the pending images) as its last message.
    fn conversation_with(&self, question: &str) -> Conversation {
        let mut messages = Vec::with_capacity(self.messages.len() + 2);
        if let Some(system) = &self.system {
            messages.push(Message::new(Role::System, system));
        }
        messages.extend(self.messages.iter().cloned());
        messages.push(Message::with_images(
            Role::User,
            question,
            self.pending.len(),
        ));
        let pending = self.pending.iter().cloned().map(ImageInput::File);
        Conversation {
            messages,
            images: self.images.iter().cloned().chain(pending).collect(),
        }
    }

    fn ask(&mut self, question: &str) -> Result<()> {
        let conversation = self.conversation_with(question);
        self.cancel.store(false, Ordering::Relaxed);
        self.generating.store(true, Ordering::Relaxed);
        let mut printed = false;
        let result = self.engine.turn(
            &mut self.session,
            &conversation,
            &self.settings,
            Some(&self.cancel),
            |piece| {
                print!("{piece}");
                printed = true;
                let _ = std::io::stdout().flush();
            },
        );
        self.generating.store(false, Ordering::Relaxed);
        if printed || result.is_ok() {
            println!();
        }
        let output = result.map_err(|e| anyhow::anyhow!(in_flags(&e)))?;
        let question = conversation.messages.last().expect("the question").clone();
        self.messages.push(question);
        self.messages
            .push(Message::new(Role::Assistant, output.text.trim()));
        self.images = conversation.images;
        self.pending.clear();
        self.last = Some(output);
        Ok(())
    }

    fn stats(&self) {
        let Some(out) = &self.last else {
            println!("no answer yet");
            return;
        };
        let v = &out.visual_tokens;
        let t = &out.timings_ms;
        println!(
            "tokens: prompt {} (reused {}), generated {}; visual tokens: encoder {}, after stage 1 {}, after stage 2 {}; time to first token {:.1} ms; decode {:.1} tokens/s; conversation {} messages, {} images",
            out.prompt_tokens,
            out.turn.reused_tokens,
            out.generated_ids.len(),
            v.encoder,
            v.after_stage1,
            v.after_stage2,
            t.preprocess + t.vision + t.prefill,
            out.decode_tokens_per_second,
            self.messages.len(),
            self.images.len(),
        );
    }
}

/// `/prune METHOD [keep=N] [stage1_keep=N] [stage2_layer=K] [keep_mass=P] [keep_floor=N] [important_ratio=R] [merge=on]`.
fn parse_prune<'a>(mut words: impl Iterator<Item = &'a str>) -> Result<PruneOptions> {
    const USAGE: &str =
        "usage: /prune METHOD [keep=N] [stage1_keep=N] [stage2_layer=K] [keep_mass=P] [keep_floor=N] [important_ratio=R] [merge=on]";
    let method: Method = words
        .next()
        .ok_or_else(|| anyhow::anyhow!(USAGE))?
        .parse()
        .map_err(|e| anyhow::anyhow!(in_flags(&e)))?;
    let mut prune = PruneOptions {
        method,
        ..PruneOptions::default()
    };
    for word in words {
        let (key, value) = word
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("'{word}' is not key=value"))?;
        let count = || -> Result<Option<usize>> {
            let n = value.parse();
            Ok(Some(n.map_err(|_| {
                anyhow::anyhow!("{key}: '{value}' is not a count")
            })?))
        };
        let number = || -> Result<Option<f64>> {
            let x = value.parse();
            Ok(Some(x.map_err(|_| {
                anyhow::anyhow!("{key}: '{value}' is not a number")
            })?))
        };
        match key {
            "keep" => prune.keep = count()?,
            "stage1_keep" => prune.stage1_keep = count()?,
            "stage2_layer" => prune.stage2_layer = count()?,
            "keep_floor" => prune.keep_floor = count()?,
            "keep_mass" => prune.keep_mass = number()?,
            "important_ratio" => prune.important_ratio = number()?,
            "merge" => {
                prune.merge = match value {
                    "on" | "true" | "1" => true,
                    "off" | "false" | "0" => false,
                    _ => anyhow::bail!("merge: '{value}' is not on or off"),
                }
            }
            _ => anyhow::bail!(
                "unknown /prune setting '{key}' (keep, stage1_keep, stage2_layer, keep_mass, \
                 keep_floor, important_ratio, merge)"
            ),
        }
    }
    Ok(prune)
}

/// The pruning settings as the user would type them: `star keep=16 stage2_layer=2`.
fn describe_prune(prune: &PruneOptions) -> String {
    let settings = [
        ("keep", prune.keep),
        ("stage1_keep", prune.stage1_keep),
        ("stage2_layer", prune.stage2_layer),
    ];
    let mut words = vec![prune.method.name().to_string()];
    words.extend(
        settings
            .iter()
            .filter_map(|(name, value)| Some(format!("{name}={}", (*value)?))),
    );
    words.extend(prune.keep_mass.map(|p| format!("keep_mass={p}")));
    words.extend(prune.keep_floor.map(|n| format!("keep_floor={n}")));
    words.extend(
        prune
            .important_ratio
            .map(|r| format!("important_ratio={r}")),
    );
    if prune.merge {
        words.push("merge=on".to_string());
    }
    words.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prune_settings_read_back_as_typed() {
        let typed = "star keep=16 stage2_layer=2 keep_mass=0.6 keep_floor=4";
        let prune = parse_prune(typed.split_whitespace()).unwrap();
        assert_eq!(prune.method, Method::Star);
        assert_eq!((prune.keep, prune.stage2_layer), (Some(16), Some(2)));
        assert_eq!((prune.keep_mass, prune.keep_floor), (Some(0.6), Some(4)));
        assert_eq!(describe_prune(&prune), typed);
        let typed = "vispruner keep=22 important_ratio=0.25";
        let prune = parse_prune(typed.split_whitespace()).unwrap();
        assert_eq!(prune.important_ratio, Some(0.25));
        assert_eq!(describe_prune(&prune), typed);
        let typed = "star keep=22 stage1_keep=22 merge=on";
        let prune = parse_prune(typed.split_whitespace()).unwrap();
        assert!(prune.merge);
        assert_eq!(
            describe_prune(&prune),
            "star keep=22 stage1_keep=22 merge=on"
        );
        let bad = |text: &str| {
            parse_prune(text.split_whitespace())
                .unwrap_err()
                .to_string()
        };
        assert!(bad("star keep_mass=lots").contains("keep_mass"));
        assert!(bad("star merge=maybe").contains("merge"));
        assert!(bad("star keep=-1").contains("keep"));
        assert!(bad("star colour=red").contains("unknown /prune setting 'colour'"));
    }
}
