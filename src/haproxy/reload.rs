//! Supervised HAProxy (placeholder).

/// The supervisor failed.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// Placeholder.
    #[error("not yet")]
    NotYet,
}

/// Placeholder.
pub fn run(
    _argv: &[std::ffi::OsString],
    _options: &super::RenderOptions,
    _ready_timeout: std::time::Duration,
) -> Result<std::process::ExitCode, ReloadError> {
    Err(ReloadError::NotYet)
}
