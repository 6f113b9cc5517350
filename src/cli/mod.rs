//! The binary's own modules (the library knows nothing of the command line): clap's view of the
//! library's choices, and the translation of library errors into flag names.

pub mod chat;
pub mod choices;
pub mod flags;
pub mod serve;
