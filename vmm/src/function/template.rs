//! Making a function template: boot the runtime's image (or restore a
//! clone of the runtime's base snapshot, see [`super::base`]), start the
//! runtime with the handler loaded, warm it up, and snapshot it waiting.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ember_protocol::hotpath::{
    RequestHeader, REQUEST_ENTROPY_LEN, REQUEST_FLAG_PING, REQUEST_HEADER_LEN,
};
use ember_protocol::protocol::{FunctionInvoke, FunctionReady, HotPathPages};
use vm_memory::{Bytes, GuestAddress};

use super::guest_rng::{self, GuestRng};
use super::invoke::check_handler_result;
use super::manifest::Manifest;
use super::spec::{
    arena_mib, duration_ms, start_request, vm_config, FunctionSpec, Runtime, TemplateOptions,
};
use super::vm_steps::{boot_and_connect, quiesce, startup_error, QUIESCE_TIMEOUT};
use super::{buffers, FunctionError};
use crate::agent::AgentClient;
use crate::devices::doorbell::DOORBELL_WAITING;
use crate::machine::Machine;

/// What [`create_in_process`] (or a jailed build) made and how long it took.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TemplateInfo {
    /// The function directory.
    pub dir: PathBuf,
    /// Boot to the agent's greeting (from a base: the clone's restore to
    /// its agent's connection).
    pub boot: Duration,
    /// The base snapshot the template was made from (`None`: booted).
    pub base: Option<PathBuf>,
    /// Runtime start (from a base: the handler's load) to `READY`, as the
    /// guest measured it.
    pub startup: Duration,
    /// The warm-up round (also run without a warm-up event, as a ping).
    pub warmup: Duration,
    /// Pausing and saving.
    pub save: Duration,
    /// Whether clones take the hot path.
    pub hot_path: bool,
    /// Why not, when the runtime asked for it and did not get it.
    pub hot_path_error: Option<String>,
    /// Whether clones get their kernel CRNG reseeded in memory.
    pub guest_rng: bool,
    /// The calibration clone's run.
    pub calibration: Duration,
    /// Pages in the recorded working set.
    pub working_set_pages: u64,
}

