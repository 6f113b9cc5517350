//! Mesa's Vulkan drivers print "error: XDG_RUNTIME_DIR is invalid or not set in the environment."
//! for every device a test opens on a machine without a login session (CI, containers). The
//! binary points the variable at a private directory before anything reads it
//! (`quiet_mesa_without_a_session` in src/main.rs); the test helpers that create a `Gpu` or an
//! `Engine` (`common::gpu*`, `fixture::model_dir`, trained_model.rs) call [`private_runtime_dir`]
//! first, so every test binary does the same before its first GPU call.

use std::sync::Once;

/// Set `XDG_RUNTIME_DIR` to a private directory if it is unset, once per test binary. Test
/// threads that touch the GPU all come through here first, so the variable is set before any
/// of them can read it.
pub fn private_runtime_dir() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
            let dir = std::env::temp_dir().join("llava-wgpu-runtime");
            if std::fs::create_dir_all(&dir).is_ok() {
                std::env::set_var("XDG_RUNTIME_DIR", &dir);
            }
        }
    });
}
