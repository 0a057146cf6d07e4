//! Where a function's tenant code runs: in a jailed worker process (the
//! default) or in this one.
//!
//! [`crate::function`] is the engine (templates, clones, the hot path)
//! and runs everything in the calling process; [`crate::worker`] runs that
//! engine inside a jail. This module sits above both and picks by the
//! options' `isolation`, so the engine never imports the jail that runs
//! it.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::function::{
    check_timeout, create_in_process, ensure_cached_with, Function, FunctionError,
    FunctionInvokeOptions, FunctionOutcome, FunctionSpec, TemplateInfo, TemplateOptions,
};

impl Function {
    /// Restores a clone, delivers `event`, returns what the handler made
    /// of it, and destroys the clone: in a jailed worker unless
    /// `options.isolation` is `None` (see [`Function::invoke_in_process`]).
    pub fn invoke(
        &self,
        event: &[u8],
        options: &FunctionInvokeOptions,
    ) -> Result<FunctionOutcome, FunctionError> {
        self.invoke_watched(event, options, |_| true)
    }

    /// Like [`Function::invoke`], and a jailed clone's worker PID goes to
    /// `started` as soon as the worker runs (see
    /// [`crate::worker::function::invoke_watched`]), so the caller can
    /// stop the invocation; `started` returning false ends it at once. An
    /// in-process clone (no `isolation`) has no worker: `started` is not
    /// called.
    pub fn invoke_watched(
        &self,
        event: &[u8],
        options: &FunctionInvokeOptions,
        started: impl FnOnce(u32) -> bool,
    ) -> Result<FunctionOutcome, FunctionError> {
        let Some(isolation) = &options.isolation else {
            return self.invoke_in_process(event, options);
        };
        let requested = Instant::now();
        check_timeout(options)?;
        let mut outcome =
            crate::worker::function::invoke_watched(self, event, options, isolation, started)?;
        let t = &mut outcome.timings;
        t.total = requested.elapsed();
        t.isolation = Some(t.total.saturating_sub(t.restore + t.run + t.teardown));
        Ok(outcome)
    }
}

/// Makes a function template in `out` (created if missing; an existing
/// template there is replaced): in a jailed worker unless
/// `options.isolation` is `None` (see [`create_in_process`]).
pub fn create_function(
    spec: &FunctionSpec,
    options: &TemplateOptions,
    out: &Path,
) -> Result<TemplateInfo, FunctionError> {
    match &options.isolation {
        Some(isolation) => crate::worker::template::create(spec, options, out, isolation),
        None => create_in_process(spec, options, out),
    }
}

/// The cached template of `spec`, made by [`create_function`] first if
/// there is none (`on_create` is told: that takes a cold boot and the
/// runtime's start). Concurrent callers may each make one; the first to
/// finish wins.
pub fn ensure_cached_function(
    spec: &FunctionSpec,
    options: &TemplateOptions,
    on_create: impl FnOnce(&Path),
) -> Result<PathBuf, FunctionError> {
    ensure_cached_with(spec, options, on_create, |building| {
        create_function(spec, options, building).map(drop)
    })
}