/// Makes a function template in `out` (created if missing; an existing
/// template there is replaced) in this process, whatever
/// `options.isolation` says: the tenant's code runs in a VM of this
/// process. [`crate::dispatch::create_function`] picks a jailed worker or
/// this; a jailed template worker itself calls this.
pub fn create_in_process(
    spec: &FunctionSpec,
    options: &TemplateOptions,
    out: &Path,
) -> Result<TemplateInfo, FunctionError> {
    let (start, runtime_name, handler) = start_request(spec, options)?;
    let code_drive = match (&spec.runtime, &options.code_drive) {
        (Runtime::Python3Bundle { .. }, Some(made)) => Some(made.clone()),
        (Runtime::Python3Bundle { code, module, .. }, None) => {
            Some(make_code_drive(code, module, options.isolation.as_ref())?)
        }
        _ => None,
    };
    std::fs::create_dir_all(out).map_err(|e| FunctionError::Io(out.to_path_buf(), e))?;

    let base = options.base_for(spec)?;
    let booting = Instant::now();
    let (mut machine, mut agent, ready, boot) = match &base {
        Some(base) => {
            let (machine, agent, ready, connected) =
                from_base(base, spec, options, code_drive.as_deref())?;
            (machine, agent, ready, connected.duration_since(booting))
        }
        None => {
            let mut config = vm_config(options);
            config.console = options.console.clone();
            config.code_drive = code_drive;
            let (machine, mut agent, boot) = boot_and_connect(&config, booting)?;
            let ready = agent
                .start_function(&start, Instant::now() + options.startup_timeout)
                .map_err(startup_error)?;
            (machine, agent, ready, boot)
        }
    };
    let startup = Duration::from_millis(ready.startup_ms);
    if let Some(why) = &ready.hot_path_error {
        log::warn!("no hot path for this function: {why}");
    }
    for (name, bytes) in [("stdout", &ready.stdout), ("stderr", &ready.stderr)] {
        if !bytes.is_empty() {
            log::info!(
                "runtime {name} at start: {}",
                String::from_utf8_lossy(bytes).trim_end()
            );
        }
    }
    let mut manifest = Manifest::new(runtime_name, handler);
    manifest.arena_mib = arena_mib(&start.env)?;
    if let Some(pages) = &ready.hot_path {
        buffers::validate(pages, u64::from(options.mem_mib) << 20)?;
    }

    let warming = Instant::now();
    match &ready.hot_path {
        Some(pages) => {
            // The runtime rang "waiting" once it was ready; the warm-up goes
            // through the hot path itself, so its code and pages are warm
            // too, and the runtime stops at its next "waiting" ring: that is
            // where every clone resumes.
            quiesce(&machine, agent)?;
            warm_up_hot(&machine, pages, spec.warmup_event.as_deref(), options)?;
            manifest.hot_path = Some(pages.clone());
            manifest.next_seq = 2;
        }
        None => {
            if let Some(event) = &spec.warmup_event {
                let invoke = FunctionInvoke {
                    event: event.clone(),
                    timeout_ms: duration_ms(options.warmup_timeout),
                    max_output_bytes: 1 << 20,
                };
                let deadline = Instant::now() + options.warmup_timeout + QUIESCE_TIMEOUT;
                let result = agent.invoke_function(&invoke, deadline)?;
                if result.timed_out || result.status.is_none() {
                    return Err(FunctionError::Warmup(format!(
                        "timed out: {}, runtime exit: {:?}; its stderr: {}",
                        result.timed_out,
                        result.runtime_exit,
                        String::from_utf8_lossy(&result.stderr).trim_end()
                    )));
                }
                check_handler_result(result.status, &result.result)
                    .map_err(FunctionError::Warmup)?;
            }
            quiesce(&machine, agent)?;
        }
    }
    let warmup = warming.elapsed();

    manifest.guest_rng = guest_rng::find_base_crng(&options.kernel).and_then(|addr| {
        let mut generation = [0u8; 8];
        let at = GuestAddress(GuestRng::generation_addr(addr));
        machine.memory().read_slice(&mut generation, at).ok()?;
        Some(GuestRng {
            addr,
            generation: u64::from_le_bytes(generation),
        })
    });
    manifest.guest_clock = super::guest_clock::GuestClock::find(&options.kernel);
    let saving = Instant::now();
    crate::snapshot::create::save(&mut machine, out)?;
    manifest.created_unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    manifest.write(out)?;
    // One clone runs the warm-up request again to learn which pages a
    // request touches; later clones get them populated up front.
    let calibrating = Instant::now();
    let working_set = super::Function::open(out)?.calibrate(spec.warmup_event.as_deref())?;
    let calibration = calibrating.elapsed();
    manifest.working_set = working_set;
    manifest.write(out)?;
    Ok(TemplateInfo {
        dir: out.to_path_buf(),
        boot,
        base,
        startup,
        warmup,
        save: saving.elapsed(),
        hot_path: manifest.hot_path.is_some(),
        hot_path_error: ready.hot_path_error,
        guest_rng: manifest.guest_rng.is_some(),
        calibration,
        working_set_pages: manifest
            .working_set
            .iter()
            .map(|r| u64::from(r.pages))
            .sum(),
    })
}

/// Restores a clone of the base snapshot `base` and gives its waiting
/// runtime `spec`'s function (a bundle's on `code_drive`, in the base's
/// placeholder's place): the clone, its agent connection, the runtime's
/// second `READY`, and when the clone's agent answered.
fn from_base(
    base: &Path,
    spec: &FunctionSpec,
    options: &TemplateOptions,
    code_drive: Option<&Path>,
) -> Result<(Machine, AgentClient, FunctionReady, Instant), FunctionError> {
    let info = super::base::read_info(base)?;
    let load = super::base::load_request(spec, options)?;
    let snapshot = crate::snapshot::Snapshot::open(base)?;
    let restore = crate::snapshot::RestoreOptions {
        console: options.console.clone(),
        // The caller's image (the same content: the base's key has it),
        // so the template links the file it was given, as a booted one.
        root_drive: options.root_drive.clone(),
        code_drive: code_drive.map(Path::to_path_buf),
        ..Default::default()
    };
    let machine = snapshot.restore(&restore)?;
    let connect_deadline = Instant::now() + crate::ready::RESTORE_CONNECT_TIMEOUT;
    let mut agent = AgentClient::connect_refreshed(
        &machine,
        crate::refresh::fresh_refresh(),
        connect_deadline,
    )?;
    let connected = Instant::now();
    log::debug!("the base clone's agent answered; loading the handler");
    let ready = agent
        .load_function(&load, Instant::now() + options.startup_timeout)
        .map_err(startup_error)?;
    // The runtime's buffers were set up in the base: its pages must be the
    // ones the base recorded.
    if ready.hot_path.as_ref() != Some(&info.hot_path) {
        return Err(FunctionError::Template(format!(
            "the runtime's hot-path buffers moved after the load (base: {:?}, now: {:?}; {})",
            info.hot_path,
            ready.hot_path,
            ready
                .hot_path_error
                .as_deref()
                .unwrap_or("no error reported")
        )));
    }
    Ok((machine, agent, ready, connected))
}

