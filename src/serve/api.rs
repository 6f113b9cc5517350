//! The OpenAI chat-completions contract: a request body checked field by field into a
//! conversation and turn settings, and errors in OpenAI's shape
//! (`{"error": {"message", "type", "param", "code"}}`) with the HTTP status they deserve.
//!
//! Statuses: 400 for a body that is not the API (malformed JSON, a missing or mistyped field,
//! an unknown content part, `n` > 1, an http(s) image URL); 413 for a body over the limit; 422
//! for a well-formed request the model cannot answer (an image that does not decode, an
//! impossible pruning budget, a prompt longer than the context); 503 when the queue is full.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use serde_json::{json, Value};

use crate::error::Error;
use crate::generate::{Conversation, ImageInput, TurnSettings};
use crate::prune::{Method, Positions, PruneOptions, Stage1Score};
use crate::sample::SamplingParams;
use crate::text::{Message, Role, Template};
use crate::vision::preprocess::MAX_IMAGE_FILE_BYTES;

/// An error answered to the client.
#[derive(Clone, Debug)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn bad_request(param: impl Into<Option<String>>, message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.into(),
            code: None,
        }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn with_status(mut self, status: u16) -> Self {
        self.status = status;
        self
    }

    /// A library error from answering the request: the caller's input at fault (422, naming
    /// the field or image), or the server's (500).
    pub fn from_engine(error: &Error) -> Self {
        let message = error.to_string();
        match error {
            Error::Argument { name, .. } => Self::bad_request(name.clone(), message)
                .with_status(422)
                .with_code("unprocessable"),
            // OpenAI's status and code for an image it cannot read.
            Error::File { path, .. } => Self::bad_request(path.display().to_string(), message)
                .with_code("invalid_image_format"),
            _ => Self {
                status: 500,
                message,
                kind: "server_error",
                param: None,
                code: None,
            },
        }
    }

    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

/// A chat-completions request, checked.
#[derive(Clone, Debug)]
pub struct ChatRequest {
    pub conversation: Conversation,
    pub settings: TurnSettings,
    pub stream: bool,
    /// `stream_options.include_usage`: a last chunk with `usage` before `[DONE]`.
    pub stream_usage: bool,
    pub stop: Vec<String>,
    /// `top_logprobs` when `logprobs` is true (0 reports only the chosen token's).
    pub logprobs: Option<usize>,
}

/// What the server allows beyond the API itself.
#[derive(Clone, Debug)]
pub struct Policy {
    /// Read `image_url`s that are paths of regular files under this directory (canonical), or
    /// `file://` URLs of them.
    pub allow_local_images: Option<PathBuf>,
    pub default_max_tokens: usize,
    /// The model's prompt format (`Engine::template`).
    pub template: Template,
    /// The most images a conversation may hold.
    pub max_images: usize,
}

type Checked<T> = std::result::Result<T, ApiError>;

/// Fields of OpenAI's API this server cannot honour: refused by name rather than ignored, so a
/// client never takes a plain answer for a tool call or a JSON-mode one.
fn refuse_unsupported(obj: &serde_json::Map<String, Value>) -> Checked<()> {
    let given = |field: &str| obj.get(field).is_some_and(|v| !v.is_null());
    for field in ["tools", "tool_choice", "functions", "function_call"] {
        if given(field) {
            return Err(ApiError::bad_request(
                field.to_string(),
                format!("{field} is not supported: this server has no tool calling"),
            )
            .with_code("unsupported_parameter"));
        }
    }
    let text_format = obj
        .get("response_format")
        .and_then(|f| f.get("type"))
        .and_then(Value::as_str)
        == Some("text");
    if given("response_format") && !text_format {
        return Err(ApiError::bad_request(
            "response_format".to_string(),
            "response_format: only {\"type\": \"text\"} is supported (no JSON mode or schemas)",
        )
        .with_code("unsupported_parameter"));
    }
    Ok(())
}

