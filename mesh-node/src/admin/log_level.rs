//! The daemon's log filter, changeable at runtime through the admin API.
//!
//! The filter sits in a `reload` layer directly on the registry, so its handle's type does not
//! depend on which other layers (fmt, tracing export) main stacks on top of it.
use std::sync::{Mutex, OnceLock};

use tracing_subscriber::{EnvFilter, Registry, reload};

struct Control {
    handle: reload::Handle<EnvFilter, Registry>,
    /// The directive string last applied, since EnvFilter does not print back what it was
    /// built from in a stable form.
    current: Mutex<String>,
}

static CONTROL: OnceLock<Control> = OnceLock::new();

/// The filter layer to install first on the registry. `directives` is an EnvFilter string
/// (`info`, `mesh_node=debug,h2=warn`); a bad one falls back to `info` with a message.
pub fn layer(directives: &str) -> reload::Layer<EnvFilter, Registry> {
    let (filter, applied) = match EnvFilter::try_new(directives) {
        Ok(f) => (f, directives.to_owned()),
        Err(e) => {
            eprintln!("log filter {directives:?}: {e}; using \"info\"");
            (EnvFilter::new("info"), "info".to_owned())
        }
    };
    let (layer, handle) = reload::Layer::new(filter);
    // A second call (tests) keeps the first handle: only one subscriber is global anyway.
    let _ = CONTROL.set(Control { handle, current: Mutex::new(applied) });
    layer
}

/// The directives in force, or `None` when this process installed no reloadable filter.
pub fn current() -> Option<String> {
    CONTROL.get().map(|c| c.current.lock().unwrap_or_else(|e| e.into_inner()).clone())
}

#[derive(Debug, thiserror::Error)]
pub enum LogLevelError {
    #[error("this process has no reloadable log filter")]
    NotInstalled,
    #[error("log level {0:?}: {1} (use a level: error, warn, info, debug, trace, or directives like mesh_node=debug,info)")]
    Invalid(String, String),
    #[error("applying the log filter: {0}")]
    Reload(String),
}

/// Replaces the filter; takes effect for every event from now on.
pub fn set(directives: &str) -> Result<String, LogLevelError> {
    let control = CONTROL.get().ok_or(LogLevelError::NotInstalled)?;
    let directives = directives.trim();
    if directives.is_empty() {
        return Err(LogLevelError::Invalid(String::new(), "empty".into()));
    }
    let filter = EnvFilter::try_new(directives).map_err(|e| LogLevelError::Invalid(directives.to_owned(), e.to_string()))?;
    control.handle.reload(filter).map_err(|e| LogLevelError::Reload(e.to_string()))?;
    let mut current = control.current.lock().unwrap_or_else(|e| e.into_inner());
    *current = directives.to_owned();
    tracing::info!(level = %directives, "log level changed");
    Ok(current.clone())
}
