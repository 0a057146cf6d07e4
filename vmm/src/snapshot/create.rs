//! Taking a snapshot: boot, wait for the agent, optionally warm up, pause,
//! save.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::contents::SnapshotState;
use super::{
    dump_memory_with_stats, write_state, SnapshotError, CODE_DRIVE_FILE, DRIVE_FILE, MEMORY_FILE,
    STATE_FILE,
};
use crate::agent::AgentClient;
use crate::arch::x86_64::state::{save_vcpu, save_vm, saveable_msrs};
use crate::config::VmConfig;
use crate::devices::bus::lock;
use crate::devices::virtio::block::disk::{DriveSpec, FileIdentity};
use crate::machine::Machine;
use crate::ready::BOOT_TIMEOUT;
use ember_protocol::protocol::{ExitStatus, Invoke as Invocation};

/// How long the guest may take to close the agent connection before the
/// snapshot (one emulated vsock round trip on PVM hosts, microseconds on
/// hardware KVM).
const QUIESCE_TIMEOUT: Duration = Duration::from_secs(120);

/// What was created.
#[derive(Debug, Clone)]
pub struct SnapshotInfo {
    /// The snapshot directory.
    pub dir: PathBuf,
    /// Time from the boot request to the agent's greeting.
    pub boot: Duration,
    /// Time to pause the guest and write both files.
    pub save: Duration,
    /// Bytes of guest memory written (the rest are holes).
    pub memory_written: u64,
}

/// Boots `config`, waits until the agent is ready (and has run `warmup`,
/// if given, which must exit 0), and saves the paused microVM into `out`
/// (created if missing; existing snapshot files are replaced).
pub fn create(
    config: &VmConfig,
    warmup: Option<&Invocation>,
    out: &Path,
) -> Result<SnapshotInfo, SnapshotError> {
    std::fs::create_dir_all(out).map_err(|e| SnapshotError::Io(out.to_path_buf(), e))?;
    let started = Instant::now();
    let mut machine = Machine::boot(config)?;
    if machine.agent_ready().wait(BOOT_TIMEOUT).is_none() {
        return Err(SnapshotError::NotReady(machine.stop()));
    }
    let mut agent = AgentClient::connect(&machine, started + BOOT_TIMEOUT)?;
    let boot = started.elapsed();
    if let Some(warmup) = warmup {
        let deadline = Instant::now() + Duration::from_millis(warmup.timeout_ms) + QUIESCE_TIMEOUT;
        let exit = agent.invoke(warmup, deadline, |_, _| {})?;
        if exit.timed_out || exit.status != ExitStatus::Code(0) {
            return Err(SnapshotError::Warmup(format!(
                "{:?}{}",
                exit.status,
                if exit.timed_out { ", timed out" } else { "" }
            )));
        }
    }
    // The snapshot must hold no connection: the agent goes back to waiting
    // for the next one, which is where every clone starts.
    let idle = lock(&machine.devices.vsock).idle_signal();
    drop(agent);
    if !idle.wait(QUIESCE_TIMEOUT) {
        return Err(SnapshotError::Quiesce);
    }
    let saving = Instant::now();
    let memory_written = save(&mut machine, out)?;
    Ok(SnapshotInfo {
        dir: out.to_path_buf(),
        boot,
        save: saving.elapsed(),
        memory_written,
    })
}

/// Pauses `machine` for good and writes its snapshot into `dir`; returns
/// the bytes of guest memory written.
pub(crate) fn save(machine: &mut Machine, dir: &Path) -> Result<u64, SnapshotError> {
    let vcpus = machine.pause();
    if vcpus.len() != machine.vcpu_count() {
        return Err(SnapshotError::Pause);
    }
    let kvm = crate::vstate::kvm().map_err(SnapshotError::Kvm)?;
    let msrs = saveable_msrs(kvm)?;
    let vm = save_vm(machine.vm.fd())?;
    let vcpu_states = vcpus
        .iter()
        .map(|vcpu| save_vcpu(vcpu.fd(), &msrs))
        .collect::<Result<Vec<_>, _>>()?;
    let (memory, stats) = dump_memory_with_stats(&machine.memory, &dir.join(MEMORY_FILE))?;
    let mut devices = machine.devices.state();
    if let Some(block) = devices.block.as_mut() {
        block.drive = drive_into(dir, DRIVE_FILE, &block.drive)?;
    }
    if let Some(code) = devices.code.as_mut() {
        code.drive = drive_into(dir, CODE_DRIVE_FILE, &code.drive)?;
    }
    let state = SnapshotState {
        host: machine.host,
        vcpus: u8::try_from(vcpus.len()).map_err(|_| SnapshotError::Pause)?,
        mem_mib: u32::try_from(memory.iter().map(|r| r.size).sum::<u64>() >> 20)
            .map_err(|_| SnapshotError::Pause)?,
        vsock_cid: machine.vsock_cid(),
        kernel_cmdline: machine.cmdline.clone(),
        memory,
        vm,
        vcpu_states,
        devices,
        created_unix_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    };
    write_state(&dir.join(STATE_FILE), &state)?;
    Ok(stats.written)
}

/// Puts one of the template's drives into the snapshot directory as
/// `name` ([`DRIVE_FILE`], [`CODE_DRIVE_FILE`]; a hard link, or a copy across file systems) and returns
/// what the state records of it: that name, and the identity of the file
/// there. A clone then opens nothing outside the directory.
fn drive_into(dir: &Path, name: &str, drive: &DriveSpec) -> Result<DriveSpec, SnapshotError> {
    use std::os::unix::fs::MetadataExt;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |e| SnapshotError::Io(path, e)
    };
    let source = drive.path();
    let target = dir.join(name);
    // Already there (a jailed template worker's parent linked it in).
    let same =
        |a: &std::fs::Metadata, b: &std::fs::Metadata| a.dev() == b.dev() && a.ino() == b.ino();
    let in_place = matches!(
        (std::fs::metadata(&source), std::fs::metadata(&target)),
        (Ok(a), Ok(b)) if same(&a, &b)
    );
    if !in_place {
        match std::fs::remove_file(&target) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&target)(e)),
            _ => {}
        }
        if let Err(e) = std::fs::hard_link(&source, &target) {
            log::debug!(
                "cannot link the drive {name} into {} ({e}): copying it",
                dir.display()
            );
            std::fs::copy(&source, &target).map_err(io(&target))?;
        }
    }
    let meta = std::fs::metadata(&target).map_err(io(&target))?;
    // The file the guest read must be the one now in the directory.
    if meta.len() != drive.size
        || (meta.ino() == drive.identity.ino && FileIdentity::of(&meta) != drive.identity)
    {
        return Err(SnapshotError::Io(
            source,
            std::io::Error::other("the drive changed while the snapshot was taken"),
        ));
    }
    Ok(DriveSpec {
        path: name.as_bytes().to_vec(),
        size: drive.size,
        identity: FileIdentity::of(&meta),
    })
}