/// Parse a request body.
pub fn parse(body: &[u8], policy: &Policy) -> Checked<ChatRequest> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(None, format!("the body is not valid JSON: {e}"))
            .with_code("invalid_json")
    })?;
    let obj = v
        .as_object()
        .ok_or_else(|| ApiError::bad_request(None, "the body must be a JSON object"))?;
    refuse_unsupported(obj)?;
    if let Some(n) = obj.get("n") {
        if n.as_u64() != Some(1) {
            return Err(ApiError::bad_request(
                "n".to_string(),
                format!("n = {n}: this server answers one choice per request (n = 1)"),
            )
            .with_code("unsupported_value"));
        }
    }
    let (conversation, template) = parse_messages(obj.get("messages"), policy)?;
    let logprobs = match bool_field(obj, "logprobs")? {
        Some(true) => Some(uint_field(obj, "top_logprobs")?.unwrap_or(0).min(20)),
        _ => None,
    };
    let max_tokens = match uint_field(obj, "max_completion_tokens")? {
        Some(n) => Some(n),
        None => uint_field(obj, "max_tokens")?,
    };
    let sampling = SamplingParams {
        temperature: number_field(obj, "temperature", 0.0, 2.0)?.unwrap_or(0.0) as f32,
        top_p: number_field(obj, "top_p", 0.0, 1.0)?.unwrap_or(1.0) as f32,
        seed: uint_field(obj, "seed")?.unwrap_or(0) as u64,
    };
    if sampling.top_p <= 0.0 {
        return Err(ApiError::bad_request(
            "top_p".to_string(),
            "top_p must be in (0, 1]",
        ));
    }
    let settings = TurnSettings {
        template,
        max_new_tokens: max_tokens.unwrap_or(policy.default_max_tokens),
        sampling,
        // The chosen token's log-probability is looked up among the top ones.
        logprobs: logprobs.map(|n| n.max(1)),
        prune: parse_prune(obj.get("prune"))?,
        // Extension (as llama.cpp's server): keep generating past the end-of-sequence token.
        ignore_eos: bool_field(obj, "ignore_eos")?.unwrap_or(false),
        max_images: policy.max_images,
        ..TurnSettings::default()
    };
    let stream_usage = obj
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    Ok(ChatRequest {
        conversation,
        settings,
        stream: bool_field(obj, "stream")?.unwrap_or(false),
        stream_usage,
        stop: parse_stop(obj.get("stop"))?,
        logprobs,
    })
}

type Object = serde_json::Map<String, Value>;

fn bool_field(obj: &Object, name: &str) -> Checked<Option<bool>> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(ApiError::bad_request(
            name.to_string(),
            format!("{name} must be true or false, got {other}"),
        )),
    }
}

fn uint_field(obj: &Object, name: &str) -> Checked<Option<usize>> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
            ApiError::bad_request(
                name.to_string(),
                format!("{name} must be a non-negative integer, got {v}"),
            )
        }),
    }
}

fn number_field(obj: &Object, name: &str, lo: f64, hi: f64) -> Checked<Option<f64>> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_f64() {
            Some(x) if (lo..=hi).contains(&x) => Ok(Some(x)),
            _ => Err(ApiError::bad_request(
                name.to_string(),
                format!("{name} must be a number in [{lo}, {hi}], got {v}"),
            )),
        },
    }
}

fn parse_stop(v: Option<&Value>) -> Checked<Vec<String>> {
    let bad = || {
        ApiError::bad_request(
            "stop".to_string(),
            "stop must be a string or a list of up to 4 non-empty strings",
        )
    };
    let list = match v {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|s| s.as_str().map(str::to_string).ok_or_else(bad))
            .collect::<Checked<_>>()?,
        Some(_) => return Err(bad()),
    };
    if list.len() > 4 || list.iter().any(String::is_empty) {
        return Err(bad());
    }
    Ok(list)
}

/// STAR with its default budgets, as `llava-wgpu run` without pruning flags.
fn default_prune() -> PruneOptions {
    PruneOptions {
        method: Method::Star,
        ..PruneOptions::default()
    }
}