/// The code drive of the bundle `code` (cached by its content); its
/// dependencies are installed by pip jailed with `isolation`'s worker
/// binary and IDs (the default's if `None`).
pub(crate) fn make_code_drive(
    code: &Path,
    module: &str,
    isolation: Option<&crate::isolation::Isolation>,
) -> Result<PathBuf, FunctionError> {
    let jail = super::pip_jail::PipJail::new(isolation);
    let drive = super::code_image::ensure_code_drive(code, module, &jail, || {
        log::info!(
            "making the code drive of {} (dependencies are installed with pip)",
            code.display()
        );
    })?;
    Ok(drive.image)
}

/// Runs the warm-up request (or a ping) through the hot path of the
/// template's waiting runtime and leaves its vCPU stopped at the runtime's
/// next "waiting" ring.
fn warm_up_hot(
    machine: &Machine,
    pages: &HotPathPages,
    event: Option<&[u8]>,
    options: &TemplateOptions,
) -> Result<(), FunctionError> {
    let bell = machine.doorbell();
    let (rings, ok) = bell.wait_until(options.startup_timeout, |r| r.waiting >= 1);
    if !ok {
        return Err(FunctionError::Template(
            "the runtime reported hot-path buffers but never rang the doorbell".into(),
        ));
    }
    let payload = event.unwrap_or_default();
    let capacity = pages.request.len.saturating_sub(REQUEST_HEADER_LEN as u64);
    if payload.len() as u64 > capacity {
        return Err(FunctionError::BadRequest(format!(
            "the warm-up event ({} bytes) must fit the {capacity}-byte hot-path buffer",
            payload.len()
        )));
    }
    let header = RequestHeader {
        seq: 1,
        flags: if event.is_some() {
            0
        } else {
            REQUEST_FLAG_PING
        },
        event_len: payload.len() as u32,
        timeout_ms: u32::try_from(options.warmup_timeout.as_millis()).unwrap_or(u32::MAX),
        unix_time_ns: super::invoke::unix_time_ns(),
        entropy: [0; REQUEST_ENTROPY_LEN],
    };
    // Park at the ring after this request's "done": the runtime is then
    // back in its wait, with everything the request touched warm.
    bell.park_on(DOORBELL_WAITING);
    let memory = machine.memory();
    buffers::write(memory, &pages.request, REQUEST_HEADER_LEN as u64, payload)?;
    let mut encoded = header.encode();
    encoded[RequestHeader::SEQ_OFFSET..RequestHeader::SEQ_OFFSET + 8].fill(0);
    buffers::write(memory, &pages.request, 0, &encoded)?;
    // The sequence number last: it is what the runtime waits on.
    buffers::write(
        memory,
        &pages.request,
        RequestHeader::SEQ_OFFSET as u64,
        &header.seq.to_le_bytes(),
    )?;
    let (after, ok) = bell.wait_until(options.warmup_timeout, |r| {
        r.done > rings.done && r.waiting > rings.waiting
    });
    if !ok {
        return Err(FunctionError::Warmup(format!(
            "no answer through the hot path in {:?} (doorbell: {after:?})",
            options.warmup_timeout
        )));
    }
    let response = buffers::read_response(memory, &pages.response, header.seq)?;
    if event.is_some() {
        check_handler_result(Some(response.header.status), &response.result)
            .map_err(FunctionError::Warmup)?;
    }
    Ok(())
}
