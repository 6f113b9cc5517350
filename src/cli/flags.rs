//! Library errors name the API field a caller set (`prune.keep`); the command line names the
//! flag that set it (`--keep`). The translation happens here, once, when an error is printed.

use llava_wgpu::Error;

/// API field → command-line flag.
const FLAGS: [(&str, &str); 29] = [
    ("allow_local_images", "--allow-local-images"),
    ("host", "--host"),
    ("port", "--port"),
    ("cors", "--cors"),
    ("max_images", "--max-images"),
    ("prune.method", "--prune"),
    ("prune.keep", "--keep"),
    ("prune.keep_ratio", "--keep-ratio"),
    ("prune.keep_mass", "--keep-mass"),
    ("prune.keep_floor", "--keep-floor"),
    ("prune.important_ratio", "--important-ratio"),
    ("prune.merge", "--merge"),
    ("prune.stage1_keep_mass", "--stage1-keep-mass"),
    ("prune.stage1_keep", "--stage1-keep"),
    ("prune.stage1_ratio", "--stage1-ratio"),
    ("prune.stage1_score", "--stage1-score"),
    ("prune.stage2_layer", "--stage2-layer"),
    ("max_new_tokens", "--max-new-tokens"),
    ("repeats", "--repeats"),
    ("gpu.adapter", "--adapter"),
    ("gpu.backend", "--backend"),
    ("prompt", "--prompt"),
    ("preset", "--preset"),
    ("vision_weight_format", "--vision-weights"),
    ("weight_format", "--weights"),
    ("sections", "--only"),
    ("budgets", "--budgets"),
    ("text_layers", "--layers"),
    ("kv", "--kv"),
];

fn flag(field: &str) -> Option<&'static str> {
    FLAGS
        .iter()
        .find(|(f, _)| *f == field)
        .map(|&(_, flag)| flag)
}

/// `reason` with every API field it mentions replaced by its flag (`prune.method = fastv` →
/// `--prune fastv`). Only dotted or snake-case fields are replaced: a bare `prompt` in a reason
/// is an English word, not a field.
fn reason_in_flags(reason: &str) -> String {
    let mut fields: Vec<(&str, &str)> = FLAGS
        .iter()
        .copied()
        .filter(|(field, _)| field.contains(['.', '_']))
        .collect();
    // Longest first, so that `prune.keep_ratio` is not read as `prune.keep` + `_ratio`.
    fields.sort_by_key(|(field, _)| std::cmp::Reverse(field.len()));
    let mut text = reason.to_string();
    for (field, flag) in fields {
        text = text
            .replace(&format!("{field} = "), &format!("{flag} "))
            .replace(field, flag);
    }
    text
}

/// How the command line prints a library error.
pub fn in_flags(error: &Error) -> String {
    match error {
        Error::Argument { name, reason } => format!(
            "invalid argument {}: {}",
            flag(name).unwrap_or(name),
            reason_in_flags(reason)
        ),
        // Loading errors name the format field a checkpoint needs (`weight_format = q4_0`).
        Error::File { path, reason } => format!("{}: {}", path.display(), reason_in_flags(reason)),
        other => other.to_string(),
    }
}

/// `{error:#}` (every context, then the cause, joined by ": ") with library errors in flags.
pub fn describe(error: &anyhow::Error) -> String {
    error
        .chain()
        .map(|link| match link.downcast_ref::<Error>() {
            Some(library) => in_flags(library),
            None => link.to_string(),
        })
        .collect::<Vec<_>>()
        .join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_become_flags_in_the_name_and_the_reason() {
        let e = Error::argument(
            "prune.keep",
            "give either prune.keep or prune.keep_ratio, not both",
        );
        assert_eq!(
            in_flags(&e),
            "invalid argument --keep: give either --keep or --keep-ratio, not both"
        );
        let e = Error::argument(
            "prune.stage2_layer",
            "there is no stage 2 with prune.method = fastervlm",
        );
        assert_eq!(
            in_flags(&e),
            "invalid argument --stage2-layer: there is no stage 2 with --prune fastervlm"
        );
        let e = Error::argument("prompt", "the prompt must contain one image");
        assert_eq!(
            in_flags(&e),
            "invalid argument --prompt: the prompt must contain one image"
        );
        let e = Error::argument("LLAVA_WGPU_BACKEND", "'zz' is not one of vulkan");
        assert_eq!(in_flags(&e), e.to_string());
    }

    #[test]
    fn context_is_kept_around_the_translated_error() {
        let e = anyhow::Error::new(Error::argument("gpu.adapter", "no adapter matches 'x'"))
            .context("kernel benchmark failed");
        assert_eq!(
            describe(&e),
            "kernel benchmark failed: invalid argument --adapter: no adapter matches 'x'"
        );
    }
}