/// The `prune` extension: `{"method", "keep", "stage1_keep", "stage2_layer"}` (and the ratio
/// forms, `stage1_score`, `important_ratio`, `merge`, `positions`, `seed` and the adaptive
/// `keep_mass`, `stage1_keep_mass`, `keep_floor`);
/// what is left out takes `run`'s defaults (STAR).
fn parse_prune(v: Option<&Value>) -> Checked<PruneOptions> {
    let obj = match v {
        None | Some(Value::Null) => return Ok(default_prune()),
        Some(Value::Object(o)) => o,
        Some(other) => {
            return Err(ApiError::bad_request(
                "prune".to_string(),
                format!("prune must be an object, got {other}"),
            ))
        }
    };
    const KNOWN: [&str; 14] = [
        "method",
        "keep",
        "keep_ratio",
        "keep_mass",
        "stage1_keep_mass",
        "keep_floor",
        "stage1_keep",
        "stage1_ratio",
        "stage2_layer",
        "stage1_score",
        "important_ratio",
        "merge",
        "positions",
        "seed",
    ];
    if let Some(unknown) = obj.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(ApiError::bad_request(
            format!("prune.{unknown}"),
            format!(
                "unknown field prune.{unknown} (known: {})",
                KNOWN.join(", ")
            ),
        ));
    }
    let name = |field: &str| format!("prune.{field}");
    let text = |field: &str| -> Checked<Option<&str>> {
        match obj.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(ApiError::bad_request(
                name(field),
                format!("prune.{field} must be a string, got {other}"),
            )),
        }
    };
    let library = |e: Error| ApiError::from_engine(&e).with_status(400);
    let mut options = default_prune();
    if let Some(method) = text("method")? {
        options.method = method.parse::<Method>().map_err(library)?;
    }
    if let Some(positions) = text("positions")? {
        options.positions = positions.parse::<Positions>().map_err(library)?;
    }
    if let Some(score) = text("stage1_score")? {
        options.stage1_score = Some(score.parse::<Stage1Score>().map_err(library)?);
    }
    let prefixed = |field: &str| uint_field(obj, field).map_err(|e| prefix(e, "prune."));
    options.keep = prefixed("keep")?;
    options.stage1_keep = prefixed("stage1_keep")?;
    options.stage2_layer = prefixed("stage2_layer")?;
    options.seed = prefixed("seed")?.unwrap_or(0) as u64;
    options.keep_floor = prefixed("keep_floor")?;
    let ratio = |field: &str| number_field(obj, field, 0.0, 1.0).map_err(|e| prefix(e, "prune."));
    options.keep_ratio = ratio("keep_ratio")?;
    options.stage1_ratio = ratio("stage1_ratio")?;
    options.keep_mass = ratio("keep_mass")?;
    options.stage1_keep_mass = ratio("stage1_keep_mass")?;
    options.important_ratio = ratio("important_ratio")?;
    options.merge = bool_field(obj, "merge")
        .map_err(|e| prefix(e, "prune."))?
        .unwrap_or(false);
    Ok(options)
}

fn prefix(mut e: ApiError, p: &str) -> ApiError {
    e.param = e.param.map(|f| format!("{p}{f}"));
    e.message = format!("{p}{}", e.message);
    e
}

/// The messages as a conversation (any number of images, in the order their messages and
/// content parts give them), and the template they are rendered with.
fn parse_messages(v: Option<&Value>, policy: &Policy) -> Checked<(Conversation, Template)> {
    let list = v.and_then(Value::as_array).ok_or_else(|| {
        ApiError::bad_request(
            "messages".to_string(),
            "messages must be a non-empty list of {role, content} objects",
        )
    })?;
    let mut messages = Vec::new();
    let mut images = Vec::new();
    for (i, m) in list.iter().enumerate() {
        let at = format!("messages[{i}]");
        let role = match m.get("role").and_then(Value::as_str) {
            Some("system") | Some("developer") => Role::System,
            Some("user") => Role::User,
            Some("assistant") => Role::Assistant,
            other => {
                let got = other.map_or("nothing".to_string(), |r| format!("\"{r}\""));
                return Err(ApiError::bad_request(
                    format!("{at}.role"),
                    format!("{at}.role must be system, user or assistant, got {got}"),
                ));
            }
        };
        let (text, found) = parse_content(m.get("content"), &at, policy)?;
        if !found.is_empty() && role != Role::User {
            return Err(ApiError::bad_request(
                format!("{at}.content"),
                "only user messages may hold images",
            ));
        }
        messages.push(Message::with_images(role, text, found.len()));
        images.extend(found);
    }
    if messages.last().map(|m| m.role) != Some(Role::User) {
        return Err(ApiError::bad_request(
            "messages".to_string(),
            "messages must end with a user message",
        ));
    }
    if images.len() > policy.max_images {
        return Err(ApiError::bad_request(
            "messages".to_string(),
            format!(
                "the conversation holds {} images; this server takes at most {} (its --max-images)",
                images.len(),
                policy.max_images
            ),
        )
        .with_code("too_many_images"));
    }
    Ok((Conversation { messages, images }, policy.template))
}

