//! The library's one error type. Every variant names what was at fault (a file, a tensor, an
//! argument, an adapter) so that the binary can print it as-is and exit non-zero.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No adapter matched the request, or none exists at all.
    #[error("no usable GPU adapter: {0}")]
    NoAdapter(String),

    /// The adapter refused to create a device.
    #[error("could not create a device on adapter '{adapter}': {reason}")]
    Device { adapter: String, reason: String },

    /// wgpu reported a validation or out-of-memory error while running GPU work.
    #[error("GPU error during {context}: {reason}")]
    Gpu { context: String, reason: String },

    /// A shader failed to compile; this is a bug in the engine or an adapter that lacks a feature.
    #[error("shader '{shader}' (entry '{entry}') failed to compile: {reason}")]
    Shader {
        shader: String,
        entry: String,
        reason: String,
    },

    /// A command-line or API argument is out of range.
    #[error("invalid argument {name}: {reason}")]
    Argument { name: String, reason: String },

    /// Tensor shapes that a kernel was handed do not fit together.
    #[error("shape mismatch in {op}: {reason}")]
    Shape { op: String, reason: String },

    /// A problem with a file the user pointed at.
    #[error("{}: {reason}", path.display())]
    File { path: PathBuf, reason: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn argument(name: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Argument {
            name: name.into(),
            reason: reason.into(),
        }
    }

    pub fn shape(op: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Shape {
            op: op.into(),
            reason: reason.into(),
        }
    }

    pub fn gpu(context: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        Error::Gpu {
            context: context.into(),
            reason: reason.to_string(),
        }
    }
}