/// A message's text (its text parts joined by spaces) and its images, in order.
fn parse_content(
    v: Option<&Value>,
    at: &str,
    policy: &Policy,
) -> Checked<(String, Vec<ImageInput>)> {
    let parts = match v {
        Some(Value::String(s)) => return Ok((s.clone(), Vec::new())),
        Some(Value::Array(parts)) => parts,
        _ => {
            return Err(ApiError::bad_request(
                format!("{at}.content"),
                format!("{at}.content must be a string or a list of content parts"),
            ))
        }
    };
    let mut texts = Vec::new();
    let mut images = Vec::new();
    for (j, part) in parts.iter().enumerate() {
        let at = format!("{at}.content[{j}]");
        match part.get("type").and_then(Value::as_str) {
            Some("text") => match part.get("text").and_then(Value::as_str) {
                Some(t) => texts.push(t.to_string()),
                None => {
                    return Err(ApiError::bad_request(
                        format!("{at}.text"),
                        format!("{at}.text must be a string"),
                    ))
                }
            },
            Some("image_url") => {
                let url = part
                    .get("image_url")
                    .and_then(|u| u.get("url").or(Some(u)))
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        ApiError::bad_request(
                            format!("{at}.image_url.url"),
                            format!("{at}.image_url.url must be a string"),
                        )
                    })?;
                images.push(parse_image_url(url, &format!("{at}.image_url"), policy)?);
            }
            other => {
                let got = other.map_or("no type".to_string(), |t| format!("\"{t}\""));
                return Err(ApiError::bad_request(
                    format!("{at}.type"),
                    format!("unknown content part type {got}: this server reads \"text\" and \"image_url\""),
                )
                .with_code("unknown_content_part"));
            }
        }
    }
    Ok((texts.join(" "), images))
}

/// Data URLs (png, jpeg, webp) always; local paths only when the server allows them; http(s)
/// never (the server fetches nothing).
fn parse_image_url(url: &str, at: &str, policy: &Policy) -> Checked<ImageInput> {
    let param = format!("{at}.url");
    if let Some(rest) = url.strip_prefix("data:") {
        let (header, data) = rest.split_once(',').ok_or_else(|| {
            ApiError::bad_request(param.clone(), "a data URL needs a comma before its data")
        })?;
        let Some(mime) = header.strip_suffix(";base64") else {
            return Err(ApiError::bad_request(
                param,
                "data URLs must be base64 (data:image/png;base64,...)",
            ));
        };
        if !matches!(
            mime,
            "image/png" | "image/jpeg" | "image/jpg" | "image/webp"
        ) {
            return Err(ApiError::bad_request(
                param,
                format!(
                    "image type {mime:?} is not accepted: send image/png, image/jpeg or image/webp"
                ),
            )
            .with_code("unsupported_image_type"));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data.trim())
            .map_err(|e| ApiError::bad_request(param.clone(), format!("bad base64: {e}")))?;
        return Ok(ImageInput::Bytes {
            bytes: Arc::from(bytes),
            source: PathBuf::from(at),
        });
    }
    if url.starts_with("http://") || url.starts_with("https://") {
        return Err(ApiError::bad_request(
            param,
            "http(s) image URLs are not fetched by this server: send the image as a data URL (data:image/png;base64,...)",
        )
        .with_code("image_url_not_supported"));
    }
    let path = url.strip_prefix("file://").unwrap_or(url);
    let Some(root) = &policy.allow_local_images else {
        return Err(ApiError::bad_request(
            param,
            "local image paths are read only when the server runs with --allow-local-images DIR; send a data URL",
        )
        .with_code("local_images_disabled"));
    };
    let bytes = read_local_image(Path::new(path), root)
        .map_err(|reason| ApiError::bad_request(param, reason).with_code("local_image_refused"))?;
    // Read now, before the request is queued: errors about it name the JSON field.
    Ok(ImageInput::Bytes {
        bytes: Arc::from(bytes),
        source: PathBuf::from(at),
    })
}

/// The bytes of the local image `path` (relative to `root`, or absolute), read only when it is a
/// regular file under `root` (symbolic links resolved) no larger than an image file may be:
/// never a FIFO or a device, which could block or never end, and never outside `root`.
fn read_local_image(path: &Path, root: &Path) -> std::result::Result<Vec<u8>, String> {
    use std::path::Component;
    let shown = path.display();
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(format!("'{shown}': paths with '..' are refused"));
    }
    let full = root.join(path);
    let real = full
        .canonicalize()
        .map_err(|e| format!("cannot open '{shown}': {e}"))?;
    if !real.starts_with(root) {
        return Err(format!(
            "'{shown}' is outside the directory --allow-local-images allows"
        ));
    }
    let metadata = std::fs::metadata(&real).map_err(|e| format!("cannot open '{shown}': {e}"))?;
    if !metadata.is_file() {
        return Err(format!("'{shown}' is not a regular file"));
    }
    if metadata.len() > MAX_IMAGE_FILE_BYTES {
        return Err(format!(
            "'{shown}' has {} bytes, more than the {MAX_IMAGE_FILE_BYTES}-byte limit for an image",
            metadata.len()
        ));
    }
    crate::vision::read_image_file(&real).map_err(|e| match e {
        Error::File { reason, .. } => format!("cannot read '{shown}': {reason}"),
        other => other.to_string(),
    })
}
